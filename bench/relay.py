"""pgbench -S through pgwarden vs direct vs pgbouncer (session mode), in one run.

Run:
    uv run python bench/relay.py [--seconds 15] [--rounds 2]   # throughput, -c 8 -j 2
    uv run python bench/relay.py --mode prepared --mode simple --group admins --group ai-agents \
        --variant bare --variant os                            # every combination, one run
    uv run python bench/relay.py --latency [--seconds 10]      # -c 1 -j 1: added µs per txn (d too)
    uv run python bench/relay.py --memory [--sessions 1000]    # gateway RSS per idle session
    uv run python bench/relay.py --hotspots [--null-audit]     # top functions by own time

Throughput mode runs (a) direct, (b) pgbouncer (when installed), (c) pgwarden with policy
(admins token, OPA sidecar + decision cache) and the SQLite audit store, and (d) pgwarden
with the audit sink replaced by a no-op (a bench-only harness, not a product setting: the
product has no "audit off"); d - c prices the audit path. Runs are interleaved over rounds
(order reversed every other round) and averaged. The last line is
`ratio=<pgwarden/direct> vs_pgbouncer=<pgwarden/pgbouncer>` per combination of `--mode`
(pgbench -M simple|extended|prepared) and `--group` (the token's group: admins run -S;
ai-agents run a read of `customers`, whose `email` the reference policy masks for them, the
other paths running the same script), e.g. `prepared/admins ratio=0.3 vs_pgbouncer=0.4 |
simple/admins ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pstats
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _stack import (
    GATEWAY_USER,
    HOST,
    Endpoint,
    GatewayProcess,
    PgbenchResult,
    bare_relay,
    gateway_process,
    pg_cluster,
    pgbench,
    pgbouncer,
    pgbouncer_binary,
    raise_nofile,
)

from cli.localpg import APP_DB, SUPERUSER, SUPERUSER_PASSWORD, LocalCluster

# ai-agents read a table with a classified column (public.customers.email): masked rows.
_MASKED_SCRIPT = """\\set id random(1, 10000)
SELECT id, email FROM customers WHERE id = :id;
"""


def _masked_table(cluster: LocalCluster) -> None:
    cluster.psql(
        "CREATE TABLE IF NOT EXISTS customers (id int PRIMARY KEY, name text, email text);"
        " INSERT INTO customers SELECT g, 'n' || g, 'user' || g || '@example.com'"
        " FROM generate_series(1, 10000) g ON CONFLICT DO NOTHING",
        dbname=APP_DB,
    )
    cluster.psql("VACUUM ANALYZE customers", dbname=APP_DB)


def _install_ddl_watch(cluster: LocalCluster) -> None:
    """The catalog generation from the DDL watch (event trigger), as deploy recommends,
    rather than the snapshot: a planned Execute's record then overlaps its catalog check."""
    from gateway.sql.catalog import WATCH_SQL

    cluster.psql(WATCH_SQL.read_text(), dbname=APP_DB)


def _pgbench(
    ep: Endpoint, args: argparse.Namespace, seconds: int, mode: str, script: Path | None
) -> PgbenchResult:
    """pgbench at the run's -c and -j."""
    return pgbench(
        ep, clients=args.clients, threads=args.threads, seconds=seconds, mode=mode, script=script
    )


def _as_group(ep: Endpoint, group: str, gws: dict[str, GatewayProcess]) -> Endpoint:
    gw = gws.get(ep.name)
    if gw is None or group == "admins":
        return ep
    return Endpoint(ep.name, ep.port, ep.user, ep.dbname, gw.tokens[group])


# Audit arrangements compared in the same run: the writer on the gateway's own event loop
# (in_process) and without the fsync per commit (normal).
_VARIANT_AUDIT: dict[str, dict[str, Any]] = {
    "in-process": {"durability": "store", "in_process": True},
    "normal": {"durability": "store", "sqlite_synchronous": "normal"},
    # The audit log's other durability (pgwarden itself runs the default, disk), and the
    # store as the point of durability (the arrangement before the log).
    "os": {"durability": "os"},
    "store": {"durability": "store"},
}


def _endpoints(
    stack: ExitStack,
    cluster: LocalCluster,
    *,
    with_noaudit: bool,
    variants: tuple[str, ...] = (),
) -> tuple[list[Endpoint], dict[str, GatewayProcess]]:
    eps = [Endpoint("direct", cluster.port, SUPERUSER, APP_DB, SUPERUSER_PASSWORD)]
    binary = pgbouncer_binary()
    if binary is None:
        print("pgbouncer: not installed, skipped (apt-get install -y pgbouncer)")
    else:
        port = stack.enter_context(pgbouncer(cluster, binary))
        eps.append(Endpoint("pgbouncer", port, SUPERUSER, APP_DB, None))
    gws: dict[str, GatewayProcess] = {}
    gw = stack.enter_context(gateway_process(cluster))
    gws["pgwarden"] = gw
    eps.append(Endpoint("pgwarden", gw.port, GATEWAY_USER, "app", gw.token))
    if with_noaudit:
        gw2 = stack.enter_context(gateway_process(cluster, null_audit=True))
        gws["pgwarden-noaudit"] = gw2
        eps.append(Endpoint("pgwarden-noaudit", gw2.port, GATEWAY_USER, "app", gw2.token))
    if "bare" in variants:
        # The floor: a Python relay that only frames and forwards (bench/bare_relay.py).
        port = stack.enter_context(bare_relay(cluster))
        eps.append(Endpoint("bare-relay", port, SUPERUSER, APP_DB, SUPERUSER_PASSWORD))
    for variant in variants:
        if variant == "bare":
            continue
        gw3 = stack.enter_context(gateway_process(cluster, audit=_VARIANT_AUDIT[variant]))
        name = f"pgwarden-{variant}"
        gws[name] = gw3
        eps.append(Endpoint(name, gw3.port, GATEWAY_USER, "app", gw3.token))
    return eps, gws


def _fsync_p50_us(directory: Path, samples: int = 200) -> float:
    """The median time of one append + fdatasync of a record-sized write in `directory`
    (the audit log's filesystem), measured in the same run as the throughput it bounds."""
    path = directory / "bench-fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times: list[float] = []
    try:
        for _ in range(samples):
            os.write(fd, b"x" * 400)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return 1e6 * statistics.median(times)


def _interleaved(
    eps: list[Endpoint],
    rounds: int,
    run: Callable[[Endpoint], PgbenchResult],
    gws: dict[str, GatewayProcess] | None = None,
) -> dict[str, list[PgbenchResult]]:
    results: dict[str, list[PgbenchResult]] = {ep.name: [] for ep in eps}
    for r in range(rounds):
        order = eps if r % 2 == 0 else list(reversed(eps))
        for ep in order:
            gw = (gws or {}).get(ep.name)
            cpu0 = gw.cpu_seconds() if gw else 0.0
            index0 = gw.index_cpu_seconds() if gw else 0.0
            loop0 = gw.loop_cpu_seconds() if gw else 0.0
            wall0 = time.monotonic()
            res = run(ep)
            results[ep.name].append(res)
            cpu = ""
            if gw and res.transactions:
                # The gateway's own CPU per transaction: the figure the relay is tuned by.
                per_tx = 1e6 * (gw.cpu_seconds() - cpu0) / res.transactions
                res.cpu_us = per_tx
                # Its audit index process runs on the same cores: shown beside it.
                res.index_cpu_us = 1e6 * (gw.index_cpu_seconds() - index0) / res.transactions
                # (pgbench's own start and end are in the wall time: a slight underestimate)
                res.loop_busy = (gw.loop_cpu_seconds() - loop0) / (time.monotonic() - wall0)
                cpu = (
                    f"  gateway cpu={per_tx:.0f} µs/tx index cpu={res.index_cpu_us:.0f} µs/tx"
                    f" loop busy={res.loop_busy:.0%}"
                )
            print(
                f"  round {r + 1} {ep.name:<18} tps={res.tps:>10.1f}  "
                f"lat={res.latency_ms:.3f} ms  failed={res.failed}{cpu}",
                flush=True,
            )
    return results


def _cache_line(gws: dict[str, GatewayProcess]) -> None:
    # Counters are written when the gateway stops; read after the stack closes.
    for name, gw in gws.items():
        s = gw.final_stats
        if s:
            print(
                f"{name}: decision cache hits={s['cache_hits']} misses={s['cache_misses']}"
                f" analysis by text={s.get('analysis_hits', 0)}"
                f" by shape={s.get('analysis_shape_hits', 0)} parsed={s.get('analysis_misses', 0)}"
                f" audit commits={s.get('audit_commits', 0)}"
            )


def throughput(args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    combos = [(mode, group) for mode in args.mode for group in args.group]
    summary: list[str] = []
    with pg_cluster(scale=args.scale) as cluster:
        print(f"cluster ready (pgbench -i -s {args.scale}) in {time.monotonic() - t0:.1f}s")
        script = None
        if "ai-agents" in args.group:
            _masked_table(cluster)
            script = Path(tempfile.mkdtemp(prefix="pgwarden-bench-script-")) / "masked.sql"
            script.write_text(_MASKED_SCRIPT)
        gws: dict[str, GatewayProcess] = {}
        all_results: dict[tuple[str, str], dict[str, list[PgbenchResult]]] = {}
        with ExitStack() as stack:
            eps, gws = _endpoints(
                stack, cluster, with_noaudit=not args.no_noaudit, variants=tuple(args.variant)
            )
            args.fsync_us = _fsync_p50_us(gws["pgwarden"].state)
            print(f"fdatasync p50 on the audit log's filesystem: {args.fsync_us:.0f} µs")
            for mode, group in combos:
                run_script = script if group == "ai-agents" else None
                group_eps = [_as_group(ep, group, gws) for ep in eps]

                def run(
                    ep: Endpoint, mode: str = mode, s: Path | None = run_script
                ) -> PgbenchResult:
                    return _pgbench(ep, args, args.seconds, mode, s)

                # Warm-up: buffers, the gateway's catalog and decision cache, pgbouncer's pool.
                for ep in group_eps:
                    _pgbench(ep, args, args.warmup, mode, run_script)
                what = f"-f {run_script.name}" if run_script is not None else "-S"
                print(
                    f"[{mode}/{group}] pgbench -n {what} -M {mode} -c {args.clients} "
                    f"-j {args.threads} -T {args.seconds}, {args.rounds} interleaved round(s)"
                )
                all_results[(mode, group)] = _interleaved(group_eps, args.rounds, run, gws)
        _cache_line(gws)
    for (mode, group), results in all_results.items():
        summary.append(f"{mode}/{group} " + _throughput_table(f"{mode}/{group}", results, args))
    print(" | ".join(summary))


def _throughput_table(
    title: str, results: dict[str, list[PgbenchResult]], args: argparse.Namespace
) -> str:
    tps = {name: statistics.fmean(r.tps for r in rs) for name, rs in results.items()}
    lat = {name: statistics.fmean(r.latency_ms for r in rs) for name, rs in results.items()}
    cpu = {name: statistics.fmean(r.cpu_us for r in rs) for name, rs in results.items()}
    index = {name: statistics.fmean(r.index_cpu_us for r in rs) for name, rs in results.items()}
    busy = {name: statistics.fmean(r.loop_busy for r in rs) for name, rs in results.items()}
    direct = tps["direct"]
    print()
    print(f"== {title}")
    print(
        f"{'path':<18} {'TPS (mean)':>12} {'min':>10} {'max':>10} {'lat ms':>8} {'vs direct':>10}"
        f" {'gw cpu µs/tx':>13} {'index cpu µs/tx':>16} {'loop busy':>10}"
    )
    for name, rs in results.items():
        print(
            f"{name:<18} {tps[name]:>12.1f} {min(r.tps for r in rs):>10.1f} "
            f"{max(r.tps for r in rs):>10.1f} {lat[name]:>8.3f} {tps[name] / direct:>10.3f}"
            f" {cpu[name]:>13.0f} {index[name]:>16.0f} {busy[name]:>10.0%}"
        )
    if args.fsync_us and "pgbouncer" in tps:
        # disk durability: a statement waits for an fdatasync that starts after its record
        # is written, so a client completes at most one per fdatasync.
        ceiling = 1e6 * args.clients / args.fsync_us
        print(
            f"disk durability ceiling at -c {args.clients}: {ceiling:.0f} TPS "
            f"({ceiling / tps['pgbouncer']:.3f} of pgbouncer), from fdatasync p50 "
            f"{args.fsync_us:.0f} µs on the audit log's filesystem"
        )
    if "pgwarden-noaudit" in tps:
        cost = 1000.0 * (lat["pgwarden"] - lat["pgwarden-noaudit"])
        print(
            f"audit path (SQLite) cost: {cost:.0f} µs per transaction at -c {args.clients} "
            f"(pgwarden vs pgwarden-noaudit); TPS {tps['pgwarden-noaudit']:.1f} -> "
            f"{tps['pgwarden']:.1f}"
        )
    line = f"ratio={tps['pgwarden'] / direct:.3f}"
    if "pgbouncer" in tps:
        line += f" vs_pgbouncer={tps['pgwarden'] / tps['pgbouncer']:.3f}"
    for name in tps:
        if name.startswith("pgwarden-") or name == "bare-relay":
            line += f" {name}/pgbouncer={tps[name] / tps.get('pgbouncer', direct):.3f}"
    return line


def latency(args: argparse.Namespace) -> None:
    with pg_cluster(scale=args.scale) as cluster, ExitStack() as stack:
        if args.ddl_watch:
            _install_ddl_watch(cluster)
        eps, gws = _endpoints(
            stack, cluster, with_noaudit=not args.no_noaudit, variants=tuple(args.variant)
        )
        for ep in eps:
            pgbench(ep, clients=1, threads=1, seconds=args.warmup)
        fsync_us = _fsync_p50_us(gws["pgwarden"].state)
        print(
            f"fdatasync p50 on the audit log's filesystem: {fsync_us:.0f} µs (the disk "
            f"durability's latency target: 50 µs + this = {50 + fsync_us:.0f} µs)"
        )
        print(
            f"pgbench -n -S -M prepared -c 1 -j 1 -T {args.seconds}, "
            f"{args.rounds} interleaved round(s)"
        )
        results = _interleaved(
            eps,
            args.rounds,
            lambda ep: pgbench(ep, clients=1, threads=1, seconds=args.seconds),
            gws,
        )
    lat = {name: statistics.fmean(r.latency_ms for r in rs) for name, rs in results.items()}
    direct = lat["direct"]
    print()
    print(f"{'path':<18} {'avg latency ms':>15} {'added µs vs direct':>20} {'TPS':>10}")
    for name, rs in results.items():
        added = "" if name == "direct" else f"{1000.0 * (lat[name] - direct):.0f}"
        print(
            f"{name:<18} {lat[name]:>15.4f} {added:>20} "
            f"{statistics.fmean(r.tps for r in rs):>10.1f}"
        )
    parts = [f"pgwarden_added_us={1000.0 * (lat['pgwarden'] - direct):.0f}"]
    if "pgbouncer" in lat:
        parts.append(f"pgbouncer_added_us={1000.0 * (lat['pgbouncer'] - direct):.0f}")
    print(" ".join(parts))


async def _open_sessions(gw: GatewayProcess, n: int, concurrency: int) -> list[Any]:
    import asyncpg

    sem = asyncio.Semaphore(concurrency)

    async def one() -> Any:  # asyncpg is untyped
        async with sem:
            return await asyncpg.connect(
                host=HOST,
                port=gw.port,
                user=GATEWAY_USER,
                password=gw.token,
                database="app",
                ssl=False,
                timeout=60,
            )

    return list(await asyncio.gather(*(one() for _ in range(n))))


def memory(args: argparse.Namespace) -> None:
    import asyncpg

    raise_nofile()
    with pg_cluster(max_connections=args.sessions + 100) as cluster, gateway_process(cluster) as gw:

        async def run() -> None:
            # Warm the gateway first (imports, first upstream login, first decision).
            warm = await asyncpg.connect(
                host=HOST,
                port=gw.port,
                user=GATEWAY_USER,
                password=gw.token,
                database="app",
                ssl=False,
            )
            await warm.execute("SELECT 1")
            await warm.close()
            await asyncio.sleep(1)
            before = gw.rss_kb()
            t0 = time.monotonic()
            conns = await _open_sessions(gw, args.sessions, args.concurrency)
            opened = time.monotonic() - t0
            await asyncio.sleep(2)
            after = gw.rss_kb()
            backends = cluster.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            ).strip()
            print(f"upstream client backends while the sessions are open: {backends}")
            print(
                f"{'sessions':>9} {'RSS before KB':>14} {'RSS after KB':>13} "
                f"{'KB/session':>11} {'login rate/s':>13}"
            )
            print(
                f"{args.sessions:>9} {before:>14} {after:>13} "
                f"{(after - before) / args.sessions:>11.1f} {args.sessions / opened:>13.1f}"
            )
            await asyncio.gather(*(c.close() for c in conns))

        asyncio.run(run())


def _pyspy_argv() -> list[str] | None:
    found = shutil.which("py-spy")
    if found:
        return [found]
    if shutil.which("uv"):
        probe = subprocess.run(
            ["uv", "run", "--with", "py-spy", "py-spy", "--version"],
            capture_output=True,
            check=False,
            timeout=180,
        )
        if probe.returncode == 0:
            return ["uv", "run", "--with", "py-spy", "py-spy"]
    return None


def _own_time_table(raw: Path, top: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    print(f"py-spy --gil samples: {total} (own = leaf; incl = anywhere on the stack)")
    print(f"{'own %':>6} {'incl %':>7}  function")
    for f, n in own.most_common(top):
        print(f"{100 * n / total:>6.1f} {100 * incl[f] / total:>7.1f}  {f}")


def hotspots(args: argparse.Namespace) -> None:
    """Profile the gateway under pgbench -S: py-spy (GIL-holding samples) or cProfile."""
    pyspy = _pyspy_argv()
    tmp = Path(tempfile.mkdtemp(prefix="pgwarden-bench-prof-"))
    profile = None if pyspy else tmp / "gateway.prof"
    # The first --variant naming an audit arrangement (os, store, ...) is the one profiled.
    arranged = [v for v in args.variant if v in _VARIANT_AUDIT]
    audit_settings = _VARIANT_AUDIT[arranged[0]] if arranged else None
    try:
        with (
            pg_cluster(scale=args.scale) as cluster,
            gateway_process(
                cluster, null_audit=args.null_audit, profile=profile, audit=audit_settings
            ) as gw,
        ):
            mode, group = args.mode[0], args.group[0]
            script = None
            if group == "ai-agents":
                _masked_table(cluster)
                script = tmp / "masked.sql"
                script.write_text(_MASKED_SCRIPT)
            ep = Endpoint("pgwarden", gw.port, GATEWAY_USER, "app", gw.tokens[group])
            _pgbench(ep, args, args.warmup, mode, script)
            done: dict[str, PgbenchResult] = {}
            load = threading.Thread(
                target=lambda: done.setdefault(
                    "r", _pgbench(ep, args, args.seconds + 4, mode, script)
                )
            )
            load.start()
            try:
                time.sleep(2)
                if pyspy:
                    subprocess.run(
                        [
                            *pyspy,
                            "record",
                            "-p",
                            str(gw.pid),
                            "-d",
                            str(args.seconds),
                            "-r",
                            "200",
                            "--gil",
                            "--nonblocking",
                            "--format",
                            "raw",
                            "-o",
                            str(tmp / "raw.txt"),
                        ],
                        check=True,
                        capture_output=True,
                        timeout=args.seconds + 60,
                    )
            finally:
                load.join()
            audit = (
                "no-op sink" if args.null_audit else f"log, {arranged[0] if arranged else 'disk'}"
            )
            print(
                f"pgbench -M {mode} ({group}) -c {args.clients} via pgwarden (audit {audit}): "
                f"tps={done['r'].tps:.1f}"
            )
        if pyspy:
            _own_time_table(tmp / "raw.txt", args.top)
        else:
            print("py-spy unavailable: cProfile (whole run, tottime)")
            stats = pstats.Stats(str(profile)).sort_stats(args.sort)
            stats.print_stats(args.top)
            if args.save_profile is not None and profile is not None:
                # Kept for a look at callers and callees (python -m pstats FILE).
                shutil.copyfile(profile, args.save_profile)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--latency", action="store_true", help="-c 1 -j 1 added latency")
    p.add_argument("--memory", action="store_true", help="gateway RSS per idle session")
    p.add_argument("--hotspots", action="store_true", help="profile the gateway under -S")
    p.add_argument("--null-audit", action="store_true", help="--hotspots: no-op audit sink")
    p.add_argument("--top", type=int, default=15, help="--hotspots: rows to print")
    p.add_argument(
        "--sort",
        default="tottime",
        choices=["tottime", "cumulative"],
        help="--hotspots (cProfile): own time, or time including callees",
    )
    p.add_argument("--save-profile", type=Path, default=None, help="--hotspots: keep the .prof")
    p.add_argument("--seconds", type=int, default=None, help="pgbench -T (15; 10 for --latency)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per path")
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds per path")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--no-noaudit", action="store_true", help="skip the no-op audit variant")
    p.add_argument(
        "--mode",
        action="append",
        choices=["simple", "extended", "prepared"],
        help="pgbench -M (repeatable; prepared by default)",
    )
    p.add_argument(
        "--group",
        action="append",
        choices=["admins", "ai-agents"],
        help="the token's group (repeatable; admins by default); ai-agents read masked rows",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        choices=["in-process", "normal", "os", "store", "bare"],
        help="also run pgwarden (audit log, durability disk) with durability os, or the store"
        " as the point of durability (store; in-process; normal: synchronous=normal); or the"
        " bare Python relay (bench/bare_relay.py)",
    )
    p.add_argument(
        "--ddl-watch",
        action="store_true",
        help="--latency: install the DDL watch in the bench database (catalog generation"
        " from the event trigger, not the snapshot)",
    )
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=50, help="logins in flight (--memory)")
    args = p.parse_args()
    args.fsync_us = 0.0  # measured in the run (throughput, latency)
    args.mode = args.mode or ["prepared"]
    args.group = args.group or ["admins"]
    if args.memory:
        memory(args)
    elif args.hotspots:
        args.seconds = args.seconds or 15
        hotspots(args)
    elif args.latency:
        args.seconds = args.seconds or 10
        latency(args)
    else:
        args.seconds = args.seconds or 15
        throughput(args)


if __name__ == "__main__":
    main()
