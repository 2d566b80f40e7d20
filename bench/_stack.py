"""Bench helpers: a throwaway PostgreSQL, the gateway in its own process, pgbouncer, pgbench.

The gateway runs in a separate process so that it does not share an interpreter (or a GIL)
with the load generator:

    python bench/_stack.py serve --state DIR --pg-port P --ready FILE [--null-audit] [--profile F]

writes {"host", "port", "token", "pid"} to FILE once it listens and serves until SIGTERM; it
then writes decision-cache counters next to FILE. `PGWARDEN_BENCH_PROFILE=<file>` (or
--profile) runs the gateway under cProfile and dumps the stats there on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from cli.localpg import APP_DB, SUPERUSER, SUPERUSER_PASSWORD, LocalCluster, free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
HOST = "127.0.0.1"
GATEWAY_USER = "bench"


def raise_nofile() -> None:
    """Lift the soft open-files limit to the hard one (1,000 sessions need ~2,000 fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def opa_binary() -> Path:
    for c in (
        os.environ.get("PGWARDEN_OPA_BINARY"),
        str(ROOT / ".pgwarden" / "bin" / "opa"),
        shutil.which("opa"),
    ):
        if c and Path(c).exists():
            return Path(c)
    raise RuntimeError("OPA binary missing: run `make deps`")


def pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None


def _chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def bare_relay(cluster: LocalCluster) -> Iterator[int]:
    """bench/bare_relay.py in front of the cluster; yields its port."""
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("bare_relay.py")), "--port", str(port),
            "--upstream-port", str(cluster.port)]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT)
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout:g}s")


# -- PostgreSQL --------------------------------------------------------------------------


@contextlib.contextmanager
def pg_cluster(
    *, scale: int | None = None, max_connections: int | None = None
) -> Iterator[LocalCluster]:
    """A throwaway cluster (fsync off) with APP_DB; `pgbench -i -s scale` in it when asked."""
    base = Path(tempfile.mkdtemp(prefix="pgwarden-bench-pg-"))
    base.chmod(0o755)
    cluster = LocalCluster(base, free_port())
    try:
        cluster.start()
        if max_connections is not None:
            cluster.psql(f"ALTER SYSTEM SET max_connections = {int(max_connections)}")
            cluster.stop()
            cluster.start()
        cluster.psql(f"CREATE DATABASE {APP_DB}")
        if scale is not None:
            subprocess.run(
                [
                    "pgbench",
                    "-i",
                    "-q",
                    "-s",
                    str(scale),
                    "-h",
                    HOST,
                    "-p",
                    str(cluster.port),
                    "-U",
                    SUPERUSER,
                    APP_DB,
                ],
                env={**os.environ, "PGPASSWORD": SUPERUSER_PASSWORD},
                check=True,
                capture_output=True,
            )
            cluster.psql("VACUUM ANALYZE", dbname=APP_DB)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


# -- the gateway, in its own process ------------------------------------------------------


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    token: str
    pid: int
    state: Path
    # A token per group the bench runs as (admins, ai-agents); `token` is the admins one.
    tokens: dict[str, str] = field(default_factory=dict)
    # Decision-cache counters, filled in once the process has stopped.
    final_stats: dict[str, Any] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        """User + system CPU of the gateway process, all threads (not OPA: cached hits)."""
        return _cpu_seconds(self.pid)

    def loop_cpu_seconds(self) -> float:
        """User + system CPU of the gateway's main thread alone: its event loop."""
        return _cpu_seconds(self.pid, f"/proc/{self.pid}/task/{self.pid}/stat")

    def index_cpu_seconds(self) -> float:
        """User + system CPU of the gateway's audit index process (`python -m gateway.audit
        index`), if it runs: on the same cores as the gateway, so part of what a
        transaction costs. Not the OPA sidecar, also a child."""
        total = 0.0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in children:
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                    if b"gateway.audit" in argv and b"index" in argv:
                        total += _cpu_seconds(int(child))
        return total

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("VmRSS not found")


def _cpu_seconds(pid: int, stat: str | None = None) -> float:
    fields = Path(stat or f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def gateway_process(
    cluster: LocalCluster,
    *,
    null_audit: bool = False,
    profile: Path | None = None,
    audit: dict[str, Any] | None = None,
) -> Iterator[GatewayProcess]:
    """Start `_stack.py serve` against the cluster; SIGTERM (then SIGKILL) it on exit."""
    state = Path(tempfile.mkdtemp(prefix="pgwarden-bench-gw-"))
    ready = state / "ready.json"
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "serve",
        "--state",
        str(state),
        "--pg-port",
        str(cluster.port),
        "--ready",
        str(ready),
    ]
    if null_audit:
        argv.append("--null-audit")
    if audit:
        argv += ["--audit", json.dumps(audit)]
    if profile is not None:
        argv += ["--profile", str(profile)]
    log = (state / "gateway.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    gw: GatewayProcess | None = None
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {proc.returncode}:\n"
                    + (state / "gateway.log").read_text()[-3000:]
                )
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start within 120s")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        gw = GatewayProcess(
            proc, info["host"], info["port"], info["token"], info["pid"], state, info["tokens"]
        )
        yield gw
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        if gw is not None:
            with contextlib.suppress(OSError, ValueError):
                gw.final_stats = json.loads((state / "stats.json").read_text())
        if not os.environ.get("KEEP_STATE"):
            shutil.rmtree(state, ignore_errors=True)


class _NullAudit:
    """An AuditSink that stores nothing: bench-only, to price the audit path separately."""

    def __init__(self) -> None:
        self._n = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def request(self, record: Any) -> str:
        return await self.request_soon(record)

    def request_soon(self, record: Any) -> asyncio.Future[str]:
        self._n += 1
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        done.set_result(f"null:{self._n}")
        return done

    async def outcome(self, record: Any) -> None:
        return None

    def outcome_nowait(self, record: Any) -> None:
        # As the real sinks have it: without, the gate makes a task per outcome and the
        # no-audit baseline would carry a cost the product does not have.
        return None

    async def session(self, event: Any) -> None:
        return None


def _serve(args: argparse.Namespace) -> None:
    import uvloop

    import gateway.runtime as runtime
    from gateway.control.client import ControlClient
    from gateway.control.targets import Target
    from gateway.identity.local import LocalTokenIssuer
    from gateway.settings import load_settings

    raise_nofile()
    state = Path(args.state)
    environ = {**os.environ, "PGWARDEN_BENCH_UPSTREAM_PW": SUPERUSER_PASSWORD}
    settings = load_settings(
        state_dir=state,
        listener={"host": HOST, "port": 0},
        # Several benches may run at once: no admin listener on the fixed default port.
        admin={"port": 0},
        policy={
            "opa_binary": opa_binary(),
            "rego_dir": ROOT / "rego",
            "bundle_dir": ROOT / "bundles",
        },
        audit={"store": "sqlite", **json.loads(args.audit)},
    )
    with ControlClient(settings) as control:
        if control.target("app") is None:
            control.add_target(
                Target(
                    name="app",
                    host=HOST,
                    port=args.pg_port,
                    dbname=APP_DB,
                    user=SUPERUSER,
                    password_env="PGWARDEN_BENCH_UPSTREAM_PW",
                    sslmode="disable",
                    labels={"env": "bench"},
                )
            )
    if args.null_audit:
        # For the life of this bench process: the runtime builds its sink through this name.
        mock.patch.object(runtime, "audit_sink", lambda _settings: _NullAudit()).start()
    ready = Path(args.ready)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        gw = runtime.Gateway(settings, environ)
        host, port = await gw.start()
        try:
            issuer = LocalTokenIssuer.from_settings(settings)
            try:
                tokens = {
                    group: issuer.issue(f"agent:bench-{group}", [group], 3 * 3600).token
                    for group in ("admins", "ai-agents")
                }
            finally:
                issuer.close()
            tmp = ready.with_suffix(".tmp")
            info = {"host": host, "port": port, "token": tokens["admins"], "tokens": tokens}
            tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
            tmp.rename(ready)
            await stop.wait()
            if gw.decider is not None:
                stats = {"cache_hits": gw.decider.hits, "cache_misses": gw.decider.misses}
                analyzer = getattr(getattr(gw, "context", None), "analyzer", None)
                for counter in ("hits", "shape_hits", "misses"):
                    stats[f"analysis_{counter}"] = getattr(analyzer, counter, 0)
                store = getattr(gw.audit, "store", None)
                stats["audit_commits"] = getattr(store, "commits", 0)
                (ready.parent / "stats.json").write_text(json.dumps(stats))
        finally:
            await gw.stop()

    profile_to = args.profile or os.environ.get("PGWARDEN_BENCH_PROFILE")
    if profile_to:
        import cProfile

        # On the thread's CPU time, not the wall clock: on a busy machine a process is
        # often preempted inside a system call (a socket write wakes its reader), and wall
        # time would charge that wait to whatever function was running.
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
        try:
            uvloop.run(main())
        finally:
            prof.disable()
            prof.dump_stats(profile_to)
    else:
        uvloop.run(main())


# -- pgbouncer ------------------------------------------------------------------------------


@contextlib.contextmanager
def pgbouncer(cluster: LocalCluster, binary: str, pool_size: int = 20) -> Iterator[int]:
    """pgbouncer in session mode on loopback (client auth trust); yields its port."""
    d = Path(tempfile.mkdtemp(prefix="pgwarden-bench-pgb-"))
    d.chmod(0o755)
    _chown_postgres(d)
    port = free_port()
    (d / "userlist.txt").write_text(f'"{SUPERUSER}" "{SUPERUSER_PASSWORD}"\n')
    (d / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{APP_DB} = host={HOST} port={cluster.port} dbname={APP_DB} user={SUPERUSER} "
        f"password={SUPERUSER_PASSWORD}\n"
        "[pgbouncer]\n"
        f"listen_addr = {HOST}\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {d / 'userlist.txt'}\n"
        "pool_mode = session\n"
        "max_client_conn = 200\n"
        f"default_pool_size = {pool_size}\n"
        f"logfile = {d / 'pgbouncer.log'}\n"
        f"pidfile = {d / 'pgbouncer.pid'}\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    for f in d.iterdir():
        _chown_postgres(f)
    argv = [binary, str(d / "pgbouncer.ini")]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(d, ignore_errors=True)


# -- pgbench --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    name: str
    port: int
    user: str
    dbname: str
    password: str | None


@dataclass
class PgbenchResult:
    tps: float
    latency_ms: float
    transactions: int
    failed: int
    # The gateway's own CPU per transaction, where the run went through one.
    cpu_us: float = 0.0
    # Its audit index process's, per transaction.
    index_cpu_us: float = 0.0
    # The share of the run's wall time the gateway's event-loop thread was on a CPU: near 1,
    # the loop's CPU bounds throughput; well below, the statements wait (for the audit,
    # the catalog probe, the server, or a CPU the other processes hold).
    loop_busy: float = 0.0


def pgbench(
    ep: Endpoint,
    *,
    clients: int,
    threads: int,
    seconds: int,
    extra: tuple[str, ...] = (),
    mode: str = "prepared",
    script: Path | None = None,
) -> PgbenchResult:
    """`pgbench -n -S -M <mode>` (or `-f script`) against an endpoint; raises with its output
    on failure."""
    env = {**os.environ}
    env.pop("PGPASSWORD", None)
    if ep.password is not None:
        env["PGPASSWORD"] = ep.password
    argv = [
        "pgbench",
        "-n",
        *(["-f", str(script)] if script is not None else ["-S"]),
        "-M",
        mode,
        "-c",
        str(clients),
        "-j",
        str(threads),
        "-T",
        str(seconds),
        "-h",
        HOST,
        "-p",
        str(ep.port),
        "-U",
        ep.user,
        *extra,
        ep.dbname,
    ]
    out = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=seconds + 120, check=False
    )
    text = out.stdout + out.stderr
    tps = re.search(r"^tps = ([\d.]+)", text, re.M)
    lat = re.search(r"^latency average = ([\d.]+) ms", text, re.M)
    done = re.search(r"number of transactions actually processed: (\d+)", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    if out.returncode != 0 or tps is None or lat is None:
        raise RuntimeError(f"pgbench via {ep.name} failed ({out.returncode}):\n{text[-3000:]}")
    return PgbenchResult(
        float(tps.group(1)),
        float(lat.group(1)),
        int(done.group(1)) if done else 0,
        int(failed.group(1)) if failed else 0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--state", required=True)
    serve.add_argument("--pg-port", type=int, required=True)
    serve.add_argument("--ready", required=True)
    serve.add_argument("--null-audit", action="store_true")
    serve.add_argument("--audit", default="{}", help="audit settings, as JSON")
    serve.add_argument("--profile")
    args = parser.parse_args()
    if args.cmd == "serve":
        _serve(args)


if __name__ == "__main__":
    main()
