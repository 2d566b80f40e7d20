"""Cost estimates in the policy input (issue 11 item 2), with the reference policy: an
ai-agent's read that the server estimates above the bundle's row threshold asks for
approval, a small one runs; the estimate is kept, so a known statement is judged by it
even where it could not be explained again (inside a transaction)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.harness import RunningGateway

pytestmark = pytest.mark.server

BIG = "SELECT g FROM pgw_estimate_big"
SMALL = "SELECT g FROM pgw_estimate_big WHERE g < 10"
OVER = "ai-agents may not run reads estimated at more than 100000 rows without approval"


@pytest.fixture(scope="module", autouse=True)
def big_table(gateway: RunningGateway) -> Iterator[None]:
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS pgw_estimate_big")
        conn.execute("CREATE TABLE pgw_estimate_big AS SELECT generate_series(1, 200000) g")
        conn.execute("ANALYZE pgw_estimate_big")
    yield
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS pgw_estimate_big")


@pytest.fixture(scope="module")
def agent(gateway: RunningGateway) -> str:
    return gateway.token("agent:estimates", groups=("ai-agents",))


def _connect(gw: RunningGateway, token: str) -> psycopg.Connection[Any]:
    return psycopg.connect(gw.dsn(token), autocommit=True, connect_timeout=10)


def _assert_approval(exc: BaseException) -> None:
    assert isinstance(exc, psycopg.Error), exc
    assert exc.diag.sqlstate == "42501"
    assert exc.diag.message_primary == f"pgwarden: approval required: {OVER}"


def test_a_read_estimated_over_the_threshold_asks_approval_psycopg(
    gateway: RunningGateway, agent: str
) -> None:
    with _connect(gateway, agent) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(BIG)
        _assert_approval(info.value)
        rows = conn.execute(SMALL).fetchall()
        assert [r[0] for r in rows] == list(range(1, 10))


def test_the_estimate_is_kept_for_the_statement(gateway: RunningGateway, agent: str) -> None:
    """Explained once between transactions; inside one (where pgwarden does not explain)
    the kept estimate still decides."""
    with _connect(gateway, agent) as conn:
        with pytest.raises(psycopg.Error):
            conn.execute(BIG)
        conn.execute("BEGIN")
        with pytest.raises(psycopg.Error) as info:
            conn.execute(BIG)
        _assert_approval(info.value)
        conn.execute("ROLLBACK")


def test_estimates_asyncpg(gateway: RunningGateway, agent: str) -> None:
    async def scenario() -> tuple[str, int]:
        conn = await asyncpg.connect(gateway.url(agent))
        try:
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.execute(BIG)  # no arguments: a simple-protocol Query
            return str(info.value), len(await conn.fetch(SMALL))
        finally:
            await conn.close()

    refused, small = asyncio.run(scenario())
    assert refused.startswith(f"pgwarden: approval required: {OVER}")
    assert small == 9


def test_other_groups_are_not_estimated(gateway: RunningGateway) -> None:
    engineer = gateway.token("user:estimates", groups=("engineers",))
    with _connect(gateway, engineer) as conn:
        assert len(conn.execute(BIG).fetchall()) == 200000
