"""psql, psycopg 3 and asyncpg through the gateway see exactly what they see connected direct."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import psycopg
import psycopg.types.json
import pytest
from psycopg import errors as pgerr
from psycopg.rows import TupleRow

from tests.harness import RunningGateway

pytestmark = pytest.mark.server

Conn = psycopg.Connection[TupleRow]
T = TypeVar("T")


def _both(gateway: RunningGateway, token: str, scenario: Callable[[Conn], T]) -> T:
    """Run a scenario on a direct and a gateway connection; they must observe the same."""
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as d:
        want = scenario(d)
    with psycopg.connect(gateway.dsn(token), autocommit=True, connect_timeout=10) as g:
        got = scenario(g)
    assert got == want
    return got


async def _both_async(
    gateway: RunningGateway, token: str, scenario: Callable[[Any], Awaitable[T]]
) -> T:
    d = await asyncpg.connect(gateway.direct_dsn())
    try:
        want = await scenario(d)
    finally:
        await d.close()
    g = await asyncpg.connect(gateway.url(token), timeout=10)
    try:
        got = await scenario(g)
    finally:
        await g.close()
    assert got == want
    return got


def _psql(dsn: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-X", "-A", "-q", dsn],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    )


# -- simple query protocol --------------------------------------------------------------


def test_psycopg_several_statements_in_one_query(gateway: RunningGateway, admin_token: str) -> None:
    def scenario(conn: Conn) -> list[Any]:
        cur = conn.cursor()
        cur.execute(
            "CREATE TEMP TABLE multi (a int, b text);"
            "INSERT INTO multi VALUES (1, 'x'), (2, NULL);"
            "SELECT * FROM multi ORDER BY a;"
            "UPDATE multi SET b = 'y' WHERE a = 2;"
            "SELECT count(*), string_agg(b, ',' ORDER BY a) FROM multi"
        )
        sets = []
        while True:
            rows = cur.fetchall() if cur.description else None
            sets.append((cur.statusmessage, rows))
            if not cur.nextset():
                break
        return sets

    got = _both(gateway, admin_token, scenario)
    assert got[-1] == ("SELECT 1", [(2, "x,y")])
    assert len(got) == 5


def test_psql_script_identical_to_direct(gateway: RunningGateway, admin_token: str) -> None:
    script = r"""
CREATE TEMP TABLE s (id int PRIMARY KEY, t text, n numeric, b bytea);
INSERT INTO s VALUES (1, 'plain', 1.50, '\x00ff'), (2, NULL, NULL, NULL),
    (3, 'ünï ☃ 🐘 日本', -0.0001, '\x');
SELECT * FROM s ORDER BY id;
SELECT 1; SELECT 'two' AS second; SELECT 3 AS third
\;SELECT 4;
SELECT 1/0;
SELECT 'still alive';
BEGIN;
INSERT INTO s VALUES (4, 'in tx', 4, NULL);
SAVEPOINT sp;
INSERT INTO s VALUES (4, 'dup', 4, NULL);
SELECT 'after error in tx';
ROLLBACK TO SAVEPOINT sp;
SELECT count(*) FROM s;
COMMIT;
SELECT id, t FROM s ORDER BY id;
\echo done
"""
    direct = _psql(gateway.direct_dsn(), script)
    via = _psql(gateway.dsn(admin_token), script)
    assert via.returncode == direct.returncode == 0, via.stderr
    assert via.stdout == direct.stdout
    assert via.stderr == direct.stderr
    assert "division by zero" in via.stderr
    assert "current transaction is aborted" in via.stderr
    assert "ünï ☃ 🐘 日本" in via.stdout and via.stdout.rstrip().endswith("done")


async def test_asyncpg_several_statements_in_one_execute(
    gateway: RunningGateway, admin_token: str
) -> None:
    async def scenario(conn: Any) -> Any:
        status = await conn.execute(
            "CREATE TEMP TABLE am (a int); INSERT INTO am SELECT generate_series(1, 10);"
            "DELETE FROM am WHERE a > 7"
        )
        return status, await conn.fetch("SELECT a FROM am ORDER BY a")

    status, rows = await _both_async(gateway, admin_token, scenario)
    assert status == "DELETE 3" and [r["a"] for r in rows] == list(range(1, 8))


# -- extended protocol ------------------------------------------------------------------

_VALUES_SQL = (
    "SELECT %s::int, %s::text, %s::numeric, %s::bytea, %s::text, %s::int[], %s::jsonb, %s::float8"
)
_VALUES = (
    42,
    "héllo wörld ✓ 🐘",
    Decimal("12345678901234567890.000001"),
    b"\x00\x01\xfe\xff",
    None,
    [1, None, 3],
    psycopg.types.json.Jsonb({"k": ["v", 1, None]}),
    -1.5e-300,
)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_parameters(gateway: RunningGateway, admin_token: str, binary: bool) -> None:
    def scenario(conn: Conn) -> Any:
        cur = conn.cursor(binary=binary)
        cur.execute(_VALUES_SQL, _VALUES, binary=binary)
        row = cur.fetchone()
        assert row is not None
        return [c.type_code for c in cur.description or []], tuple(
            v.obj if isinstance(v, psycopg.types.json.Jsonb) else v for v in row
        )

    types, row = _both(gateway, admin_token, scenario)
    assert row[1] == "héllo wörld ✓ 🐘" and row[4] is None and row[3] == b"\x00\x01\xfe\xff"
    assert types[0] == 23


def test_psycopg_pipeline_many_statements_before_one_sync(
    gateway: RunningGateway, admin_token: str
) -> None:
    def scenario(conn: Conn) -> Any:
        conn.execute("CREATE TEMP TABLE pl (i int, s text)")
        cursors = []
        with conn.pipeline():
            for i in range(200):
                conn.execute("INSERT INTO pl VALUES (%s, %s)", (i, f"row {i} ✓"))
                if i % 50 == 0:
                    cursors.append(
                        conn.execute("SELECT count(*), max(i) FROM pl WHERE i <= %s", (i,))
                    )
        counts = [c.fetchone() for c in cursors]
        total = conn.execute("SELECT count(*), sum(i), min(s), max(s) FROM pl").fetchone()
        return counts, total

    counts, total = _both(gateway, admin_token, scenario)
    assert counts == [(1, 0), (51, 50), (101, 100), (151, 150)]
    assert total is not None and total[0] == 200


def test_psycopg_pipeline_error_aborts_the_rest_like_direct(
    gateway: RunningGateway, admin_token: str
) -> None:
    def scenario(conn: Conn) -> Any:
        conn.execute("CREATE TEMP TABLE pe (i int PRIMARY KEY)")
        seen: list[str] = []
        try:
            with conn.pipeline():
                conn.execute("INSERT INTO pe VALUES (%s)", (1,))
                conn.execute("INSERT INTO pe VALUES (%s)", (1,))
                conn.execute("INSERT INTO pe VALUES (%s)", (2,))
        except psycopg.Error as exc:
            seen.append(type(exc).__name__ + ":" + str(exc.sqlstate))
        seen.append(str(conn.execute("SELECT array_agg(i ORDER BY i) FROM pe").fetchone()))
        return seen

    got = _both(gateway, admin_token, scenario)
    assert got[0] == "UniqueViolation:23505"


async def test_asyncpg_executemany_and_binary_parameters(
    gateway: RunningGateway, admin_token: str
) -> None:
    async def scenario(conn: Any) -> Any:
        await conn.execute("CREATE TEMP TABLE em (i int, s text, b bytea, n numeric)")
        rows = [
            (i, f"ü{i}" if i % 3 else None, bytes([i % 256]) * i, Decimal(i) / 7)
            for i in range(300)
        ]
        await conn.executemany("INSERT INTO em VALUES ($1, $2, $3, $4)", rows)
        got = await conn.fetch("SELECT * FROM em ORDER BY i")
        back = [tuple(r) for r in got]
        assert [r[:3] for r in back] == [r[:3] for r in rows]
        typed = await conn.fetchrow(
            "SELECT $1::int8, $2::timestamptz, $3::uuid, $4::text[]",
            2**62,
            dt.datetime(2024, 2, 29, 12, 0, tzinfo=dt.UTC),
            uuid.UUID(int=7),
            ["a", None, "日本"],
        )
        return back, tuple(typed)

    back, typed = await _both_async(gateway, admin_token, scenario)
    assert len(back) == 300 and typed[0] == 2**62


# -- portal suspension ------------------------------------------------------------------


def test_psycopg_server_side_cursor(gateway: RunningGateway, admin_token: str) -> None:
    def scenario(conn: Conn) -> Any:
        with conn.transaction(), conn.cursor(name="ssc") as cur:
            cur.itersize = 7
            cur.execute("SELECT i, repeat('x', i % 13) FROM generate_series(1, 1000) i")
            first = cur.fetchmany(5)
            rest = list(cur)
        return first, len(rest), rest[-1]

    first, n, last = _both(gateway, admin_token, scenario)
    assert first[0] == (1, "x") and n == 995 and last[0] == 1000


async def test_asyncpg_cursor_with_prefetch(gateway: RunningGateway, admin_token: str) -> None:
    async def scenario(conn: Any) -> Any:
        out = []
        async with conn.transaction():
            async for rec in conn.cursor(
                "SELECT i, i::text FROM generate_series(1, 500) i", prefetch=9
            ):
                out.append(tuple(rec))
            cur = await conn.cursor("SELECT i FROM generate_series(1, 100) i WHERE i % $1 = 0", 3)
            chunk = await cur.fetch(4)
            await cur.forward(10)
            after = await cur.fetchrow()
        return out, [r[0] for r in chunk], after[0]

    out, chunk, after = await _both_async(gateway, admin_token, scenario)
    assert len(out) == 500 and chunk == [3, 6, 9, 12] and after == 45


# -- values -----------------------------------------------------------------------------


def test_large_bytea_round_trip_psycopg(via: Conn) -> None:
    blob = os.urandom(5 * 1024 * 1024)
    for binary in (False, True):
        row = via.execute(
            "SELECT %s::bytea, length(%s::bytea)",
            (blob, blob),
            binary=binary,
        ).fetchone()
        assert row is not None
        assert row[1] == len(blob)
        assert bytes(row[0]) == blob


async def test_large_bytea_round_trip_asyncpg(gateway: RunningGateway, admin_token: str) -> None:
    blob = os.urandom(5 * 1024 * 1024)
    conn = await asyncpg.connect(gateway.url(admin_token), timeout=10)
    try:
        await conn.execute("CREATE TEMP TABLE big (b bytea)")
        await conn.execute("INSERT INTO big VALUES ($1)", blob)
        assert await conn.fetchval("SELECT b FROM big") == blob
        assert (
            await conn.fetchval("SELECT encode(sha256(b), 'hex') FROM big")
            == hashlib.sha256(blob).hexdigest()
        )
        # A large text value through the simple protocol, too.
        text = "é🐘" * 700_000
        assert await conn.fetchval("SELECT length($1::text)", text) == len(text)
    finally:
        await conn.close()


def test_nulls_and_unicode(gateway: RunningGateway, admin_token: str) -> None:
    def scenario(conn: Conn) -> Any:
        rows = conn.execute(
            'SELECT NULL::text AS "ñull", %s AS "列", %s::text IS NULL,'
            " E'\\u00e9' AS e, chr(128024)",
            ("Ωmega ∀∃ ÄÖÜ 😀", None),
        ).fetchall()
        names = [
            c.name for c in conn.execute('SELECT 1 AS "日本語の列", 2 AS "🐘"').description or []
        ]
        return rows, names

    rows, names = _both(gateway, admin_token, scenario)
    assert rows == [(None, "Ωmega ∀∃ ÄÖÜ 😀", True, "é", "🐘")]
    assert names == ["日本語の列", "🐘"]


# -- errors and transactions ------------------------------------------------------------


def test_error_leaves_session_usable(gateway: RunningGateway, admin_token: str) -> None:
    def scenario(conn: Conn) -> Any:
        seen: list[tuple[Any, ...] | None] = []
        for sql in ("SELECT 1/0", "SELECT %s::int / 0"):
            try:
                conn.execute(sql, (1,) if "%s" in sql else None)
            except pgerr.DivisionByZero as exc:
                seen.append((exc.sqlstate, exc.diag.message_primary))
            seen.append(conn.execute("SELECT 'ok'").fetchone())
        return seen

    got = _both(gateway, admin_token, scenario)
    assert got[0] == ("22012", "division by zero")


async def test_asyncpg_error_leaves_session_usable(
    gateway: RunningGateway, admin_token: str
) -> None:
    async def scenario(conn: Any) -> Any:
        seen = []
        for args in (("SELECT 1/0",), ("SELECT $1::int / 0", 5)):
            with pytest.raises(asyncpg.DivisionByZeroError) as info:
                await conn.fetch(*args)
            seen.append(info.value.sqlstate)
            seen.append(await conn.fetchval("SELECT 'ok'"))
        return seen

    assert await _both_async(gateway, admin_token, scenario) == ["22012", "ok", "22012", "ok"]


def _tx_scenario(conn: Conn) -> list[Any]:
    """Outcomes and transaction status after each statement of a transaction workout."""
    seen: list[Any] = []
    conn.autocommit = False
    steps = [
        "CREATE TEMP TABLE tx (i int PRIMARY KEY) ON COMMIT PRESERVE ROWS",
        "COMMIT",
        "INSERT INTO tx VALUES (1)",
        "SAVEPOINT a",
        "INSERT INTO tx VALUES (1)",
        "SELECT 1",
        "ROLLBACK TO SAVEPOINT a",
        "INSERT INTO tx VALUES (2)",
        "RELEASE SAVEPOINT a",
        "COMMIT",
        "INSERT INTO tx VALUES (3)",
        "SELECT 1/0",
        "SELECT count(*) FROM tx",
        "COMMIT",
        "SELECT array_agg(i ORDER BY i) FROM tx",
        "ROLLBACK",
    ]
    for sql in steps:
        try:
            cur = conn.execute(sql)
            seen.append((sql, cur.statusmessage, cur.fetchall() if cur.description else None))
        except psycopg.Error as exc:
            seen.append((sql, "error", exc.sqlstate))
        seen.append(conn.info.transaction_status.name)
    return seen


def test_transactions_and_savepoints_psycopg(gateway: RunningGateway, admin_token: str) -> None:
    got = _both(gateway, admin_token, _tx_scenario)
    assert ("SELECT 1", "error", "25P02") in got
    assert ("SELECT count(*) FROM tx", "error", "25P02") in got
    assert ("SELECT array_agg(i ORDER BY i) FROM tx", "SELECT 1", [([1, 2],)]) in got


async def test_transactions_asyncpg(gateway: RunningGateway, admin_token: str) -> None:
    async def scenario(conn: Any) -> Any:
        seen = []
        await conn.execute("CREATE TEMP TABLE atx (i int)")
        tr = conn.transaction()
        await tr.start()
        await conn.execute("INSERT INTO atx VALUES (1)")
        try:
            await conn.fetch("SELECT $1::int / 0", 1)
        except asyncpg.PostgresError as exc:
            seen.append(exc.sqlstate)
        try:
            await conn.fetch("SELECT 1")
        except asyncpg.PostgresError as exc:
            seen.append(exc.sqlstate)
        await tr.rollback()
        async with conn.transaction():
            await conn.execute("INSERT INTO atx VALUES (2)")
            async with conn.transaction():  # a savepoint
                await conn.execute("INSERT INTO atx VALUES (3)")
            try:
                async with conn.transaction():
                    await conn.execute("INSERT INTO atx VALUES (4)")
                    await conn.execute("SELECT 1/0")
            except asyncpg.DivisionByZeroError:
                seen.append("inner rolled back")
        seen.append([r[0] for r in await conn.fetch("SELECT i FROM atx ORDER BY i")])
        return seen

    assert await _both_async(gateway, admin_token, scenario) == [
        "22012",
        "25P02",
        "inner rolled back",
        [2, 3],
    ]
