"""`pgwarden demo`: a local PostgreSQL, the gateway with the reference policy and SQLite audit,
an agent's statements run through it with psql (one held for approval and approved from the
approver's CLI, one denied), its audit trail, then serving until Ctrl-C."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import typer

from cli.certs import ensure_server_cert
from cli.context import fail, settings_of
from cli.localpg import (
    SUPERUSER,
    SUPERUSER_PASSWORD,
    LocalCluster,
    free_port,
    reachable_by_postgres,
)
from gateway.control.client import ControlClient
from gateway.control.targets import Target
from gateway.identity.local import LocalTokenIssuer
from gateway.settings import Settings, load_settings
from gateway.sql.catalog import WATCH_SQL

app = typer.Typer(help="Run the demo.")

# The statements an AI agent tries, and what a human approver does when the reference
# policy holds one for approval (None: the policy decides alone).
AGENT_STATEMENTS: tuple[tuple[str, str, tuple[str, str] | None], ...] = (
    ("read a table", "SELECT id, customer_id, amount FROM orders ORDER BY id", None),
    ("read classified columns", "SELECT name, email FROM customers ORDER BY id", None),
    (
        "a write held for approval, approved from the CLI",
        "DELETE FROM orders WHERE id = 3 RETURNING id, amount",
        ("approve", "order 3 was a test order"),
    ),
    (
        "a write hidden in a CTE, held, denied from the CLI",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
        ("deny", "this deletes every order"),
    ),
    ("read a server file", "SELECT pg_read_file('/etc/passwd')", None),
    (
        "use a classified column as an oracle",
        "SELECT count(*) FROM customers WHERE email LIKE 'a%'",
        None,
    ),
    ("text that does not parse", "SELEC 1", None),
)
# How long the demo's gateway holds a statement for its approver.
DEMO_WAIT_SECONDS = 60


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _say(text: str = "") -> None:
    typer.echo(text)


@app.command()
def demo(
    ctx: typer.Context,
    port: int = typer.Option(6543, help="Gateway port."),
    once: bool = typer.Option(False, help="Run the scripted session and exit (no serving)."),
) -> None:
    """Start everything locally, show an agent's statements decided, and keep serving."""
    base = settings_of(ctx)
    state = base.state_dir.resolve() / "demo"
    state.mkdir(parents=True, exist_ok=True)
    pg_base = state / "pg"
    in_temp = not reachable_by_postgres(state)
    if in_temp:
        # As root, PostgreSQL runs as the postgres OS user, which cannot reach a folder
        # under a private home: keep the throwaway cluster in the temp folder instead, one
        # per state directory (two demos, or two test runs, never share a cluster).
        tag = hashlib.sha256(str(state).encode()).hexdigest()[:10]
        pg_base = Path(tempfile.gettempdir()) / f"pgwarden-demo-pg-{os.getuid()}-{tag}"
    pg_base.mkdir(parents=True, exist_ok=True)
    pg_base.chmod(0o755)
    pg_port = 54329 if _port_free(54329) else free_port()
    cluster = LocalCluster(pg_base, pg_port)
    _say(f"starting PostgreSQL on 127.0.0.1:{pg_port} ({pg_base})")
    cluster.start()
    try:
        _run_demo(base, state, cluster, port, once)
    finally:
        _say("stopping PostgreSQL")
        cluster.stop()
        if in_temp and once:
            shutil.rmtree(pg_base, ignore_errors=True)  # a one-off run keeps nothing in /tmp


def _run_demo(base: Settings, state: Path, cluster: LocalCluster, port: int, once: bool) -> None:
    import asyncio

    from gateway.runtime import Gateway

    dbname = cluster.create_app_database()
    # The DDL watch, which the README recommends for every target: this cluster is the
    # demo's own, so it is installed here (idempotent), and the catalog cache survives writes.
    cluster.psql(WATCH_SQL.read_text(), dbname=dbname)
    _say(f"DDL watch installed in database {dbname} (see: Masks after DDL made on the server)")
    certs = ensure_server_cert(state / "tls")
    pw_file = state / "upstream.pw"
    pw_file.write_text(SUPERUSER_PASSWORD)
    pw_file.chmod(0o600)
    root = Path(__file__).resolve().parent.parent
    admin_port = base.admin.port
    if not admin_port or not _port_free(admin_port):
        admin_port = free_port()
    opa = base.policy.opa_binary or (root / ".pgwarden" / "bin" / "opa")
    settings = load_settings(
        state_dir=state,
        listener={"host": "127.0.0.1", "port": port, "tls_cert": certs.cert, "tls_key": certs.key},
        # The approver's CLI talks to the admin listener: the demo always has one.
        admin={**base.admin.model_dump(), "port": admin_port},
        log=base.log.model_dump(),
        policy={"opa_binary": opa, "rego_dir": root / "rego", "bundle_dir": root / "bundles"},
        approval={"wait_seconds": DEMO_WAIT_SECONDS},
    )
    with ControlClient(settings) as control:
        control.add_target(
            Target(
                name="app",
                host="127.0.0.1",
                port=cluster.port,
                dbname=dbname,
                user=SUPERUSER,
                password_file=str(pw_file),
                sslmode="require",
                labels={"env": "demo"},
            ),
            replace=True,
        )
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="pgwarden", daemon=True)
    thread.start()
    gateway = Gateway(settings, os.environ)
    _say("starting pgwarden (OPA sidecar with the reference policy, SQLite audit store)")
    try:
        host, gw_port = asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(120)
    except OSError as exc:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        fail(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); choose another with --port")
    try:
        assert gateway.admin is not None and gateway.admin.address is not None
        admin_url = "http://{}:{}".format(*gateway.admin.address)
        _script(settings, host, gw_port, certs.ca_cert, admin_url)
        if not once:
            _serve_until_interrupted(settings, host, gw_port, certs.ca_cert)
    finally:
        _say("stopping pgwarden")
        asyncio.run_coroutine_threadsafe(gateway.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _issue(settings: Settings, subject: str, groups: list[str]) -> str:
    issuer = LocalTokenIssuer.from_settings(settings)
    try:
        return issuer.issue(subject, groups, 8 * 3600).token
    finally:
        issuer.close()


def _script(settings: Settings, host: str, port: int, ca: Path, admin_url: str) -> None:
    token = _issue(settings, "agent:demo", ["ai-agents"])
    approver = _issue(settings, "user:alice", ["engineers"])
    dsn = f"host=localhost port={port} dbname=app user=agent sslmode=verify-full sslrootcert={ca}"
    env = {**os.environ, "PGPASSWORD": token, "PGAPPNAME": "pgwarden-demo"}
    cli_env = {
        **os.environ,
        "PGWARDEN_STATE_DIR": str(settings.state_dir),
        "PGWARDEN_ADMIN_URL": admin_url,
        "PGWARDEN_TOKEN": approver,
    }
    _say()
    _say("== an AI agent (subject agent:demo, group ai-agents) connects with psql over TLS ==")
    for title, sql, approval in AGENT_STATEMENTS:
        _say()
        _say(f"-- {title}")
        _say(f"agent> {sql}")
        agent = _psql_started(dsn, sql, env)
        if approval is not None:
            _approve_from_cli(admin_url, approver, cli_env, *approval)
        output, _ = agent.communicate(timeout=DEMO_WAIT_SECONDS + 30)
        for line in output.strip().splitlines():
            _say(f"   {line}")
    _say()
    _say("== the audit trail of that session (pgwarden audit tail) ==")
    audit_env = {**os.environ, "PGWARDEN_STATE_DIR": str(settings.state_dir)}
    pgwarden = [sys.executable, "-m", "cli"]
    subprocess.run([*pgwarden, "audit", "tail", "-n", "30"], env=audit_env, check=False)
    _say()
    _say("== verifying the hash chain (pgwarden audit verify) ==")
    subprocess.run([*pgwarden, "audit", "verify"], env=audit_env, check=False)


def _psql_started(dsn: str, sql: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _approve_from_cli(
    admin_url: str, approver: str, cli_env: dict[str, str], verdict: str, note: str
) -> None:
    """What an approver does: find the held request, then approve or deny it with the CLI."""
    import httpx

    headers = {"Authorization": f"Bearer {approver}"}
    deadline = time.monotonic() + 30
    request_id = None
    while request_id is None and time.monotonic() < deadline:
        pending = httpx.get(
            f"{admin_url}/approvals?status=pending", headers=headers, timeout=10
        ).json()
        mine = [r for r in pending if r["principal"].get("subject") == "agent:demo"]
        if mine:
            request_id = mine[0]["id"]
        else:
            time.sleep(0.2)
    if request_id is None:
        _say("   (no request was held)")
        return
    pgwarden = [sys.executable, "-m", "cli", "approvals"]
    _say("   ... held. An engineer (user:alice) looks at it and decides:")
    _say(f"engineer> pgwarden approvals {verdict} {request_id} --note '{note}'")
    done = subprocess.run(
        [*pgwarden, verdict, request_id, "--note", note],
        capture_output=True,
        text=True,
        env=cli_env,
        check=False,
    )
    for line in (done.stdout + done.stderr).strip().splitlines():
        _say(f"   {line}")


def _serve_until_interrupted(settings: Settings, host: str, port: int, ca: Path) -> None:
    _say()
    _say(f"pgwarden is serving on {host}:{port}; target 'app'. Try, in another shell:")
    _say(f"  export PGWARDEN_STATE_DIR={settings.state_dir}")
    _say(
        "  export PGPASSWORD=$(.venv/bin/pgwarden tokens issue"
        " --subject me --group engineers --ttl 1h)"
    )
    _say(f'  psql "host=localhost port={port} dbname=app sslmode=verify-full sslrootcert={ca}"')
    _say("Ctrl-C stops everything the demo started.")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
