"""Rate limits (issue 11 item 4): statements per second (a token bucket) and concurrent
sessions, per principal and per token, from the policy's session rule. Over a limit the
client is refused at once with a clear error (53400 statements, 53300 sessions), never
queued; the limit recovers as the bucket refills or a session ends."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.harness import RunningGateway

from .conftest import AGENT_GUARDS

pytestmark = pytest.mark.server

TOO_MANY_STATEMENTS = "53400"
TOO_MANY_SESSIONS = "53300"
BURST = int(AGENT_GUARDS["statement_burst"])
RATE = float(AGENT_GUARDS["statements_per_second"])


def _agent_token(gw: RunningGateway, subject: str | None = None) -> str:
    return gw.token(subject or f"agent:{uuid.uuid4().hex[:8]}", groups=("ai-agents",))


def _connect(gw: RunningGateway, token: str) -> psycopg.Connection[Any]:
    return psycopg.connect(gw.dsn(token), autocommit=True, connect_timeout=10)


def _run_until_refused(conn: psycopg.Connection[Any], attempts: int) -> tuple[int, psycopg.Error]:
    """Statements as fast as the client can send them: how many the bucket let through
    before the first rate refusal, and that refusal. (One the audit trail could not take in
    time on a loaded machine, 58000, was let through by the bucket all the same.)"""
    for taken in range(attempts):
        try:
            conn.execute("SELECT 1")
        except psycopg.Error as exc:
            if exc.diag.sqlstate == TOO_MANY_STATEMENTS:
                return taken, exc
    raise AssertionError(f"{attempts} statements and no refusal")


def test_statement_rate_trips_and_recovers_psycopg(guarded_gateway: RunningGateway) -> None:
    token = _agent_token(guarded_gateway)
    with _connect(guarded_gateway, token) as conn:
        started = time.monotonic()
        ran, refusal = _run_until_refused(conn, 200)
        elapsed = time.monotonic() - started
        # The burst, plus what the bucket refilled while they ran (the login took none).
        assert BURST <= ran <= BURST + RATE * elapsed + 1
        assert refusal.diag.sqlstate == TOO_MANY_STATEMENTS
        message = refusal.diag.message_primary or ""
        assert message.startswith("pgwarden: rate limit:"), message
        assert "decision id:" in (refusal.diag.message_detail or "")
        # Not queued: refused again at once while the bucket is empty; the session stays.
        with pytest.raises(psycopg.Error) as again:
            conn.execute("SELECT 1")
        assert again.value.diag.sqlstate == TOO_MANY_STATEMENTS
        # One statement's worth of refill, and it runs.
        time.sleep(1.5 / RATE)
        row = conn.execute("SELECT 2").fetchone()
        assert row == (2,)


def test_a_query_of_several_statements_takes_one_each(guarded_gateway: RunningGateway) -> None:
    token = _agent_token(guarded_gateway)
    with _connect(guarded_gateway, token) as conn:
        too_many = "; ".join(["SELECT 1"] * (BURST + 1))
        with pytest.raises(psycopg.Error) as info:
            conn.execute(too_many)
        assert info.value.diag.sqlstate == TOO_MANY_STATEMENTS
        # Refused whole: the bucket is still full for the burst.
        for _ in range(BURST):
            conn.execute("SELECT 1")


def test_a_refusal_in_a_transaction_fails_it_as_an_error_would(
    guarded_gateway: RunningGateway,
) -> None:
    token = _agent_token(guarded_gateway)
    with _connect(guarded_gateway, token) as conn:
        conn.execute("BEGIN")
        ran, refusal = _run_until_refused(conn, 200)
        assert ran >= BURST - 1
        assert refusal.diag.sqlstate == TOO_MANY_STATEMENTS
        time.sleep(2.5 / RATE)
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.execute("ROLLBACK")


def test_statement_rate_is_per_principal_across_sessions_and_tokens_asyncpg(
    guarded_gateway: RunningGateway,
) -> None:
    """Two tokens of one principal share its bucket; extended-protocol Executes count."""
    subject = f"agent:{uuid.uuid4().hex[:8]}"
    first, second = _agent_token(guarded_gateway, subject), _agent_token(guarded_gateway, subject)
    other = _agent_token(guarded_gateway)

    async def scenario() -> tuple[int, str | None, int]:
        a = await asyncpg.connect(guarded_gateway.url(first))
        b = await asyncpg.connect(guarded_gateway.url(second))
        c = await asyncpg.connect(guarded_gateway.url(other))
        try:
            ran = 0
            refused: str | None = None
            for i in range(200):
                try:
                    await (a if i % 2 else b).fetchval("SELECT $1::int", i)
                except asyncpg.PostgresError as exc:
                    if exc.sqlstate == TOO_MANY_STATEMENTS:
                        refused = exc.sqlstate
                        break
                ran += 1  # taken from the bucket (run, or refused by a slow audit: 58000)
            # Another principal's bucket is its own.
            return ran, refused, await c.fetchval("SELECT $1::int", 7)
        finally:
            for conn in (a, b, c):
                await conn.close()

    ran, refused, other_ran = asyncio.run(scenario())
    assert refused == TOO_MANY_STATEMENTS
    assert ran >= BURST - 2  # asyncpg's own introspection may take one or two
    assert other_ran == 7


def test_sessions_per_token_trip_and_recover(guarded_gateway: RunningGateway) -> None:
    token = _agent_token(guarded_gateway)
    first = _connect(guarded_gateway, token)
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            _connect(guarded_gateway, token).close()
        assert "too many sessions: token" in str(info.value)
        first.execute("SELECT 1")
    finally:
        first.close()
    # The session ended: the token may open one again (the count is released at once).
    deadline = time.monotonic() + 10
    while True:
        try:
            with _connect(guarded_gateway, token) as again:
                assert again.execute("SELECT 1").fetchone() == (1,)
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_sessions_per_principal_asyncpg(guarded_gateway: RunningGateway) -> None:
    subject = f"agent:{uuid.uuid4().hex[:8]}"
    cap = int(AGENT_GUARDS["max_sessions_per_principal"])
    tokens = [_agent_token(guarded_gateway, subject) for _ in range(cap + 1)]

    async def scenario() -> tuple[str, int]:
        held = [await asyncpg.connect(guarded_gateway.url(t)) for t in tokens[:cap]]
        try:
            with pytest.raises(asyncpg.PostgresError) as info:
                await asyncpg.connect(guarded_gateway.url(tokens[cap]))
            assert info.value.sqlstate == TOO_MANY_SESSIONS
            refused = str(info.value)
        finally:
            await held.pop().close()
        try:
            late = await asyncpg.connect(guarded_gateway.url(tokens[cap]))
            value = int(await late.fetchval("SELECT 1"))
            held.append(late)
            return refused, value
        finally:
            for conn in held:
                await conn.close()

    refused, value = asyncio.run(scenario())
    assert f"too many sessions: principal {subject}" in refused
    assert value == 1
