# ruff: noqa: S608  (tests build SQL around table names of their own)
"""Lineage runs through the code of an extension that computes from its arguments alone
(an IMMUTABLE C function: casts to hstore, citext or issn, hstore(...), hstore's operators),
so what reads no classified column comes back as written to every group, admins and
ai-agents included; what such code computes from a classified column is masked like any
expression. Code whose lineage stays unknown (a plpgsql function, an extension's function
that runs SQL text) keeps every classified column in play: its output is masked whole.

Real asyncpg (and psycopg) clients through the real gateway, real OPA, real PostgreSQL with
the contrib extensions (Debian's postgresql-contrib) installed in the app database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import asyncpg
import psycopg
import pytest
from psycopg.types.range import Range, RangeInfo, register_range

from tests.harness import RunningGateway

from . import (
    assert_no_customer_secret,
    assert_policy_refusal,
    connect,
    direct,
    fresh_table,
    refusal_of,
    simple,
    token_for,
)

pytestmark = pytest.mark.server

_T = TypeVar("_T")
EXTENSIONS = ("hstore", "citext", "isn", "tablefunc")


@pytest.fixture(scope="module")
def extensions(gateway: RunningGateway) -> Iterator[None]:
    """The contrib extensions asyncpg's own codec tests install, and a plpgsql function."""
    available = {
        name for (name,) in direct(gateway, "SELECT name FROM pg_catalog.pg_available_extensions")
    }
    missing = set(EXTENSIONS) - available
    assert not missing, f"postgresql-contrib is needed for these tests: {sorted(missing)}"
    direct(
        gateway,
        "".join(f"CREATE EXTENSION IF NOT EXISTS {name};" for name in EXTENSIONS)
        + "CREATE OR REPLACE FUNCTION pgw_constant_plpgsql() RETURNS text LANGUAGE plpgsql"
        " AS $$ BEGIN RETURN 'abc'; END $$",
    )
    yield
    direct(
        gateway,
        "DROP FUNCTION pgw_constant_plpgsql();"
        + "".join(f"DROP EXTENSION {name} CASCADE;" for name in EXTENSIONS),
    )


def on_asyncpg(
    gateway: RunningGateway,
    role: str | tuple[str, ...],
    work: Callable[[asyncpg.Connection], Awaitable[_T]],
) -> _T:
    groups = (role,) if isinstance(role, str) else role

    async def run() -> _T:
        conn = await asyncpg.connect(gateway.url(token_for(gateway, *groups)))
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


# Statements that read no table, through an extension's IMMUTABLE C code, with what a
# direct connection returns.
UNCLASSIFIED: list[tuple[str, tuple[Any, ...], Any]] = [
    ("SELECT $1::citext", ("CiText",), "CiText"),
    ("SELECT $1::hstore::text", ("ham=>spam",), '"ham"=>"spam"'),
    ("SELECT 'a=>1'::hstore -> 'a'", (), "1"),
    ("SELECT hstore('k', 'v')::text", (), '"k"=>"v"'),
    ("SELECT public.hstore('k', 'v')::text", (), '"k"=>"v"'),
    ("SELECT akeys(hstore(ARRAY['x', '1', 'y', '2']))::text", (), "{x,y}"),
    ("SELECT $1::issn::text", ("1436-4522",), "1436-4522"),
    ("SELECT upper($1::citext)::text", ("ab",), "AB"),
]


@pytest.mark.parametrize("role", ["admins", "engineers", "ai-agents"])
@pytest.mark.parametrize(("text", "args", "expected"), UNCLASSIFIED)
def test_extension_code_over_no_classified_column_returns_values(
    gateway: RunningGateway,
    extensions: None,
    role: str,
    text: str,
    args: tuple[Any, ...],
    expected: Any,
) -> None:
    assert direct(gateway, text.replace("$1", "%s"), args or None) == [(expected,)]
    got = on_asyncpg(gateway, role, lambda conn: conn.fetchval(text, *args))
    assert got == expected


def test_asyncpg_custom_codec_over_an_extension_type(
    gateway: RunningGateway, extensions: None
) -> None:
    """asyncpg's own TestCodecs.test_custom_codec_text, for admins and ai-agents."""

    async def work(conn: asyncpg.Connection) -> Any:
        await conn.set_type_codec(
            "hstore",
            encoder=lambda d: ",".join(f"{k}=>{v}" for k, v in d.items()),
            decoder=lambda s: dict(
                (k.strip('"'), v.strip('"'))
                for k, _, v in (item.partition("=>") for item in s.split(","))
            ),
        )
        return await (await conn.prepare("SELECT $1::hstore AS result")).fetchval({"ham": "spam"})

    for role in ("admins", "ai-agents"):
        assert on_asyncpg(gateway, role, work) == {"ham": "spam"}


# Extension code over a classified column: traced from its argument, so masked as an
# expression is (engineers) or refused as an oracle (ai-agents).
CLASSIFIED = [
    "SELECT hstore('e', email)::text FROM customers ORDER BY id",
    "SELECT email::citext FROM customers ORDER BY id",
    "SELECT upper(ssn::citext)::text FROM customers ORDER BY id",
    "SELECT (hstore('e', email) -> 'e') FROM customers ORDER BY id",
]


@pytest.mark.parametrize("text", CLASSIFIED)
def test_extension_code_over_a_classified_column_is_masked(
    gateway: RunningGateway, extensions: None, text: str
) -> None:
    cleartext = direct(gateway, text)
    assert any("@example." in repr(r) or "-45-" in repr(r) for r in cleartext)  # the premise
    assert_masked_and_an_oracle(gateway, text, ("engineers",), len(cleartext))


def assert_masked_and_an_oracle(
    gateway: RunningGateway, text: str, roles: tuple[str, ...], rows: int | None = None
) -> None:
    """`roles` (not pii-readers) get rows without a classified value (`rows` of them);
    ai-agents are refused: a function over a classified column is an oracle."""
    for role in roles:
        got = on_asyncpg(gateway, role, lambda conn: conn.fetch(text))
        assert got and (rows is None or len(got) == rows), (text, got)
        assert_no_customer_secret([tuple(r) for r in got])
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        with pytest.raises(psycopg.Error) as exc:
            simple(conn, text)
        assert_policy_refusal(refusal_of(exc.value), reason="classified column")
        assert_no_customer_secret(refusal_of(exc.value))


def test_a_plpgsql_function_stays_opaque(gateway: RunningGateway, extensions: None) -> None:
    """Its body could read any table: masked whole for whoever is not a pii-reader, admins
    included; held for approval for ai-agents (it may also write)."""
    text = "SELECT pgw_constant_plpgsql()"
    assert direct(gateway, text) == [("abc",)]
    for role in ("admins", "engineers"):
        assert on_asyncpg(gateway, role, lambda conn: conn.fetchval(text)) in (None, "***")
    # A pii-reader has no masks: the value as written.
    reader = ("engineers", "pii-readers")
    assert on_asyncpg(gateway, reader, lambda conn: conn.fetchval(text)) == "abc"
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        with pytest.raises(psycopg.Error) as exc:
            simple(conn, text)
        assert_policy_refusal(refusal_of(exc.value), approval=True)


def test_a_user_function_of_an_extension_function_s_name_keeps_the_call_opaque(
    gateway: RunningGateway, extensions: None
) -> None:
    """Which of the functions of one name runs is for the arguments' types to decide: one
    user-written function of that name on the search_path makes the call opaque."""
    direct(
        gateway,
        "CREATE FUNCTION public.skeys(text) RETURNS SETOF text LANGUAGE sql"
        " AS 'SELECT email FROM customers'",
    )
    try:
        text = "SELECT skeys('a=>1'::hstore)"
        assert direct(gateway, text) == [("a",)]
        for role in ("admins", "engineers"):
            assert on_asyncpg(gateway, role, lambda conn: conn.fetchval(text)) in (None, "***")
        # Named with the schema both live in, the user's is still a candidate.
        qualified = "SELECT public.skeys('a=>1'::hstore)"
        assert on_asyncpg(gateway, "admins", lambda conn: conn.fetchval(qualified)) == "***"
    finally:
        direct(gateway, "DROP FUNCTION public.skeys(text)")


def test_an_extension_function_that_runs_sql_text_stays_opaque(
    gateway: RunningGateway, extensions: None
) -> None:
    """tablefunc's crosstab (C, STABLE) runs the query it is given: no lineage reaches its
    rows, so every classified column is in play and its output columns are masked whole."""
    text = (
        "SELECT * FROM crosstab('SELECT id, ''e'', email FROM customers ORDER BY 1')"
        " AS ct(id int, e text)"
    )
    cleartext = direct(gateway, text)
    assert "ada@example.com" in repr(cleartext)
    for role in ("admins", "engineers"):
        rows = on_asyncpg(gateway, role, lambda conn: conn.fetch(text))
        assert len(rows) == len(cleartext)
        assert_no_customer_secret([tuple(r) for r in rows])
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        with pytest.raises(psycopg.Error) as exc:
            simple(conn, text)
        assert_policy_refusal(refusal_of(exc.value), approval=True)


# -- LANGUAGE sql functions: lineage from their bodies -----------------------------------

SQL_FUNCTIONS = (
    "CREATE OR REPLACE FUNCTION pgw_double(int) RETURNS int LANGUAGE sql IMMUTABLE"
    " AS 'SELECT $1 * 2';"
    " CREATE OR REPLACE FUNCTION pgw_spent(int) RETURNS numeric LANGUAGE sql STABLE"
    " AS 'SELECT sum(amount) FROM orders WHERE customer_id = $1';"
    " CREATE OR REPLACE FUNCTION pgw_spent_twice(int) RETURNS numeric LANGUAGE sql STABLE"
    " AS 'SELECT pgw_spent($1) * pgw_double(1)';"
    " CREATE OR REPLACE FUNCTION pgw_mail(int) RETURNS text LANGUAGE sql STABLE"
    " AS 'SELECT email FROM customers WHERE id = $1';"
    " CREATE OR REPLACE FUNCTION pgw_mail_via(int) RETURNS text LANGUAGE sql STABLE"
    " AS 'SELECT upper(pgw_mail($1))';"
    " CREATE OR REPLACE FUNCTION pgw_everyone() RETURNS SETOF customers LANGUAGE sql STABLE"
    " AS 'SELECT * FROM customers ORDER BY id';"
    " CREATE OR REPLACE FUNCTION pgw_count_mail(text) RETURNS bigint LANGUAGE sql STABLE"
    " AS 'SELECT count(*) FROM customers WHERE email LIKE $1';"
    " CREATE OR REPLACE FUNCTION pgw_fact(int) RETURNS int LANGUAGE sql IMMUTABLE"
    " AS 'SELECT CASE WHEN $1 <= 1 THEN 1 ELSE $1 * pgw_fact($1 - 1) END';"
    " CREATE OR REPLACE FUNCTION pgw_touch() RETURNS int LANGUAGE sql"
    " AS 'UPDATE orders SET amount = amount WHERE id = 1 RETURNING id';"
    " CREATE SCHEMA IF NOT EXISTS pgw_shadow;"
    " CREATE TABLE IF NOT EXISTS pgw_shadow.customers (id int, email text);"
    " INSERT INTO pgw_shadow.customers VALUES (1, 'shadow@example.net');"
    " CREATE OR REPLACE FUNCTION pgw_mail_pinned(int) RETURNS text LANGUAGE sql STABLE"
    " SET search_path = public AS 'SELECT email FROM customers WHERE id = $1';"
)
DROP_SQL_FUNCTIONS = (
    "DROP FUNCTION pgw_double(int), pgw_spent(int), pgw_spent_twice(int), pgw_mail(int),"
    " pgw_mail_via(int), pgw_everyone(), pgw_count_mail(text), pgw_fact(int), pgw_touch(),"
    " pgw_mail_pinned(int); DROP SCHEMA pgw_shadow CASCADE"
)


@pytest.fixture(scope="module")
def sql_functions(gateway: RunningGateway) -> Iterator[None]:
    direct(gateway, SQL_FUNCTIONS)
    yield
    direct(gateway, DROP_SQL_FUNCTIONS)


# Bodies that read no classified column: every group gets the values, ai-agents without
# approval (a body that only reads is seen into).
UNMASKED_CALLS = [
    ("SELECT pgw_double(21)", 42),
    ("SELECT pgw_spent(1)", 30.5),
    ("SELECT pgw_spent_twice(1)", 61.0),
    ("SELECT pgw_spent(c.id) FROM customers c WHERE c.id = 2", 7.25),
]


@pytest.mark.parametrize("role", ["admins", "engineers", "ai-agents"])
@pytest.mark.parametrize(("text", "expected"), UNMASKED_CALLS)
def test_a_sql_function_whose_body_reads_no_classified_column_returns_values(
    gateway: RunningGateway, sql_functions: None, role: str, text: str, expected: Any
) -> None:
    assert direct(gateway, text) == [(expected,)]
    assert on_asyncpg(gateway, role, lambda conn: conn.fetchval(text)) == expected


# Bodies (or bodies they call) that read a classified column: masked for whoever is not a
# pii-reader, admins included; refused to ai-agents (a function over it is an oracle).
MASKED_CALLS = [
    "SELECT pgw_mail(1)",
    "SELECT pgw_mail_via(1)",
    "SELECT id, pgw_mail(id) FROM orders ORDER BY id",
    "SELECT * FROM pgw_everyone()",
    "SELECT e.email FROM pgw_everyone() e",
    "SELECT pgw_count_mail('ada%') = 1",
]


@pytest.mark.parametrize("text", MASKED_CALLS)
def test_a_sql_function_whose_body_reads_a_classified_column_is_masked(
    gateway: RunningGateway, sql_functions: None, text: str
) -> None:
    assert_masked_and_an_oracle(gateway, text, ("admins", "engineers"))
    reader = ("admins", "pii-readers")
    rows = on_asyncpg(gateway, reader, lambda conn: conn.fetch(text))
    assert [tuple(r) for r in rows] == direct(gateway, text)


def test_a_sql_function_is_read_under_the_search_path_it_sets_for_itself(
    gateway: RunningGateway, sql_functions: None
) -> None:
    """pgw_mail_pinned sets search_path = public: its `customers` is public.customers
    whatever the caller's path says; pgw_mail has none: the caller's path decides, as it
    does when PostgreSQL runs it."""

    async def work(conn: asyncpg.Connection) -> tuple[Any, Any]:
        await conn.execute("SET search_path TO pgw_shadow, public")
        return await conn.fetchval("SELECT pgw_mail_pinned(1)"), await conn.fetchval(
            "SELECT pgw_mail(1)"
        )

    pinned, unpinned = on_asyncpg(gateway, "engineers", work)
    assert pinned != "ada@example.com" and pinned is not None  # public.customers: masked
    assert unpinned == "shadow@example.net"  # pgw_shadow.customers: not classified


@pytest.mark.parametrize(
    "text",
    [
        "SELECT pgw_fact(5)",  # calls itself: followed no further
        "SELECT pgw_touch()",  # writes
    ],
)
def test_a_sql_function_that_recurses_or_writes_stays_opaque(
    gateway: RunningGateway, sql_functions: None, text: str
) -> None:
    want = direct(gateway, text)[0][0]
    assert on_asyncpg(gateway, "admins", lambda conn: conn.fetchval(text)) != want
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        with pytest.raises(psycopg.Error) as exc:
            simple(conn, text)
        assert_policy_refusal(refusal_of(exc.value), approval=True)


def test_a_copy_through_a_sql_function_is_held_like_a_direct_copy(
    gateway: RunningGateway, sql_functions: None
) -> None:
    """INSERT ... VALUES (pgw_mail(1)) copies customers.email as surely as INSERT ...
    SELECT email: engineers wait for an admin, and nothing is written meanwhile."""
    table = fresh_table(gateway, "pgw_copy", rows=1)
    try:
        text = f"INSERT INTO {table} (id, v) VALUES (9, pgw_mail(1)) RETURNING v"
        with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
            with pytest.raises(psycopg.Error) as exc:
                simple(conn, text)
            refusal = refusal_of(exc.value)
            assert_policy_refusal(refusal, approval=True)
            assert "may not copy classified column public.customers.email" in refusal.message
        assert direct(gateway, f"SELECT id FROM {table} ORDER BY id") == [(1,)]
        # What it copies from an unclassified column goes through.
        spent = f"UPDATE {table} SET v = pgw_spent(1)::text WHERE id = 1 RETURNING v"
        with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
            assert simple(conn, spent) == [("30.5",)]
    finally:
        direct(gateway, f"DROP TABLE {table}")


def test_a_write_of_what_opaque_code_computes_keeps_classified_values_masked(
    gateway: RunningGateway, extensions: None
) -> None:
    """A plpgsql function reading customers.email, its value written to another column:
    which classified column it copies is unknown, so engineers wait for an admin and what
    the write assigns comes back masked in RETURNING, admins included."""
    direct(
        gateway,
        "CREATE OR REPLACE FUNCTION pgw_mail_pl(int) RETURNS text LANGUAGE plpgsql"
        " AS $$ BEGIN RETURN (SELECT email FROM customers WHERE id = $1); END $$",
    )
    table = fresh_table(gateway, "pgw_opaque_copy", rows=1)
    try:
        text = f"INSERT INTO {table} (id, v) VALUES (9, pgw_mail_pl(1)) RETURNING v"
        with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
            with pytest.raises(psycopg.Error) as exc:
                simple(conn, text)
            assert_policy_refusal(refusal_of(exc.value), approval=True)
        assert direct(gateway, f"SELECT id FROM {table} ORDER BY id") == [(1,)]
        rows = on_asyncpg(gateway, "admins", lambda conn: conn.fetch(text))
        assert len(rows) == 1
        assert_no_customer_secret([tuple(r) for r in rows])
        assert direct(gateway, f"SELECT v FROM {table} WHERE id = 9") == [("ada@example.com",)]
    finally:
        direct(gateway, f"DROP TABLE {table}; DROP FUNCTION pgw_mail_pl(int)")


@pytest.fixture(scope="module")
def range_type(gateway: RunningGateway) -> Iterator[str]:
    """A user's range type over text (psycopg's own tests make `testrange` so): PostgreSQL
    makes its constructors and its multirange's, built-in code of LANGUAGE internal."""
    direct(
        gateway,
        'CREATE TYPE pgw_textrange AS RANGE (subtype = text, collation = "C",'
        " multirange_type_name = pgw_textrange_multirange)",
    )
    yield "pgw_textrange"
    direct(gateway, "DROP TYPE pgw_textrange CASCADE")


# Through the constructors of a user's range type (a call, the cast from the range to its
# multirange, a literal of the multirange type), with what a direct connection returns.
RANGE_CONSTRUCTORS = [
    "SELECT pgw_textrange('a', 'b')::text",
    "SELECT pgw_textrange(chr(34), chr(35), '[]')::text",
    "SELECT pgw_textrange_multirange(pgw_textrange('a', 'b'))::text",
    "SELECT (pgw_textrange('a', 'b')::pgw_textrange_multirange)::text",
    "SELECT '{}'::pgw_textrange_multirange = pgw_textrange_multirange()",
    "SELECT '{[a,b)}'::pgw_textrange_multirange::text",
]


@pytest.mark.parametrize("role", ["admins", "engineers", "ai-agents"])
@pytest.mark.parametrize("text", RANGE_CONSTRUCTORS)
def test_a_range_type_s_constructors_return_values(
    gateway: RunningGateway, range_type: str, role: str, text: str
) -> None:
    """psycopg's tests/types/test_range.py and test_multirange.py read NULL through pgwarden
    for admins: the constructors were taken for opaque user code."""
    expected = direct(gateway, text)
    assert expected and expected[0][0] is not None
    with connect(gateway.dsn(token_for(gateway, role))) as conn:
        assert simple(conn, text) == expected
        # Extended protocol, and the binary result format psycopg's loaders ask for.
        assert conn.execute(text, prepare=True).fetchall() == expected


def test_psycopg_registered_range_loads_through_the_gateway(
    gateway: RunningGateway, range_type: str
) -> None:
    """psycopg's own test_load_quoting, text and binary: a registered range type loads."""
    with connect(gateway.dsn(token_for(gateway, "admins"))) as conn:
        info = RangeInfo.fetch(conn, range_type)
        assert info is not None
        register_range(info, conn)
        for binary in (False, True):
            cur = conn.cursor(binary=binary)
            got = cur.execute(
                f"SELECT {range_type}(chr(%(low)s::int), chr(%(up)s::int))", {"low": 39, "up": 92}
            ).fetchone()
            assert got is not None and got[0] == Range("'", "\\")


def test_a_range_constructor_over_a_classified_column_is_masked(
    gateway: RunningGateway, range_type: str
) -> None:
    """Traced, not trusted: a range made of a classified column is masked like any
    expression over it, and an oracle for ai-agents."""
    text = f"SELECT {range_type}(email, email || 'z')::text FROM customers ORDER BY id"
    cleartext = direct(gateway, text)
    assert any("@example." in repr(r) for r in cleartext)  # the premise
    assert_masked_and_an_oracle(gateway, text, ("admins", "engineers"), len(cleartext))
