"""Masks follow each output column's lineage, not the statement: a column no masked value
flows into (a literal, count(*), a column of another table) comes back as written, and
one a masked value flows into (an expression, an aggregate that returns values, a UNION, a
function's rows) comes back masked whole. Real clients through the real gateway, in text
(psycopg) and binary (asyncpg) format."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import RunningGateway

from . import connect, simple, token_for

pytestmark = pytest.mark.server

SECRETS = ("ada@example.com", "grace@example.org", "123-45-6789", "987-65-4321", "7946", "4111")


class _Hashed:
    """A `hash`-masked value: 32 hex digits keyed by the gateway's secret."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and len(other) == 32

    def __repr__(self) -> str:
        return "<hash>"


HASHED = _Hashed()


def assert_clean(rows: Any) -> None:
    text = repr(rows)
    for secret in SECRETS:
        assert secret not in text, (secret, text)


ENGINEER_CASES = [
    # Classified columns only filter or count: nothing of them reaches the output.
    ("SELECT count(*) FROM customers WHERE email LIKE '%example%'", [(2,)]),
    ("SELECT count(*), sum(id) FROM customers WHERE ssn IS NOT NULL AND phone <> ''", [(2, 3)]),
    ("SELECT count(email), count(DISTINCT ssn) FROM customers", [(2, 2)]),
    (
        "SELECT name, count(*) OVER () FROM customers WHERE card_number > '0' ORDER BY email",
        [("Ada", 2), ("Grace", 2)],
    ),
    # Literals and unclassified columns beside masked ones come back as written.
    (
        "SELECT 'x', 42, email, name FROM customers ORDER BY id",
        [("x", 42, "a***@example.com", "Ada"), ("x", 42, "g***@example.org", "Grace")],
    ),
    (
        "SELECT 'x' AS lit, upper(email), length(name) FROM customers ORDER BY id",
        [("x", "***", 3), ("x", "***", 5)],
    ),
    (
        "SELECT lit, n FROM (SELECT 'x' AS lit, email, 1 AS n FROM customers) s ORDER BY email",
        [("x", 1), ("x", 1)],
    ),
    (
        "WITH c AS (SELECT id, ssn, 'k' AS k FROM customers) SELECT k, id + 1 FROM c ORDER BY id",
        [("k", 2), ("k", 3)],
    ),
    (
        "SELECT o.amount::text, c.name FROM orders o JOIN customers c ON c.id = o.customer_id"
        " WHERE c.email LIKE 'ada%' ORDER BY o.id",
        [("10.5", "Ada"), ("20", "Ada")],
    ),
    (
        "SELECT *, 'tail' FROM customers WHERE id = 1",
        [(1, "Ada", "a***@example.com", "************0001", "***", HASHED, "tail")],
    ),
    # Aggregates that return the value, expressions, unions, a function's rows: masked whole.
    (
        "SELECT max(email), min(ssn), string_agg(email, ','), array_agg(email) FROM customers",
        [("***", "***", "***", None)],
    ),
    ("SELECT email || '' FROM customers WHERE id = 1", [("***",)]),
    (
        "SELECT name FROM customers WHERE id = 1 UNION ALL SELECT ssn FROM customers WHERE id = 1",
        [("***",), ("***",)],
    ),
    (
        "SELECT v FROM customers c, unnest(ARRAY[c.email, 'x']) v WHERE c.id = 1",
        [("***",), ("***",)],
    ),
    ("SELECT (SELECT max(ssn) FROM customers), 'y'", [("***", "y")]),
    ("SELECT row_to_json(c)::text, 1 FROM customers c WHERE id = 1", [("***", 1)]),
    (
        "SELECT s FROM (VALUES ('a'), ((SELECT email FROM customers LIMIT 1))) v(s)",
        [("***",), ("***",)],
    ),
]


@pytest.mark.parametrize(("text", "expected"), ENGINEER_CASES)
def test_engineers_see_what_lineage_allows(
    gateway: RunningGateway, text: str, expected: Any
) -> None:
    with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
        rows = simple(conn, text)
        assert rows == expected
        assert_clean(rows)
        # The extended protocol in binary format: the same plan, other formats.
        with conn.cursor(binary=True) as cur:
            cur.execute(text.encode())
            binary = cur.fetchall()
        assert_clean(binary)
        assert [r[0] for r in binary] == [r[0] for r in expected] or "array_agg" in text


AGENT_CASES = [
    ("SELECT count(*) FROM customers", [(2,)]),
    (
        "SELECT 1 AS one, 'x', name, email FROM customers ORDER BY id",
        [(1, "x", "Ada", "a***@example.com"), (1, "x", "Grace", "g***@example.org")],
    ),
    (
        "SELECT c.*, 0 FROM customers c WHERE id = 2",
        [(2, "Grace", "g***@example.org", "***********0143", "***", HASHED, 0)],
    ),
]


@pytest.mark.parametrize(("text", "expected"), AGENT_CASES)
def test_ai_agents_see_what_lineage_allows(
    gateway: RunningGateway, text: str, expected: Any
) -> None:
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        rows = simple(conn, text)
        assert rows == expected
        assert_clean(rows)


def test_asyncpg_binary_results_follow_lineage(gateway: RunningGateway) -> None:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(gateway.url(token_for(gateway, "engineers")))
        try:
            counted = await conn.fetch(
                "SELECT 'x'::text AS lit, count(*) AS n FROM customers WHERE email LIKE $1",
                "%example%",
            )
            shown = await conn.fetch(
                "SELECT $1::int AS k, upper(email) AS u FROM customers ORDER BY id", 7
            )
            return [tuple(counted[0]), *[tuple(r) for r in shown]]
        finally:
            await conn.close()

    rows = asyncio.run(run())
    assert rows == [("x", 2), (7, "***"), (7, "***")]
    assert_clean(rows)


def test_a_prepared_statement_keeps_its_lineage(gateway: RunningGateway) -> None:
    with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
        simple(conn, "PREPARE q AS SELECT 'x', count(*), max(email) FROM customers WHERE ssn <> ''")
        assert simple(conn, "EXECUTE q") == [("x", 2, "***")]
        for _ in range(6):  # psycopg prepares it server-side after a few runs
            row = conn.execute(
                "SELECT %s::text, count(*) FROM customers WHERE email <> %s", ("y", "z")
            ).fetchone()
            assert row == ("y", 2)


def test_a_cursor_keeps_its_lineage(gateway: RunningGateway) -> None:
    """FETCH names the cursor, not the columns: the rows follow what DECLARE selected."""
    with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
        simple(
            conn,
            "DECLARE lc CURSOR WITH HOLD FOR SELECT 'x', count(*), max(email) FROM customers"
            " WHERE ssn <> ''",
        )
        assert simple(conn, "FETCH ALL FROM lc") == [("x", 2, "***")]
        simple(conn, "CLOSE lc")
        # The same name declared again over other columns: the new lineage applies.
        simple(conn, "DECLARE lc CURSOR WITH HOLD FOR SELECT upper(ssn), 'y' FROM customers")
        rows = simple(conn, "FETCH ALL FROM lc")
        assert rows == [("***", "y"), ("***", "y")]
        simple(conn, "CLOSE lc")
    with connect(gateway.dsn(token_for(gateway, "engineers")), autocommit=False) as conn:
        with conn.cursor(name="named") as cur:  # psycopg's server-side cursor
            cur.execute(
                "SELECT count(*), 'z', email FROM customers WHERE phone <> '' GROUP BY email"
            )
            rows = cur.fetchall()
        assert sorted(rows) == [(1, "z", "a***@example.com"), (1, "z", "g***@example.org")]


def test_a_cursor_whose_lineage_is_unknown_is_masked_whole(gateway: RunningGateway) -> None:
    """A FETCH in the same Query as its DECLARE (not confirmed yet), or of a name reused by
    code pgwarden cannot see into: every expression column masked, as before."""
    with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
        rows = simple(
            conn,
            "DECLARE lu CURSOR WITH HOLD FOR SELECT 'x', upper(email) FROM customers;"
            " FETCH ALL FROM lu",
        )
        assert rows == [("***", "***"), ("***", "***")]
        simple(conn, "CLOSE lu")


# -- generated select lists ---------------------------------------------------------------

ROW_ITEMS = ["email", "ssn", "upper(email)", "ssn || 'x'", "name", "length(name)", "phone"]
AGG_ITEMS = ["count(*)", "count(email)", "max(email)", "string_agg(ssn, ',')", "min(name)"]
FROMS = [
    "customers",
    "(SELECT * FROM customers) s",
    "(SELECT id, name, email, ssn, phone FROM customers WHERE id > 0) s",
    "customers c JOIN orders o ON o.customer_id = c.id",
]
WHERES = ["", " WHERE email LIKE '%e%'", " WHERE ssn IS NOT NULL AND phone <> ''"]


@st.composite
def select_lists(draw: st.DrawFn) -> tuple[str, dict[int, Any]]:
    """A SELECT mixing literals with classified and plain columns: (text, literal by position)."""
    aggregate = draw(st.booleans())
    pool = AGG_ITEMS if aggregate else ROW_ITEMS
    items: list[str] = []
    literals: dict[int, Any] = {}
    for i in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            value: Any = draw(st.sampled_from([f"lit{i}", i * 7]))
            items.append(f"'{value}'" if isinstance(value, str) else str(value))
            literals[i] = value
        else:
            items.append(draw(st.sampled_from(pool)))
    text = f"SELECT {', '.join(items)} FROM {draw(st.sampled_from(FROMS))}"  # noqa: S608 (generated from the lists above)
    return text + draw(st.sampled_from(WHERES)), literals


@settings(max_examples=40, derandomize=True, deadline=None)
@given(case=select_lists())
def test_generated_select_lists_show_literals_and_hide_values(
    gateway: RunningGateway, case: tuple[str, dict[int, Any]]
) -> None:
    text, literals = case
    with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
        rows = simple(conn, text)
    assert_clean(rows)
    for row in rows:
        for position, value in literals.items():
            assert row[position] == value, (text, row)
