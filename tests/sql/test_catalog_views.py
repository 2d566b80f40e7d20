"""Catalog.resolve reads through views: what a statement over a view really reads.

Against a real PostgreSQL: base relations of views, materialized views and nested views join
`reads` (flag via_view); each view column used maps to the base columns it comes from, with
the same usage; functions the policy cannot see into set opaque_function.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from cli.localpg import LocalCluster
from gateway.policy.decision import Mask
from gateway.sql import Catalog, ColumnRef, StatementFacts, TableRef, analyze
from gateway.sql.views import _node_tree, _rule_shape

pytestmark = pytest.mark.server

SETUP = """
DROP SCHEMA IF EXISTS vw CASCADE; DROP SCHEMA IF EXISTS vw_fn CASCADE;
CREATE SCHEMA vw; CREATE SCHEMA vw_fn;
CREATE TABLE vw.people (id int, name text, email text, phone text, ssn text);
CREATE TABLE vw.orders (id int, person_id int, amount numeric);
CREATE VIEW vw.v AS SELECT id, email FROM vw.people;
CREATE VIEW vw.v_renamed AS SELECT email AS id, id AS email FROM vw.people;
CREATE VIEW vw.v_expr AS SELECT id, upper(name) AS shout FROM vw.people WHERE phone IS NOT NULL;
CREATE VIEW vw.v_nested AS SELECT email AS e, id FROM vw.v;
CREATE VIEW vw.v_deep AS SELECT e AS mail FROM vw.v_nested;
CREATE MATERIALIZED VIEW vw.mv AS
    SELECT p.id, p.email, o.amount FROM vw.people p JOIN vw.orders o ON o.person_id = p.id;
CREATE VIEW vw.v_union AS SELECT email AS x FROM vw.people UNION ALL SELECT name FROM vw.people;
CREATE VIEW vw.v_row AS SELECT id, row_to_json(p) AS j FROM vw.people p;
CREATE VIEW vw.v_count AS SELECT count(*) AS n FROM vw.people;
CREATE VIEW vw.v_orders AS SELECT id, amount FROM vw.orders;
CREATE FUNCTION vw_fn.mine(int) RETURNS int LANGUAGE sql AS 'SELECT $1';
CREATE FUNCTION vw_fn.upper(int) RETURNS int LANGUAGE sql AS 'SELECT $1';
CREATE FUNCTION vw_fn.mine_pl(int) RETURNS int LANGUAGE plpgsql AS 'BEGIN RETURN $1; END';
CREATE FUNCTION vw_fn.lower(int) RETURNS int LANGUAGE plpgsql AS 'BEGIN RETURN $1; END';
CREATE FUNCTION vw_fn.bump() RETURNS int LANGUAGE sql
    AS 'UPDATE vw.orders SET amount = amount RETURNING 1';
CREATE FUNCTION vw_fn.loop(int) RETURNS int LANGUAGE sql AS 'SELECT vw_fn.loop($1)';
CREATE FUNCTION vw_fn.emails() RETURNS SETOF text LANGUAGE sql AS 'SELECT email FROM vw.people';
CREATE VIEW vw.v_fn AS SELECT e FROM vw_fn.emails() AS e;
CREATE VIEW vw.v_over_fn AS SELECT e AS mail FROM vw.v_fn;
CREATE VIEW vw.v_xml AS SELECT query_to_xml('SELECT 1', true, false, '') AS x;
CREATE FUNCTION vw_fn.same(int, int) RETURNS boolean LANGUAGE sql AS 'SELECT $1 = $2';
CREATE OPERATOR vw_fn.#=# (LEFTARG = int, RIGHTARG = int, FUNCTION = vw_fn.same);
CREATE OPERATOR vw_fn.#<# (LEFTARG = int, RIGHTARG = int, FUNCTION = pg_catalog.int4lt);
CREATE FUNCTION vw_fn.shout(vw.people) RETURNS text LANGUAGE sql AS 'SELECT upper($1.name)';
CREATE FUNCTION vw_fn.ok(int) RETURNS boolean LANGUAGE sql AS 'SELECT $1 > 0';
CREATE DOMAIN vw_fn.checked AS int CHECK (vw_fn.ok(VALUE));
CREATE DOMAIN vw_fn.plain AS int CHECK (VALUE > 0);
CREATE TYPE vw_fn.wrapped AS (v int);
CREATE FUNCTION vw_fn.wrap(int) RETURNS vw_fn.wrapped LANGUAGE sql AS 'SELECT ROW($1)';
CREATE CAST (int AS vw_fn.wrapped) WITH FUNCTION vw_fn.wrap(int);
"""

PATH = ("vw", "public")


@pytest.fixture
async def catalog(pg_cluster: LocalCluster) -> AsyncIterator[Catalog]:
    pg_cluster.psql(SETUP)
    cat = Catalog(pg_cluster.dsn())
    yield cat
    await cat.close()


def one(sql: str) -> StatementFacts:
    (facts,) = analyze(sql)
    return facts


def cols(f: StatementFacts, table: str) -> set[tuple[str, str]]:
    return {(c.column, c.usage) for c in f.columns if (c.schema, c.table) == ("vw", table)}


async def test_view_reads_its_base_table(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT email FROM v"), PATH)
    assert f.reads == (TableRef("vw", "v"), TableRef("vw", "people"))
    assert "via_view" in f.flags
    assert cols(f, "v") == {("email", "output")}
    assert cols(f, "people") == {("email", "output")}


async def test_qualified_view_is_read_through_too(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT email FROM vw.v"), ("public",))
    assert TableRef("vw", "people") in f.reads
    assert ColumnRef("vw", "people", "email", "output") in f.columns


async def test_a_predicate_on_a_view_column_is_a_predicate_on_its_base_column(
    catalog: Catalog,
) -> None:
    f = await catalog.resolve(one("SELECT count(*) FROM v WHERE email LIKE 'a%'"), PATH)
    assert cols(f, "people") == {("email", "predicate")}


async def test_columns_map_by_origin_not_by_name(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT email FROM v_renamed WHERE id = 'x'"), PATH)
    # v_renamed.email is people.id; v_renamed.id is people.email.
    assert cols(f, "people") == {("id", "output"), ("email", "predicate")}
    # A column that is a plain base column maps to that column alone.
    f = await catalog.resolve(one("SELECT id FROM v WHERE id = 1"), PATH)
    assert cols(f, "people") == {("id", "output"), ("id", "predicate")}


async def test_star_over_a_view(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT * FROM v"), PATH)
    assert cols(f, "v") == {("id", "output"), ("email", "output")}
    assert cols(f, "people") == {("id", "output"), ("email", "output")}


async def test_nested_views_reach_the_base_table(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT mail FROM v_deep WHERE mail <> ''"), PATH)
    assert set(f.reads) == {
        TableRef("vw", "v_deep"),
        TableRef("vw", "v_nested"),
        TableRef("vw", "v"),
        TableRef("vw", "people"),
    }
    assert cols(f, "people") == {("email", "output"), ("email", "predicate")}
    assert cols(f, "v_nested") == {("e", "output"), ("e", "predicate")}


async def test_materialized_view(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT * FROM mv ORDER BY email"), PATH)
    assert {TableRef("vw", "people"), TableRef("vw", "orders")} <= set(f.reads)
    assert "via_view" in f.flags
    assert cols(f, "people") == {("id", "output"), ("email", "output"), ("email", "order")}
    assert cols(f, "orders") == {("amount", "output")}


async def test_expression_column_stands_for_every_column_the_view_uses(
    catalog: Catalog,
) -> None:
    # upper(name): PostgreSQL reports no origin; the view also uses phone in its WHERE.
    f = await catalog.resolve(one("SELECT shout FROM v_expr"), PATH)
    assert cols(f, "people") == {("id", "output"), ("name", "output"), ("phone", "output")}
    # The plain column beside it stays precise.
    f = await catalog.resolve(one("SELECT count(*) FROM v_expr WHERE id > 1"), PATH)
    assert cols(f, "people") == {("id", "predicate")}


async def test_union_view_column_stands_for_all_it_draws_on(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT 1 FROM v_union WHERE x = 'a'"), PATH)
    assert cols(f, "people") == {("email", "predicate"), ("name", "predicate")}


async def test_whole_row_use_stands_for_every_column(catalog: Catalog) -> None:
    # PostgreSQL records only people.id for this view: the whole-row Var leaves no trace
    # in pg_depend once a column of the same table is named.
    f = await catalog.resolve(one("SELECT j FROM v_row"), PATH)
    assert cols(f, "people") == {(c, "output") for c in ("id", "name", "email", "phone", "ssn")}


async def test_aggregate_view_reads_but_names_no_column(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT n FROM v_count WHERE n > 1"), PATH)
    assert TableRef("vw", "people") in f.reads
    assert cols(f, "people") == set()


async def test_view_over_orders_only(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT * FROM v_orders"), PATH)
    assert set(f.reads) == {TableRef("vw", "v_orders"), TableRef("vw", "orders")}
    assert not cols(f, "people")


async def test_tables_are_not_flagged(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT email FROM people"), PATH)
    assert f.reads == (TableRef("vw", "people"),)
    assert "via_view" not in f.flags


async def test_lineage_is_cached_until_invalidated(
    catalog: Catalog, pg_cluster: LocalCluster
) -> None:
    query = one("SELECT email FROM v")
    before = await catalog.resolve(query, PATH)
    assert cols(before, "people") == {("email", "output")}
    pg_cluster.psql("CREATE OR REPLACE VIEW vw.v AS SELECT id, ssn AS email FROM vw.people")
    cached = await catalog.resolve(query, PATH)
    assert cols(cached, "people") == {("email", "output")}
    catalog.invalidate()
    after = await catalog.resolve(query, PATH)
    assert cols(after, "people") == {("ssn", "output")}


async def test_lineage_expires(pg_cluster: LocalCluster) -> None:
    pg_cluster.psql(SETUP)
    cat = Catalog(pg_cluster.dsn(), ttl=0.0)
    try:
        query = one("SELECT email FROM v")
        assert cols(await cat.resolve(query, PATH), "people") == {("email", "output")}
        pg_cluster.psql("CREATE OR REPLACE VIEW vw.v AS SELECT id, ssn AS email FROM vw.people")
        assert cols(await cat.resolve(query, PATH), "people") == {("ssn", "output")}
    finally:
        await cat.close()


class _FailingLineage:
    """A real connection whose view-lineage query fails: the catalog goes away mid-resolve."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch(self, query: str, *args: Any, **kw: Any) -> Any:
        if "pg_rewrite" in query or "pg_proc" in query:
            raise ConnectionError("gone")
        return await self._conn.fetch(query, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_failure_while_reading_through_views_is_flagged_not_raised(
    pg_cluster: LocalCluster,
) -> None:
    pg_cluster.psql(SETUP)

    async def connect() -> Any:
        return _FailingLineage(await asyncpg.connect(pg_cluster.dsn()))

    cat = Catalog(connect, timeout=1.0)
    try:
        f = await cat.resolve(one("SELECT email FROM v"), PATH)
        assert "catalog_unavailable" in f.flags
        assert f.reads == (TableRef("vw", "v"),)
        f = await cat.resolve(one("SELECT mine(1)"), PATH)
        assert "catalog_unavailable" in f.flags
    finally:
        await cat.close()


# -- functions ------------------------------------------------------------------------------


async def test_user_function_is_opaque_and_qualified(catalog: Catalog) -> None:
    # plpgsql: its body is not read (LANGUAGE sql bodies are, below).
    f = await catalog.resolve(one("SELECT mine_pl(1)"), ("vw_fn", "public"))
    assert "opaque_function" in f.flags
    assert f.functions == ("vw_fn.mine_pl",)
    f = await catalog.resolve(one("SELECT vw_fn.mine_pl(1)"), ("public",))
    assert "opaque_function" in f.flags


async def test_a_sql_function_is_traced_through_its_body(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT mine(1)"), ("vw_fn", "public"))
    assert "opaque_function" not in f.flags
    assert f.functions == ("vw_fn.mine",) and f.traced_functions == ("vw_fn.mine",)
    assert not f.calls_untraced_function()
    f = await catalog.resolve(one("SELECT 1 AS k, vw_fn.emails()"), ("public",))
    assert "opaque_function" not in f.flags
    assert TableRef("vw", "people") in f.reads
    assert ColumnRef("vw", "people", "email", "expression") in f.columns
    assert f.outputs is not None and all(("vw", "people", "email") in o.sources for o in f.outputs)


@pytest.mark.parametrize(
    "text",
    ["SELECT vw_fn.bump()", "SELECT vw_fn.loop(1)", "SELECT e FROM vw_fn.emails() e, mine_pl(1)"],
)
async def test_a_sql_function_that_writes_recurses_or_calls_opaque_code_is_opaque(
    catalog: Catalog, text: str
) -> None:
    f = await catalog.resolve(one(text), ("vw_fn", "public"))
    assert "opaque_function" in f.flags
    assert f.traced_functions == ()


async def test_builtins_are_not_opaque(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT lower(name), now() FROM people"), PATH)
    assert "opaque_function" not in f.flags
    assert f.functions == ("pg_catalog.lower", "pg_catalog.now")


async def test_a_builtin_name_shadowed_on_the_path_is_opaque(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT lower(1)"), ("vw_fn", "public"))
    assert "opaque_function" in f.flags
    f = await catalog.resolve(one("SELECT lower('a')"), ("public",))
    assert "opaque_function" not in f.flags
    # Shadowed by a LANGUAGE sql function that only reads: traced through its body.
    f = await catalog.resolve(one("SELECT upper(1)"), ("vw_fn", "public"))
    assert "opaque_function" not in f.flags


async def test_builtins_that_run_sql_text_are_opaque(catalog: Catalog) -> None:
    f = await catalog.resolve(
        one("SELECT query_to_xml('SELECT email FROM vw.people', true, false, '')"), PATH
    )
    assert "opaque_function" in f.flags
    f = await catalog.resolve(one("SELECT * FROM ts_stat('SELECT 1')"), PATH)
    assert "opaque_function" in f.flags


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("SELECT 1 #=# 2", ("vw_fn", "public")),
        ("SELECT id FROM people WHERE id #=# 1", ("vw", "vw_fn")),
        ("SELECT 1 WHERE 1 #=# ANY (SELECT id FROM people)", ("vw", "vw_fn")),
        ("SELECT 1 WHERE 1 #=# ANY ('{1}')", ("vw_fn",)),
        ("SELECT 1 OPERATOR(vw_fn.#=#) 2", ("public",)),
    ],
)
async def test_an_operator_backed_by_a_user_function_is_opaque(
    catalog: Catalog, text: str, path: tuple[str, ...]
) -> None:
    """No function name appears, yet the operator runs vw_fn.same for every row."""
    f = await catalog.resolve(one(text), path)
    assert "opaque_function" in f.flags, text


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("SELECT id + 1 FROM people WHERE id = 1 AND name LIKE 'a%' ORDER BY id", PATH),
        ("SELECT 1 #=# 2", ("public",)),  # not on the path: PostgreSQL would not find it
        ("SELECT 1 #<# 2", ("vw_fn",)),  # a user's operator over a built-in function
    ],
)
async def test_builtin_operators_are_not_opaque(
    catalog: Catalog, text: str, path: tuple[str, ...]
) -> None:
    f = await catalog.resolve(one(text), path)
    assert "opaque_function" not in f.flags, text


@pytest.mark.parametrize(
    "text",
    [
        "SELECT p.shout FROM people p",
        "SELECT (p).shout FROM people p",
        "SELECT people.shout FROM people",
    ],
)
async def test_a_function_called_by_attribute_notation_is_opaque(
    catalog: Catalog, text: str
) -> None:
    """`p.shout` is vw_fn.shout(p) when people has no column shout."""
    f = await catalog.resolve(one(text), ("vw", "vw_fn"))
    assert "opaque_function" in f.flags, text
    f = await catalog.resolve(one(text), ("vw",))  # not on the path: PostgreSQL would not find it
    assert "opaque_function" not in f.flags, text


async def test_columns_by_attribute_notation_are_not_opaque(catalog: Catalog) -> None:
    f = await catalog.resolve(one("SELECT p.name, (p).email FROM people p"), ("vw", "vw_fn"))
    assert "opaque_function" not in f.flags


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("SELECT 1::checked", ("vw_fn",)),
        ("SELECT CAST(id AS vw_fn.checked) FROM vw.people", ("public",)),
        ("SELECT 1::wrapped", ("vw_fn",)),
    ],
)
async def test_a_cast_running_a_user_function_is_opaque(
    catalog: Catalog, text: str, path: tuple[str, ...]
) -> None:
    f = await catalog.resolve(one(text), path)
    assert "opaque_function" in f.flags, text


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("SELECT 1::plain, 2::int, 'x'::text, now()::date", ("vw_fn",)),
        ("SELECT 1::checked", ("public",)),  # not on the path
    ],
)
async def test_casts_to_plain_types_are_not_opaque(
    catalog: Catalog, text: str, path: tuple[str, ...]
) -> None:
    f = await catalog.resolve(one(text), path)
    assert "opaque_function" not in f.flags, text


async def test_a_view_over_an_opaque_function_is_opaque(catalog: Catalog) -> None:
    for text in ("SELECT e FROM v_fn", "SELECT mail FROM v_over_fn", "SELECT x FROM v_xml"):
        f = await catalog.resolve(one(text), PATH)
        assert "opaque_function" in f.flags, text
        assert "via_view" in f.flags, text
    f = await catalog.resolve(one("SELECT * FROM v_expr"), PATH)  # upper(text) is built in
    assert "opaque_function" not in f.flags


# -- masks of views that use a row whole ------------------------------------------------------


async def test_mask_targets_cover_a_whole_row_view_that_also_names_a_column(
    catalog: Catalog, pg_cluster: LocalCluster
) -> None:
    targets = await catalog.mask_targets([Mask("vw", "people", "email", "email")])
    assert targets is not None
    conn = await asyncpg.connect(pg_cluster.dsn())
    try:
        oid = await conn.fetchval("SELECT 'vw.v_row'::regclass::int8")
        v_orders = await conn.fetchval("SELECT 'vw.v_orders'::regclass::int8")
    finally:
        await conn.close()
    assert targets.get((oid, 2)) == "redact"
    assert not any(relid == v_orders for relid, _ in targets)


# -- the query-tree reader --------------------------------------------------------------------


def test_node_tree_tokens() -> None:
    tree = _node_tree(r'({QUERY :a (1 2) :b {X :c a\ b\)} :d <> :e "q\"x"})')
    assert tree[0][0] == "QUERY"
    assert tree[0].field("a") == ["1", "2"]
    assert tree[0].field("b").field("c") == r"a\ b\)"
    assert tree[0].field("d") == "<>"


def test_rule_shape_not_understood_is_none() -> None:
    assert _rule_shape(None) is None
    assert _rule_shape("({QUERY :targetList (") is None
    assert _rule_shape("({NOTAQUERY})") is None
    shape = _rule_shape(
        "({QUERY :targetList ({TARGETENTRY :expr {VAR :varno 1 :varattno 0} :resno 1"
        " :resname j :ressortgroupref 0 :resorigtbl 0 :resorigcol 0 :resjunk false}"
        " {TARGETENTRY :expr {VAR :varno 1 :varattno 2} :resno 2 :resname e"
        " :ressortgroupref 0 :resorigtbl 42 :resorigcol 2 :resjunk false})})"
    )
    assert shape == ({2: (42, 2)}, True)


async def test_a_view_created_since_the_masks_were_cached_is_masked(
    catalog: Catalog, pg_cluster: LocalCluster
) -> None:
    masks = [Mask("vw", "people", "email", "email")]
    before = await catalog.mask_targets(masks)
    assert before is not None
    pg_cluster.psql("CREATE VIEW vw.v_late AS SELECT email AS late FROM vw.people")
    # Created directly: nothing called invalidate(). Reading it is what the gateway sees.
    f = await catalog.resolve(one("SELECT late FROM v_late"), PATH)
    assert ColumnRef("vw", "people", "email", "output") in f.columns
    after = await catalog.mask_targets(masks)
    assert after is not None
    conn = await asyncpg.connect(pg_cluster.dsn())
    try:
        oid = await conn.fetchval("SELECT 'vw.v_late'::regclass::int8")
    finally:
        await conn.close()
    assert (oid, 1) not in before
    assert after.get((oid, 1)) == "redact"
