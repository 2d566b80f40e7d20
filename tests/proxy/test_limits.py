"""Limits: an oversized message ends only its own session; 200 sessions at once come and go."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from cli.localpg import LocalCluster
from gateway.protocol import Query
from tests.harness import RunningGateway, start_gateway, stop_gateway

from .wire import Closed, RawClient, errors

pytestmark = pytest.mark.server

LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def small_gateway(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[RunningGateway]:
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-small-"))
    gw = start_gateway(state, pg_cluster, opa_binary, listener={"max_message_size": LIMIT})
    try:
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)


def test_oversized_query_gets_error_and_disconnect(small_gateway: RunningGateway) -> None:
    token = small_gateway.token()
    with psycopg.connect(small_gateway.dsn(token), autocommit=True, connect_timeout=10) as other:
        big = RawClient.connect(small_gateway.host, small_gateway.port, timeout=10)
        try:
            big.login("app", token)
            sql = "SELECT '" + "x" * (2 * LIMIT) + "'"
            # The gateway may close while we are still sending; its error is queued for us.
            with contextlib.suppress(ConnectionError):
                big.send(Query(sql.encode()).encode())
            frames = []
            try:
                while True:
                    frames.append(big.frame())
            except (Closed, ConnectionError):
                pass
            errs = errors(frames)
            assert len(errs) == 1, frames
            assert errs[0].severity == "FATAL" and errs[0].sqlstate == "54000"
            assert str(LIMIT) in (errs[0].message or "")
        finally:
            big.close()
        # The other session, and new ones, are unaffected.
        assert other.execute("SELECT 'other ok'").fetchone() == ("other ok",)
    with psycopg.connect(small_gateway.dsn(token), connect_timeout=10) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_message_just_under_the_limit_passes(small_gateway: RunningGateway) -> None:
    token = small_gateway.token()
    with psycopg.connect(small_gateway.dsn(token), autocommit=True, connect_timeout=10) as conn:
        value = "y" * (LIMIT - 1000)
        assert conn.execute("SELECT length(%s::text)", (value,)).fetchone() == (len(value),)


async def _until(check: Callable[[], Awaitable[bool]], seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        # Polling: the state lives on the gateway's thread and in another server.
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def _upstream_count(gateway: RunningGateway, app_name: str) -> int:
    direct = await asyncpg.connect(gateway.direct_dsn())
    try:
        return int(
            await direct.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name
            )
        )
    finally:
        await direct.close()


async def test_200_idle_connections(gateway: RunningGateway, admin_token: str) -> None:
    ctx = gateway.gateway.context
    assert ctx is not None
    sessions_before, keys_before = len(ctx.sessions), len(ctx.cancel_keys)
    dsn = gateway.dsn(admin_token, application_name="idle-200")
    conns = await asyncio.gather(
        *(psycopg.AsyncConnection.connect(dsn, connect_timeout=30) for _ in range(200))
    )
    try:
        assert len({c.info.backend_pid for c in conns}) == 200
        assert await _upstream_count(gateway, "idle-200") == 200
        assert len(ctx.sessions) >= sessions_before + 200
    finally:
        await asyncio.gather(*(c.close() for c in conns))

    # The gateway forgets them: no session objects, cancel keys or upstream backends left.
    async def released() -> bool:
        return (
            len(ctx.sessions) <= sessions_before
            and len(ctx.cancel_keys) <= keys_before
            and await _upstream_count(gateway, "idle-200") == 0
        )

    await _until(released)
    conn = await asyncpg.connect(gateway.url(admin_token), timeout=10)
    try:
        assert await conn.fetchval("SELECT 'still serving'") == "still serving"
    finally:
        await conn.close()


async def test_200_sessions_query_at_once(gateway: RunningGateway, admin_token: str) -> None:
    """A burst of first statements from 200 sessions is answered, not refused."""
    conns = await asyncio.gather(
        *(asyncpg.connect(gateway.url(admin_token), timeout=30) for _ in range(200))
    )
    try:
        results = await asyncio.gather(
            *(c.fetchval("SELECT pg_backend_pid()") for c in conns), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == [], f"{len(failures)} of 200 failed, first: {failures[:1]}"
        assert len(set(results)) == 200
    finally:
        await asyncio.gather(*(c.close() for c in conns))
