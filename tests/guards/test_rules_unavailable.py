"""The session rule cannot be read at login (OPA down, a malformed answer): the login goes
on as it always has with OPA down, but no statement runs until the rule is read; then an
empty rule lets the session go on, and guards end it (they can only be set at login)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.harness import RunningGateway, start_gateway, stop_gateway
from tests.integration import ALLOW_ALL, FaultServer, http_answer

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def faulty(
    pg_cluster: Any, app_database: str, opa_binary: Path
) -> Iterator[tuple[RunningGateway, FaultServer]]:
    server = FaultServer(reply=ALLOW_ALL)
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-rules-"))
    gw = start_gateway(
        state, pg_cluster, opa_binary, policy={"opa_url": server.url, "timeout_seconds": 0.5}
    )
    try:
        yield gw, server
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)
        server.close()


def _connect(gw: RunningGateway) -> psycopg.Connection[Any]:
    token = gw.token("agent:rules", groups=("ai-agents",))
    return psycopg.connect(gw.dsn(token), autocommit=True, connect_timeout=10)


@pytest.mark.parametrize(
    "unreadable",
    [None, http_answer("200 OK", b'{"result": {"statement_timeout_ms": "soon"}}')],
    ids=["hang-up", "malformed"],
)
def test_statements_wait_for_the_rule_then_run(
    faulty: tuple[RunningGateway, FaultServer], unreadable: bytes | None
) -> None:
    gw, server = faulty
    server.session_reply = unreadable
    try:
        with _connect(gw) as conn:
            with pytest.raises(psycopg.Error) as info:
                conn.execute("SELECT 1")
            assert info.value.diag.sqlstate == "42501"
            assert "session rules unavailable" in (info.value.diag.message_primary or "")
            assert "decision id:" in (info.value.diag.message_detail or "")
            server.session_reply = http_answer("200 OK", b"{}")
            assert conn.execute("SELECT 2").fetchone() == (2,)
    finally:
        server.session_reply = http_answer("200 OK", b"{}")


def test_guards_read_after_login_end_the_session(
    faulty: tuple[RunningGateway, FaultServer],
) -> None:
    gw, server = faulty
    server.session_reply = None
    try:
        with _connect(gw) as conn:
            server.session_reply = http_answer(
                "200 OK", b'{"result": {"default_transaction_read_only": true}}'
            )
            with pytest.raises(psycopg.Error) as info:
                conn.execute("SELECT 1")
            assert info.value.diag.sqlstate == "57P01"
            assert "reconnect" in str(info.value)
        # A new session starts with them.
        with _connect(gw) as conn:
            row = conn.execute("SHOW default_transaction_read_only").fetchone()
            assert row == ("on",)
    finally:
        server.session_reply = http_answer("200 OK", b"{}")
