"""Catalog against a real PostgreSQL: schema resolution, `*` expansion, invalidation, outages."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from cli.localpg import LocalCluster
from gateway.policy.decision import Mask
from gateway.sql import Catalog, ColumnRef, StatementFacts, TableRef, analyze, parse_search_path

pytestmark = pytest.mark.server

SETUP = """
DROP SCHEMA IF EXISTS cat_a CASCADE; DROP SCHEMA IF EXISTS cat_b CASCADE;
CREATE SCHEMA cat_a; CREATE SCHEMA cat_b;
CREATE TABLE cat_a.people (id int, name text, email text);
CREATE TABLE cat_b.people (id int, secret text);
CREATE TABLE cat_b.only_b (x int, y int, z int);
ALTER TABLE cat_b.only_b DROP COLUMN y;
"""


@pytest.fixture
async def catalog(pg_cluster: LocalCluster) -> AsyncIterator[Catalog]:
    pg_cluster.psql(SETUP)
    cat = Catalog(pg_cluster.dsn())
    yield cat
    await cat.close()


def one(sql: str) -> StatementFacts:
    (facts,) = analyze(sql)
    return facts


async def test_first_schema_on_the_path_wins(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT * FROM people"), ("cat_b", "cat_a"))
    assert f.reads == (TableRef("cat_b", "people"),)
    assert [c.column for c in f.columns] == ["id", "secret"]
    f = await catalog.resolve(one("SELECT * FROM people"), ("cat_a", "cat_b"))
    assert f.reads == (TableRef("cat_a", "people"),)
    assert f.columns == tuple(
        ColumnRef("cat_a", "people", c, "output") for c in ("id", "name", "email")
    )


async def test_skips_schemas_without_the_relation(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT x FROM only_b"), ("cat_a", "cat_b"))
    assert f.reads == (TableRef("cat_b", "only_b"),)
    assert f.columns == (ColumnRef("cat_b", "only_b", "x", "output"),)


async def test_star_skips_dropped_columns(catalog: Catalog) -> None:
    f = await catalog.resolve(one("TABLE cat_b.only_b"), ("public",))
    assert [c.column for c in f.columns] == ["x", "z"]


async def test_pg_catalog_is_searched_first(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT rolname FROM pg_roles"), ("public",))
    assert f.reads == (TableRef("pg_catalog", "pg_roles"),)


async def test_user_schema(catalog: Catalog, pg_cluster: LocalCluster) -> None:
    pg_cluster.psql(
        "DROP SCHEMA IF EXISTS postgres CASCADE; CREATE SCHEMA postgres;"
        "CREATE TABLE postgres.mine (v int); CREATE TABLE public.mine (w int)"
    )
    try:
        f = await catalog.resolve(one("SELECT * FROM mine"))  # default "$user", public
        assert f.reads == (TableRef("postgres", "mine"),)
        assert [c.column for c in f.columns] == ["v"]
    finally:
        pg_cluster.psql("DROP SCHEMA postgres CASCADE; DROP TABLE public.mine")


async def test_unknown_relation_gets_creation_schema_and_a_flag(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT * FROM no_such_table"), ("nope", "cat_a"))
    assert f.reads == (TableRef("cat_a", "no_such_table"),)
    assert f.columns == (ColumnRef("cat_a", "no_such_table", "*", "output"),)
    assert "unresolved_relation" in f.flags


async def test_invalidate_sees_a_new_column(catalog: Catalog, pg_cluster: LocalCluster) -> None:
    query = one("SELECT * FROM cat_a.people")
    before = await catalog.resolve(query)
    assert [c.column for c in before.columns] == ["id", "name", "email"]
    pg_cluster.psql("ALTER TABLE cat_a.people ADD COLUMN phone text")
    cached = await catalog.resolve(query)
    assert [c.column for c in cached.columns] == ["id", "name", "email"]  # cached until told
    catalog.invalidate()
    after = await catalog.resolve(query)
    assert [c.column for c in after.columns] == ["id", "name", "email", "phone"]


async def test_writes_and_returning_resolved(catalog: Catalog) -> None:
    f = await catalog.resolve(one("DELETE FROM people WHERE id = 1 RETURNING *"), ("cat_a",))
    assert f.writes == (TableRef("cat_a", "people"),)
    assert {(c.column, c.usage) for c in f.columns} == {
        ("id", "predicate"),
        ("id", "returning"),
        ("name", "returning"),
        ("email", "returning"),
    }


async def test_reconnects_after_the_connection_drops(
    catalog: Catalog, pg_cluster: LocalCluster
) -> None:
    await catalog.resolve(one("SELECT * FROM cat_a.people"))
    assert (
        pg_cluster.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgwarden-catalog'"
        ).strip()
        == "1"
    )
    pg_cluster.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'pgwarden-catalog'"
    )
    catalog.invalidate()
    f = await catalog.resolve(one("SELECT * FROM cat_b.people"))
    assert "catalog_unavailable" not in f.flags
    assert [c.column for c in f.columns] == ["id", "secret"]


async def test_lookups_are_planned_once_not_at_every_call(catalog: Catalog) -> None:
    """The metadata queries take arrays of names: a custom plan per call cost more than the
    query (a statement whose cache a write dropped paid it per lookup). After many lookups,
    none of the connection's prepared statements was ever planned for its parameters, and
    what they return still follows the catalog."""
    for _ in range(8):
        catalog.invalidate()
        f = await catalog.resolve(one("SELECT lower(name), upper(email) FROM people"), ("cat_a",))
        assert f.reads == (TableRef("cat_a", "people"),)
    rows = await catalog._fetch(
        "SELECT statement, generic_plans, custom_plans FROM pg_catalog.pg_prepared_statements"
        " WHERE statement LIKE '%ANY($1::text[])%'"
        " AND statement NOT LIKE '%pg_prepared_statements%'"
    )
    assert len(rows) >= 2, rows  # relations and functions, at least
    assert all(r[1] >= 8 and r[2] == 0 for r in rows), rows


async def test_unreachable_catalog_leaves_markers_and_flags() -> None:
    async def refuse() -> asyncpg.Connection:
        raise OSError("connection refused")

    cat = Catalog(refuse, timeout=0.5)
    f = await cat.resolve(one("SELECT * FROM people"))
    assert f.reads == (TableRef("", "people"),)
    assert f.columns == (ColumnRef("", "people", "*", "output"),)
    assert "catalog_unavailable" in f.flags


async def test_an_unreachable_catalog_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def refuse() -> asyncpg.Connection:
        raise ConnectionRefusedError("connection refused")

    with caplog.at_level(logging.WARNING, logger="pgwarden.catalog"):
        f = await Catalog(refuse, timeout=0.5).resolve(one("SELECT * FROM people"))
    assert "catalog_unavailable" in f.flags
    assert any("ConnectionRefusedError" in r.getMessage() for r in caplog.records)


class _BuggyConnection:
    """A real connection under code that fails the way a bug in pgwarden would."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch(self, query: str, *args: Any, **kw: Any) -> Any:
        raise KeyError("a bug, not the catalog")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_a_bug_is_not_read_as_an_unavailable_catalog(pg_cluster: LocalCluster) -> None:
    """Only the network's, the server's and asyncpg's own failures mean "catalog_unavailable";
    anything else propagates, so that it is seen (the session reports an internal error)
    rather than passing as an outage."""

    async def connect() -> Any:
        return _BuggyConnection(await asyncpg.connect(pg_cluster.dsn()))

    cat = Catalog(connect, timeout=1.0)
    try:
        with pytest.raises(KeyError):
            await cat.resolve(one("SELECT * FROM people"))
        with pytest.raises(KeyError):
            await cat.mask_targets([Mask("public", "people", "secret", "redact")])
    finally:
        await cat.close()


async def test_nothing_to_resolve_needs_no_connection() -> None:
    async def refuse() -> asyncpg.Connection:
        raise AssertionError("must not connect")

    # A qualified relation still needs the catalog (it may be a view), and so does a
    # function or an operator (someone may have written it); constants alone do not.
    f = one("SELECT 3 AS three, 'x' AS x")
    assert await Catalog(refuse).resolve(f) is f


def test_parse_search_path() -> None:
    assert parse_search_path('"$user", public') == ("$user", "public")
    assert parse_search_path('App, "My ""Schema""",x') == ("app", 'My "Schema"', "x")
    assert parse_search_path("") == ()


async def test_output_lineage_is_placed_and_star_opened_once(catalog: Catalog) -> None:
    """`*` over a base table becomes one output entry per live column (dropped ones skipped),
    in order; sources get their schemas; resolving resolved facts again changes nothing."""
    f = await catalog.resolve(one("SELECT 'x', *, upper(secret) FROM people, only_b"), ("cat_b",))
    assert f.outputs is not None
    assert [sorted(o.sources) for o in f.outputs] == [
        [],
        [("cat_b", "people", "id")],
        [("cat_b", "people", "secret")],
        [("cat_b", "only_b", "x")],
        [("cat_b", "only_b", "z")],
        # Which relation has it is the catalog's to know: listed against both (over-report).
        [("cat_b", "only_b", "secret"), ("cat_b", "people", "secret")],
    ]
    assert [o.table for o in f.outputs][1:5] == [TableRef("cat_b", "people")] * 2 + [
        TableRef("cat_b", "only_b")
    ] * 2
    assert await catalog.resolve(f, ("cat_b",)) == f
    # An unknown relation's `*` has no width here: an entry of unknown width.
    g = await catalog.resolve(one("SELECT * FROM nowhere"), ("cat_b",))
    assert g.outputs is not None and [o.spread for o in g.outputs] == [True]
