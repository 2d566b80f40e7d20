"""Two gateways sharing a PostgreSQL control store, driven by the real CLI: a token revoked
through it is refused by the other gateway at its next statement, a target added through it
is usable through the other (and gone once removed); the store going down: new logins
refused with a clear error, running sessions go on; and a state directory from before the
registry moved into the control store keeps its tokens (and revocations)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import psycopg
import pytest
from typer.testing import CliRunner, Result

from cli.localpg import APP_DB, SUPERUSER, SUPERUSER_PASSWORD, LocalCluster, free_port
from cli.main import app
from gateway.identity.signing_key import SIGNING_KEY_FILE, LocalSigningKey
from gateway.settings import load_settings
from tests.harness import (
    RunningGateway,
    TcpRelay,
    create_scratch_database,
    drop_scratch_database,
    gateways_sharing_control,
    start_gateway,
    stop_gateway,
)

pytestmark = pytest.mark.server

# The statement-path checks must learn of a change by NOTIFY: the poll is set slower than
# any test, so a test passing within its wait is not the poll's doing.
SLOW_POLL = {"revocation_poll_seconds": 300}
CONTROL_UNAVAILABLE = "58000"


def pgwarden(gw: RunningGateway, *args: str, env: dict[str, str] | None = None) -> Result:
    """The CLI against the control store `gw` uses (its state directory for the key)."""
    result = cli(gw, *args, env=env)
    assert result.exit_code == 0, result.output
    return result


def cli(gw: RunningGateway, *args: str, env: dict[str, str] | None = None) -> Result:
    control = gw.settings.control
    return CliRunner().invoke(
        app,
        list(args),
        env={
            "PGWARDEN_STATE_DIR": str(gw.settings.state_dir),
            "PGWARDEN_CONTROL__STORE": control.store,
            "PGWARDEN_CONTROL__POSTGRES_DSN": control.postgres_dsn,
            "PGWARDEN_CONFIG": None,
            **(env or {}),
        },
    )


def wait_until(what: str, done: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def pair(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[tuple[RunningGateway, RunningGateway]]:
    with gateways_sharing_control(
        pg_cluster, opa_binary, two={"identity": SLOW_POLL, "instance": "gw-2"}
    ) as pair:
        yield pair


def admin_url(gw: RunningGateway) -> str:
    assert gw.gateway.admin is not None and gw.gateway.admin.address is not None
    host, port = gw.gateway.admin.address
    return f"http://{host}:{port}"


def issue(gw: RunningGateway, subject: str, group: str = "admins") -> tuple[str, str]:
    token = pgwarden(gw, "tokens", "issue", "--subject", subject, "--group", group).stdout
    token = token.strip()
    return token, str(jwt.decode(token, options={"verify_signature": False})["jti"])


def refusal(connect: Callable[[], Any]) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as caught:
        connect()
    return caught.value


def test_a_token_revoked_through_one_is_refused_by_the_other_at_its_next_statement(
    pair: tuple[RunningGateway, RunningGateway],
) -> None:
    one, two = pair
    token, jti = issue(one, "agent:shared")
    with (
        psycopg.connect(one.dsn(token), autocommit=True) as on_one,
        psycopg.connect(two.dsn(token), autocommit=True) as on_two,
    ):
        assert on_two.execute("SELECT 1").fetchone() == (1,)
        assert on_one.execute("SELECT 2").fetchone() == (2,)
        pgwarden(one, "tokens", "revoke", jti)
        revoked = time.monotonic()
        wait_until(
            "gw-2 told of the revocation",
            lambda: (
                two.gateway.mirror is not None and two.gateway.mirror.rejection(jti) is not None
            ),
        )
        # Measured, not asserted: how long the notification took to reach gw-2.
        print(f"revocation seen by gw-2 {1000 * (time.monotonic() - revoked):.1f} ms after")
        # Its next statement: the session ends with FATAL 28P01, as on a single gateway.
        error = refusal(lambda: on_two.execute("SELECT 1"))
        assert "token revoked" in str(error), error
        assert on_two.closed or on_two.broken
    # A new login through either gateway is refused at once: logins ask the store itself.
    for gw in (one, two):
        error = refusal(lambda gw=gw: psycopg.connect(gw.dsn(token)))  # type: ignore[misc]
        assert "token revoked" in str(error), error


def test_a_token_issued_through_the_cli_logs_in_through_either_gateway(
    pair: tuple[RunningGateway, RunningGateway],
) -> None:
    one, two = pair
    token, _ = issue(one, "svc:both", "engineers")
    for gw in (one, two):
        with psycopg.connect(gw.dsn(token), autocommit=True) as conn:
            assert conn.execute("SELECT current_user IS NOT NULL").fetchone() == (True,)


def test_a_target_added_through_the_cli_is_usable_through_the_other_gateway(
    pair: tuple[RunningGateway, RunningGateway], pg_cluster: LocalCluster
) -> None:
    one, two = pair
    token, _ = issue(one, "user:ops")
    name = f"added_{time.time_ns() % 10**9}"
    env = {"PGWARDEN_TEST_UPSTREAM_PW": SUPERUSER_PASSWORD}
    pgwarden(
        one, "targets", "add", name, "--port", str(pg_cluster.port), "--dbname", APP_DB,
        "--user", SUPERUSER, "--password-env", "PGWARDEN_TEST_UPSTREAM_PW",
        "--sslmode", "disable", "--label", "env=shared", env=env,
    )  # fmt: skip
    # Told by NOTIFY, before any client asks for it.
    wait_until(
        "gw-2 told of the new target",
        lambda: two.gateway.mirror is not None and two.gateway.mirror.get(name) is not None,
    )
    with psycopg.connect(two.dsn(token, target=name), autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (APP_DB,)
    listed = pgwarden(two, "targets", "list", "--json").stdout
    assert name in listed
    pgwarden(one, "targets", "remove", name)
    wait_until(
        "gw-2 told of the removal",
        lambda: two.gateway.mirror is not None and two.gateway.mirror.get(name) is None,
    )
    error = refusal(lambda: psycopg.connect(two.dsn(token, target=name)))
    assert f'no target named "{name}"' in str(error), error


@pytest.fixture
def behind_relay(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[tuple[RunningGateway, TcpRelay, str]]:
    """A gateway whose PostgreSQL control store is reached through a relay the test can
    close (the store "down") and open again on the same port."""
    name, dsn = create_scratch_database(pg_cluster, "pgwarden_control")
    relay = TcpRelay(pg_cluster.port)
    relayed = dsn.replace(f":{pg_cluster.port}/", f":{relay.port}/")
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-down-"))
    gw = None
    try:
        gw = start_gateway(
            state,
            pg_cluster,
            opa_binary,
            control={"store": "postgres", "postgres_dsn": relayed},
            identity={"revocation_poll_seconds": 0.1},
            admin={"port": free_port()},
        )
        yield gw, relay, name
    finally:
        if gw is not None:
            stop_gateway(gw)
        relay.close()
        shutil.rmtree(state, ignore_errors=True)
        drop_scratch_database(pg_cluster, name)


def test_control_store_down_logins_fail_closed_and_running_sessions_go_on(
    behind_relay: tuple[RunningGateway, TcpRelay, str], pg_cluster: LocalCluster
) -> None:
    gw, relay, control_db = behind_relay
    token, _ = issue(gw, "user:steady")
    with psycopg.connect(gw.dsn(token), autocommit=True) as running:
        assert running.execute("SELECT 1").fetchone() == (1,)
        # Down: nothing new reaches the store, and what was connected is cut.
        relay.close()
        with psycopg.connect(pg_cluster.dsn(dbname="postgres"), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (control_db,),
            )
        mirror = gw.gateway.mirror
        assert mirror is not None
        wait_until("the gateway sees the store down", lambda: mirror.problem is not None)
        error = refusal(lambda: psycopg.connect(gw.dsn(token)))
        assert isinstance(error, psycopg.OperationalError)
        assert "control store" in str(error) and "cannot be read" in str(error), error
        # Another driver reads the SQLSTATE of the refusal.
        with pytest.raises(asyncpg.PostgresError) as by_asyncpg:
            asyncio.run(asyncpg.connect(gw.url(token)))
        assert by_asyncpg.value.sqlstate == CONTROL_UNAVAILABLE, by_asyncpg.value
        # The CLI says so in one line, too.
        listed = cli(gw, "tokens", "list")
        assert listed.exit_code == 1 and "control store is unreachable" in listed.stderr
        # Readiness names it, so a load balancer sends new clients elsewhere.
        ready = httpx.get(admin_url(gw) + "/readyz")
        assert ready.status_code == 503
        assert "control store" in ready.json()["not_ready"]["targets"], ready.text
        # The session that was running keeps working: its statements need no store.
        for n in range(3):
            assert running.execute("SELECT %s::int", (n,)).fetchone() == (n,)
        # Back: logins work again without a restart.
        back = TcpRelay(pg_cluster.port, port=relay.port)
        try:
            wait_until("the gateway sees the store back", lambda: mirror.problem is None)
            with psycopg.connect(gw.dsn(token), autocommit=True) as again:
                assert again.execute("SELECT 1").fetchone() == (1,)
            assert running.execute("SELECT 4").fetchone() == (4,)
            assert httpx.get(admin_url(gw) + "/readyz").status_code == 200
        finally:
            back.close()


def old_registry_token(state: Path, jti: str, revoked_at: float | None) -> str:
    """A token signed with the state directory's key and recorded in `tokens.sqlite3`, as
    `pgwarden tokens issue` did before the registry moved into the control store."""
    settings = load_settings(state_dir=state)
    key = LocalSigningKey.load_or_create(settings.state_path(SIGNING_KEY_FILE))
    now = int(time.time())
    db = sqlite3.connect(state / "tokens.sqlite3")
    with db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS tokens (jti TEXT PRIMARY KEY, subject TEXT NOT NULL,"
            " groups TEXT NOT NULL, issued_at REAL NOT NULL, expires_at REAL NOT NULL,"
            " revoked_at REAL)"
        )
        db.execute(
            "INSERT INTO tokens VALUES (?, 'agent:old', '[\"admins\"]', ?, ?, ?)",
            (jti, now, now + 3600, revoked_at),
        )
    db.close()
    claims = {
        "iss": settings.identity.local_issuer,
        "aud": settings.identity.local_audience,
        "sub": "agent:old",
        "groups": ["admins"],
        "jti": jti,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
    }
    return jwt.encode(claims, key.private_key, algorithm="EdDSA", headers={"kid": key.kid})


def test_a_state_directory_from_before_the_move_keeps_its_tokens(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> None:
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-old-"))
    try:
        kept = old_registry_token(state, "old-kept", None)
        revoked = old_registry_token(state, "old-revoked", 1.0)
        gw = start_gateway(state, pg_cluster, opa_binary)
        try:
            with psycopg.connect(gw.dsn(kept), autocommit=True) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            error = refusal(lambda: psycopg.connect(gw.dsn(revoked)))
            assert "token revoked" in str(error), error
            assert (state / "tokens.sqlite3.imported").exists()
            assert not (state / "tokens.sqlite3").exists()
            listed = pgwarden(gw, "tokens", "list", "--json").stdout
            assert "old-kept" in listed and "old-revoked" in listed
        finally:
            stop_gateway(gw)
    finally:
        shutil.rmtree(state, ignore_errors=True)
