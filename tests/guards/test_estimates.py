"""Cost estimates in the policy input (issue 11 item 2), with the reference policy: an
ai-agent's read that the server estimates above the bundle's row threshold asks for
approval, a small one runs, whether its literals are in its text or sent as parameters
(judged by the generic plan), between transactions or inside a block; the estimate is
kept, so a known statement is not explained again; and the client sees no trace of the
estimate: not in its transaction, its prepared statements, its settings or its notices."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from cli.localpg import LocalCluster
from tests.guards.conftest import gateway_with_data
from tests.harness import RunningGateway

pytestmark = pytest.mark.server

BIG = "SELECT g FROM pgw_estimate_big"
SMALL = "SELECT g FROM pgw_estimate_big WHERE g < 10"
# Every row but one: its generic plan says so (199999 rows). A plan for the value NULL would
# fold `g <> NULL` to false and say 0 rows, and the read would pass as small.
BIG_PARAM = "SELECT g FROM pgw_estimate_big WHERE g <> $1"
SMALL_PARAM = "SELECT g FROM pgw_estimate_big WHERE g = $1"
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


def test_a_parameterized_big_read_asks_approval_psycopg(
    gateway: RunningGateway, agent: str
) -> None:
    with _connect(gateway, agent) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(BIG_PARAM.replace("$1", "%s"), (5,))
        _assert_approval(info.value)
        rows = conn.execute(SMALL_PARAM.replace("$1", "%s"), (5,)).fetchall()
        assert rows == [(5,)]


def test_a_parameterized_big_read_asks_approval_asyncpg(
    gateway: RunningGateway, agent: str
) -> None:
    async def scenario() -> tuple[str, list[int]]:
        conn = await asyncpg.connect(gateway.url(agent))
        try:
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.fetch(BIG_PARAM, 5)
            small = [r[0] for r in await conn.fetch(SMALL_PARAM, 5)]
            # Again: asyncpg's prepared statement, its estimate known.
            small += [r[0] for r in await conn.fetch(SMALL_PARAM, 6)]
            return str(info.value), small
        finally:
            await conn.close()

    refused, small = asyncio.run(scenario())
    assert refused.startswith(f"pgwarden: approval required: {OVER}")
    assert small == [5, 6]


@pytest.mark.parametrize(
    "begin",
    ["BEGIN", "BEGIN ISOLATION LEVEL REPEATABLE READ", "BEGIN ISOLATION LEVEL SERIALIZABLE"],
)
def test_a_big_read_inside_a_block_asks_approval_psycopg(
    gateway: RunningGateway, agent: str, begin: str
) -> None:
    """A fresh session (nothing kept): the read is explained inside the block."""
    with _connect(gateway, agent) as conn:
        conn.execute(begin)
        assert conn.execute(SMALL).fetchall() == [(g,) for g in range(1, 10)]
        with pytest.raises(psycopg.Error) as info:
            conn.execute(BIG)
        _assert_approval(info.value)
        conn.execute("ROLLBACK")
        conn.execute(begin)
        with pytest.raises(psycopg.Error) as info:
            conn.execute(BIG_PARAM.replace("$1", "%s"), (7,))
        _assert_approval(info.value)
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_big_read_inside_a_block_asks_approval_asyncpg(
    gateway: RunningGateway, agent: str
) -> None:
    async def scenario() -> tuple[str, str, int]:
        conn = await asyncpg.connect(gateway.url(agent))
        try:
            with pytest.raises(asyncpg.PostgresError) as simple:
                async with conn.transaction():
                    await conn.execute(BIG)
            with pytest.raises(asyncpg.PostgresError) as extended:
                async with conn.transaction(isolation="repeatable_read"):
                    await conn.fetch(BIG_PARAM, 5)
            return str(simple.value), str(extended.value), len(await conn.fetch(SMALL))
        finally:
            await conn.close()

    simple, extended, small = asyncio.run(scenario())
    assert simple.startswith(f"pgwarden: approval required: {OVER}")
    assert extended.startswith(f"pgwarden: approval required: {OVER}")
    assert small == 9


def test_a_read_in_a_failed_transaction_gets_the_servers_answer(
    gateway: RunningGateway, agent: str
) -> None:
    """Nothing is explained there: the server rejects the statement, as it would direct."""
    with _connect(gateway, agent) as conn:
        conn.execute("BEGIN")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute(BIG)
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute(BIG_PARAM.replace("$1", "%s"), (3,))
        conn.execute("ROLLBACK")
        assert conn.execute(SMALL).fetchall() == [(g,) for g in range(1, 10)]


@pytest.fixture(scope="module")
def estimating_gateway(pg_cluster: LocalCluster, opa_binary: Path) -> Iterator[RunningGateway]:
    """The reference policy with estimates asked for admins too, whom it allows everything:
    what a statement's estimate did is seen in the server's answers, not in a decision."""

    def admins_estimated(data: dict[str, Any]) -> None:
        data["session_guards"]["admins"] = {"estimate_seq_scan_rows": 100000}

    with gateway_with_data(
        pg_cluster, opa_binary, "pgwarden-gw-estimates-", admins_estimated
    ) as gw:
        yield gw


def test_an_explain_error_inside_a_block_leaves_it_usable(
    estimating_gateway: RunningGateway,
) -> None:
    """The SELECT is explained before the Query runs, when its table does not exist yet: the
    EXPLAIN fails inside pgwarden's savepoint, and the client's block goes on."""
    admin = estimating_gateway.token("user:estimates-admin", groups=("admins",))

    async def scenario() -> tuple[int, list[str], str]:
        conn = await asyncpg.connect(estimating_gateway.url(admin))
        try:
            async with conn.transaction():
                await conn.execute(
                    "CREATE TEMP TABLE pgw_estimate_later AS SELECT 41 AS a;"
                    " SELECT a FROM pgw_estimate_later"
                )
                first = await conn.fetchval("SELECT a + 1 FROM pgw_estimate_later")
            ours = await conn.fetch(
                "SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgwarden%'"
            )
            return first, [r[0] for r in ours], await conn.fetchval("SHOW plan_cache_mode")
        finally:
            await conn.close()

    first, ours, mode = asyncio.run(scenario())
    assert first == 42
    assert ours == []
    assert mode == "auto"


def _explains(cluster: LocalCluster, pid: int) -> int:
    """How many of pgwarden's EXPLAINs the server logged for backend `pid` (log_statement
    = all; the default log_line_prefix carries the pid)."""
    log = (cluster.base_dir / "postgres.log").read_text(errors="replace")
    return len(
        re.findall(rf"\[{pid}\] LOG:  (?:statement|execute [^:]*): EXPLAIN \(FORMAT JSON", log)
    )


def test_a_known_shape_is_not_explained_again(
    estimating_gateway: RunningGateway, pg_cluster: LocalCluster
) -> None:
    """Counted in the server's own log, not timed: a text, or a parameterized shape, is
    explained once; its later runs (the prepared one on the planned fast path) explain
    nothing."""
    admin = estimating_gateway.token("user:estimates-log", groups=("admins",))
    with _connect(estimating_gateway, admin) as conn:
        conn.execute("SET log_statement = 'all'")
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        pid = int(row[0])
        before = _explains(pg_cluster, pid)
        for _ in range(3):
            conn.execute(SMALL).fetchall()
        assert _explains(pg_cluster, pid) == before + 1
        for value in (3, 4, 5, 6, 7, 8):
            conn.execute(SMALL_PARAM.replace("$1", "%s"), (value,), prepare=True).fetchall()
        assert _explains(pg_cluster, pid) == before + 2
        # A new literal is a new text: explained (literals decide its estimate).
        conn.execute(SMALL.replace("10", "11")).fetchall()
        assert _explains(pg_cluster, pid) == before + 3


def test_an_estimate_leaves_no_trace(
    estimating_gateway: RunningGateway, pg_cluster: LocalCluster
) -> None:
    """Inside a block: the client's savepoint of pgwarden's own savepoint name, its prepared
    statements and its plan_cache_mode are as it left them, no notice reaches it, and its
    transaction is still open and usable after new shapes were explained (the server's log
    shows they were)."""
    admin = estimating_gateway.token("user:estimates-trace", groups=("admins",))
    notices: list[str] = []
    with _connect(estimating_gateway, admin) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("SET log_statement = 'all'")
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        pid = int(row[0])
        conn.execute("SET plan_cache_mode = force_custom_plan")
        conn.execute("PREPARE pgw_client_own AS SELECT 1")
        conn.execute("BEGIN")
        conn.execute("SAVEPOINT pgwarden_estimate")
        conn.execute("CREATE TEMP TABLE pgw_estimate_trace (a int)")
        params = [
            (SMALL_PARAM, (4,)),
            ("SELECT g FROM pgw_estimate_big WHERE g < %s AND g > 199995", (8,)),
            ("SELECT g FROM pgw_estimate_big WHERE g = 12", ()),
        ]
        before = _explains(pg_cluster, pid)
        for text, values in params:
            conn.execute(text.replace("$1", "%s"), values).fetchall()
        assert _explains(pg_cluster, pid) == before + len(params)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert conn.execute("SHOW plan_cache_mode").fetchone() == ("force_custom_plan",)
        names = conn.execute("SELECT name FROM pg_prepared_statements ORDER BY name").fetchall()
        assert names == [("pgw_client_own",)]
        # The client's own savepoint is still the one its name reaches.
        conn.execute("ROLLBACK TO SAVEPOINT pgwarden_estimate")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT a FROM pgw_estimate_trace")
        conn.execute("ROLLBACK")
        assert conn.execute("EXECUTE pgw_client_own").fetchone() == (1,)
        assert conn.execute("SHOW plan_cache_mode").fetchone() == ("force_custom_plan",)
    assert notices == []


def test_reads_by_other_names_are_estimated(gateway: RunningGateway, agent: str) -> None:
    """A cursor's query, a SQL-prepared statement's EXECUTE and each read of a Query of
    several are the same big read: each asks approval; PREPARE itself runs nothing."""
    with _connect(gateway, agent) as conn:
        conn.execute("BEGIN")
        with pytest.raises(psycopg.Error) as info:
            conn.execute(f"DECLARE pgw_estimate_cursor CURSOR FOR {BIG}")
        _assert_approval(info.value)
        conn.execute("ROLLBACK")
        conn.execute(f"PREPARE pgw_estimate_prepared AS {BIG_PARAM}")
        with pytest.raises(psycopg.Error) as info:
            conn.execute("EXECUTE pgw_estimate_prepared(5)")
        _assert_approval(info.value)
        with pytest.raises(psycopg.Error) as info:
            conn.execute(f"{SMALL}; {BIG}")
        _assert_approval(info.value)
        assert len(conn.execute(SMALL).fetchall()) == 9


def test_a_large_sibling_does_not_reuse_a_small_ones_estimate(
    gateway: RunningGateway, agent: str
) -> None:
    """Same shape, other literals: each text has its own estimate, and the decision shared
    between literals (the policy reads flags, not counts) is not shared across a flag."""
    with _connect(gateway, agent) as conn:
        for bound in (10, 11, 12):
            text = f"SELECT g FROM pgw_estimate_big WHERE g < {bound}"  # noqa: S608 - own numbers
            rows = conn.execute(text).fetchall()
            assert len(rows) == bound - 1
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT g FROM pgw_estimate_big WHERE g < 10000000")
        _assert_approval(info.value)
        assert len(conn.execute("SELECT g FROM pgw_estimate_big WHERE g < 13").fetchall()) == 12


@pytest.mark.parametrize("lead", ["", "/* é, a comment */ ", "-- agent's note\n"])
def test_texts_with_comments_and_non_ascii_are_estimated(
    gateway: RunningGateway, agent: str, lead: str
) -> None:
    """The scanner's offsets are characters: a non-ASCII character before a SQL PREPARE's
    name or a `$n`, and comments before PREPARE, still give the statement its estimate,
    so a small read runs and a big one asks approval (never an error of pgwarden's)."""
    big = f"{BIG_PARAM} AND 'ééé' <> 'x'"
    small = f"{SMALL_PARAM} AND 'ééé' <> 'x'"
    with _connect(gateway, agent) as conn:
        assert conn.execute(lead + small.replace("$1", "%s"), (5,)).fetchall() == [(5,)]
        with pytest.raises(psycopg.Error) as info:
            conn.execute(lead + big.replace("$1", "%s"), (5,))
        _assert_approval(info.value)
        conn.execute(f'{lead}PREPARE "pgw_é_small" AS {small}')
        assert conn.execute('EXECUTE "pgw_é_small"(6)').fetchall() == [(6,)]
        conn.execute(f'{lead}PREPARE "pgw_é_big" AS {big}')
        with pytest.raises(psycopg.Error) as info:
            conn.execute('EXECUTE "pgw_é_big"(6)')
        _assert_approval(info.value)
