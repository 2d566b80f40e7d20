"""The kill switch (issue 11 item 5): `pgwarden sessions list` and `sessions kill` through
the admin API of a real gateway; the killed session's running query is gone from
pg_stat_activity, the client gets a FATAL that says why, and the kill is audited."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import orjson
import psycopg
import pytest

from cli.localpg import free_port
from tests.harness import RunningGateway, start_gateway, stop_gateway
from tests.integration.test_audit_support import pgwarden, store_env

pytestmark = pytest.mark.server

T = TypeVar("T")
SLEEP = "SELECT pg_sleep(600)"


@pytest.fixture(scope="module")
def admin_gw(pg_cluster: Any, app_database: str, opa_binary: Path) -> Iterator[RunningGateway]:
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-kill-"))
    gw = start_gateway(
        state, pg_cluster, opa_binary, admin={"host": "127.0.0.1", "port": free_port()}
    )
    try:
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)


def _wait_for(probe: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _admin_url(gw: RunningGateway) -> str:
    assert gw.gateway.admin is not None and gw.gateway.admin.address is not None
    host, port = gw.gateway.admin.address
    return f"http://{host}:{port}"


def _cli(gw: RunningGateway, *args: str) -> tuple[int, str, str]:
    """`pgwarden sessions ...` as an operator on the gateway's host: no token given, so the
    command signs one for cli:$USER with the gateway's key."""
    env = {**store_env(gw.settings), "PGWARDEN_CONFIG": ""}
    return pgwarden(env, "sessions", *args, "--admin-url", _admin_url(gw))


def _running(gw: RunningGateway, application: str) -> list[str]:
    """The upstream backends of sessions named `application` that run pg_sleep now."""
    with psycopg.connect(gw.direct_dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT query FROM pg_stat_activity WHERE application_name = %s"
            " AND state = 'active' AND query LIKE '%%pg_sleep%%'",
            (application,),
        ).fetchall()
    return [str(r[0]) for r in rows]


def _listed(gw: RunningGateway) -> list[dict[str, Any]]:
    code, out, err = _cli(gw, "list", "--json")
    assert code == 0, err
    sessions: list[dict[str, Any]] = orjson.loads(out)
    return sessions


def _audited_kills(gw: RunningGateway) -> list[dict[str, Any]]:
    code, out, err = pgwarden(
        {**store_env(gw.settings), "PGWARDEN_CONFIG": ""}, "audit", "export", "--format", "jsonl"
    )
    assert code == 0, err
    records = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    return [r for r in records if "session_kill" in orjson.dumps(r).decode()]


def test_kill_cancels_the_running_query_upstream_psycopg(admin_gw: RunningGateway) -> None:
    application = f"kill-{uuid.uuid4().hex[:8]}"
    token = admin_gw.token("user:runaway", groups=("engineers",))
    conn = psycopg.connect(
        admin_gw.dsn(token, application_name=application), autocommit=True, connect_timeout=10
    )
    caught: list[BaseException] = []

    def run() -> None:
        try:
            conn.execute(SLEEP)
        except BaseException as exc:  # the test reads what the client got
            caught.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        _wait_for(lambda: _running(admin_gw, application), "pg_sleep upstream")
        mine = _wait_for(
            lambda: [
                s
                for s in _listed(admin_gw)
                if s["application_name"] == application and s["current_statement"] == SLEEP
            ],
            "the session listed with its current statement",
        )
        session = mine[0]
        assert session["subject"] == "user:runaway"
        assert session["groups"] == ["engineers"]
        assert session["target"] == "app"
        assert session["since"] <= time.time()
        assert session["statements"] >= 0 and session["rows"] >= 0

        code, out, err = _cli(admin_gw, "kill", session["id"], "--reason", "runaway query")
        assert code == 0, err
        assert out.strip() == f"killed {session['id']}"
        worker.join(20)
        assert not worker.is_alive()
        # Cancelled upstream, not left running behind a closed socket.
        _wait_for(lambda: not _running(admin_gw, application), "pg_sleep gone upstream")
        assert len(caught) == 1
        exc = caught[0]
        assert isinstance(exc, psycopg.Error)
        assert exc.diag.sqlstate == "57P01", exc
        assert exc.diag.severity == "FATAL"
        assert "runaway query" in str(exc)
        assert not [s for s in _listed(admin_gw) if s["id"] == session["id"]]
        kills = _wait_for(
            lambda: [
                k for k in _audited_kills(admin_gw) if session["id"] in orjson.dumps(k).decode()
            ],
            "the kill in the audit trail",
        )
        text = orjson.dumps(kills[0]).decode()
        assert "runaway query" in text and "cli:" in text
    finally:
        conn.close()


def test_kill_by_subject_asyncpg(admin_gw: RunningGateway) -> None:
    """Every session of the subject ends, a running one with its query cancelled; another
    principal's session goes on."""
    application = f"kill-{uuid.uuid4().hex[:8]}"
    subject = f"agent:{uuid.uuid4().hex[:6]}"
    token = admin_gw.token(subject, groups=("engineers",))
    bystander = admin_gw.token("user:bystander", groups=("engineers",))

    async def scenario() -> tuple[BaseException, BaseException, int]:
        settings = {"application_name": application}
        busy = await asyncpg.connect(admin_gw.url(token), server_settings=settings)
        idle = await asyncpg.connect(admin_gw.url(token), server_settings=settings)
        other = await asyncpg.connect(admin_gw.url(bystander))
        try:
            sleeping = asyncio.ensure_future(busy.fetchval(SLEEP))
            await asyncio.to_thread(
                _wait_for, lambda: _running(admin_gw, application), "pg_sleep upstream"
            )
            code, out, err = await asyncio.to_thread(
                _cli, admin_gw, "kill", "--subject", subject, "--reason", "agent off the rails"
            )
            assert code == 0, err
            assert len(out.split()) == 4  # "killed <id>" twice
            with pytest.raises(Exception) as busy_error:
                await asyncio.wait_for(sleeping, 20)
            with pytest.raises(Exception) as idle_error:
                await idle.fetchval("SELECT 1")
            return busy_error.value, idle_error.value, await other.fetchval("SELECT 1")
        finally:
            for c in (busy, idle, other):
                c.terminate()

    busy_error, idle_error, still = asyncio.run(scenario())
    assert "agent off the rails" in str(busy_error)
    assert isinstance(idle_error, (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError))
    assert still == 1
    _wait_for(lambda: not _running(admin_gw, application), "pg_sleep gone upstream")


def test_the_kill_switch_needs_an_admin_token(admin_gw: RunningGateway) -> None:
    """Even on loopback, where /metrics is open: a kill names who made it."""
    url = _admin_url(admin_gw)
    assert httpx.get(url + "/sessions", timeout=10).status_code == 401
    body = {"subject": "user:anyone"}
    assert httpx.post(url + "/sessions/kill", json=body, timeout=10).status_code == 401
    engineer = admin_gw.token("user:eng", groups=("engineers",))
    headers = {"authorization": f"Bearer {engineer}"}
    answer = httpx.post(url + "/sessions/kill", json=body, headers=headers, timeout=10)
    assert answer.status_code == 403
    admin = {"authorization": f"Bearer {admin_gw.token('user:admin', groups=('admins',))}"}
    missing = httpx.post(url + "/sessions/kill", json=body, headers=admin, timeout=10)
    assert missing.status_code == 404
    both = {"subject": "x", "session_id": "y"}
    assert (
        httpx.post(url + "/sessions/kill", json=both, headers=admin, timeout=10).status_code == 422
    )


def test_kill_cli_usage_errors(admin_gw: RunningGateway) -> None:
    code, _, err = _cli(admin_gw, "kill")
    assert code == 2 and "--subject" in err
    code, _, err = _cli(admin_gw, "kill", "no-such-session")
    assert code == 1 and "404" in err
