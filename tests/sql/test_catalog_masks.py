"""Catalog.mask_targets against a real PostgreSQL: masks resolved to RowDescription origins."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn

import asyncpg
import psycopg
import pytest

from cli.localpg import LocalCluster
from gateway.policy.decision import Mask
from gateway.sql import Catalog

pytestmark = pytest.mark.server

SETUP = """
DROP SCHEMA IF EXISTS mk_a CASCADE; DROP SCHEMA IF EXISTS "Mk B" CASCADE;
CREATE SCHEMA mk_a; CREATE SCHEMA "Mk B";
CREATE TABLE mk_a.customers (id int, email text, card text, gone text, name text);
ALTER TABLE mk_a.customers DROP COLUMN gone;
CREATE TABLE "Mk B"."Customers" (id int, "E-Mail" text);
CREATE TABLE mk_a.other (id int, email text);
CREATE VIEW mk_a.v_email AS SELECT id, upper(email) AS shout FROM mk_a.customers;
CREATE VIEW mk_a.v_onlyid AS SELECT id, name FROM mk_a.customers;
CREATE VIEW mk_a.v_nested AS SELECT shout AS s FROM mk_a.v_email;
CREATE VIEW mk_a.v_row AS SELECT row_to_json(c) AS j FROM mk_a.customers c;
CREATE MATERIALIZED VIEW mk_a.mv_card AS SELECT card FROM mk_a.customers;
CREATE TABLE mk_a.events (id int, secret text, at date) PARTITION BY RANGE (at);
CREATE TABLE mk_a.events_2024 PARTITION OF mk_a.events
    FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
"""


@pytest.fixture
async def catalog(pg_cluster: LocalCluster) -> AsyncIterator[Catalog]:
    pg_cluster.psql(SETUP)
    cat = Catalog(pg_cluster.dsn())
    yield cat
    await cat.close()


async def attnums(pg_cluster: LocalCluster, rel: str) -> dict[str, tuple[int, int]]:
    """column name → (table OID, attnum), read independently of the code under test."""
    conn = await asyncpg.connect(pg_cluster.dsn())
    try:
        rows = await conn.fetch(
            "SELECT attname, attrelid::int8, attnum FROM pg_attribute"
            " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
            rel,
        )
    finally:
        await conn.close()
    return {r[0]: (r[1], r[2]) for r in rows}


def row_origins(pg_cluster: LocalCluster, sql: str) -> list[tuple[int, int]]:
    """(table OID, attnum) of each output column as the server's RowDescription reports it."""
    with psycopg.connect(pg_cluster.dsn()) as conn:
        res = conn.pgconn.exec_(sql.encode())
        return [(res.ftable(i), res.ftablecol(i)) for i in range(res.nfields)]


async def test_resolves_columns_across_schemas_and_quoted_names(
    catalog: Catalog, pg_cluster: LocalCluster
) -> None:
    cust = await attnums(pg_cluster, "mk_a.customers")
    quoted = await attnums(pg_cluster, '"Mk B"."Customers"')
    targets = await catalog.mask_targets(
        [
            Mask("mk_a", "customers", "email", "email"),
            Mask("mk_a", "customers", "card", "partial"),
            Mask("Mk B", "Customers", "E-Mail", "hash"),
        ]
    )
    assert targets is not None
    assert targets[cust["email"]] == "email"
    assert targets[cust["card"]] == "partial"
    assert targets[quoted["E-Mail"]] == "hash"
    # Untouched columns and the unmasked table with the same column name stay out.
    assert cust["id"] not in targets and cust["name"] not in targets
    other = await attnums(pg_cluster, "mk_a.other")
    assert other["email"] not in targets
    # attnum skips the dropped column: name is 5, not 4.
    assert cust["name"][1] == 5


async def test_missing_and_dropped_columns_are_skipped(
    catalog: Catalog, pg_cluster: LocalCluster
) -> None:
    other = await attnums(pg_cluster, "mk_a.other")
    targets = await catalog.mask_targets(
        [
            Mask("mk_a", "customers", "gone", "redact"),
            Mask("mk_a", "customers", "nope", "redact"),
            Mask("mk_a", "no_table", "email", "redact"),
            Mask("no_schema", "customers", "email", "redact"),
            Mask("mk_a", "other", "email", "null"),
        ]
    )
    assert targets == {other["email"]: "null"}


async def test_case_matters_for_quoted_names(catalog: Catalog) -> None:
    assert await catalog.mask_targets([Mask("mk b", "customers", "e-mail", "hash")]) == {}


async def test_no_masks_needs_no_query(pg_cluster: LocalCluster) -> None:
    async def refuse() -> NoReturn:
        raise AssertionError("must not connect")

    assert await Catalog(refuse).mask_targets([]) == {}


async def test_views_over_a_masked_column_are_redacted_whole(
    catalog: Catalog, pg_cluster: LocalCluster
) -> None:
    targets = await catalog.mask_targets([Mask("mk_a", "customers", "email", "partial")])
    assert targets is not None
    # What the server itself reports for a SELECT from the view is what must match.
    for sql in (
        "SELECT shout, id FROM mk_a.v_email",
        "SELECT s FROM mk_a.v_nested",
        "SELECT j FROM mk_a.v_row",
    ):
        for origin in row_origins(pg_cluster, sql):
            assert targets.get(origin) == "redact", sql
    # A view that never reads email is left alone.
    for origin in row_origins(pg_cluster, "SELECT id, name FROM mk_a.v_onlyid"):
        assert origin not in targets


async def test_materialized_views_and_partitions(
    catalog: Catalog, pg_cluster: LocalCluster
) -> None:
    targets = await catalog.mask_targets(
        [Mask("mk_a", "customers", "card", "hash"), Mask("mk_a", "events", "secret", "email")]
    )
    assert targets is not None
    (mv,) = row_origins(pg_cluster, "SELECT card FROM mk_a.mv_card")
    assert targets[mv] == "redact"
    # Reading the partition directly names the partition in RowDescription.
    (part,) = row_origins(pg_cluster, "SELECT secret FROM mk_a.events_2024")
    (parent,) = row_origins(pg_cluster, "SELECT secret FROM mk_a.events")
    assert part != parent
    assert targets[part] == "email" and targets[parent] == "email"


async def test_two_masks_on_one_column_keep_the_stronger(
    catalog: Catalog, pg_cluster: LocalCluster
) -> None:
    cust = await attnums(pg_cluster, "mk_a.customers")
    targets = await catalog.mask_targets(
        [
            Mask("mk_a", "customers", "email", "partial"),
            Mask("mk_a", "customers", "email", "hash"),
            Mask("mk_a", "customers", "card", "partial"),
            Mask("mk_a", "customers", "card", "email"),
        ]
    )
    assert targets is not None
    assert targets[cust["email"]] == "hash"
    # partial and email reveal different parts: neither may stand in for the other.
    assert targets[cust["card"]] == "redact"


async def test_unqualified_mask_matches_every_schema(
    catalog: Catalog, pg_cluster: LocalCluster
) -> None:
    pg_cluster.psql(
        "CREATE TABLE public.customers_mk (email text); CREATE SCHEMA IF NOT EXISTS"
        " mk_c; CREATE TABLE mk_c.customers_mk (email text)"
    )
    try:
        targets = await catalog.mask_targets([Mask("", "customers_mk", "email", "redact")])
        assert targets is not None
        pub = await attnums(pg_cluster, "public.customers_mk")
        c = await attnums(pg_cluster, "mk_c.customers_mk")
        assert targets == {pub["email"]: "redact", c["email"]: "redact"}
    finally:
        pg_cluster.psql("DROP TABLE public.customers_mk; DROP SCHEMA mk_c CASCADE")


async def test_cached_until_invalidated(catalog: Catalog, pg_cluster: LocalCluster) -> None:
    mask = Mask("mk_a", "customers", "email", "redact")
    first = await catalog.mask_targets([mask])
    # Recreate the table: new OID. The cache still answers with the old one...
    pg_cluster.psql(
        "DROP TABLE mk_a.customers CASCADE; CREATE TABLE mk_a.customers (email text, id int)"
    )
    assert await catalog.mask_targets([mask]) == first
    # ...until invalidate(), after which the new OID and attnum are found.
    catalog.invalidate()
    now = await attnums(pg_cluster, "mk_a.customers")
    assert await catalog.mask_targets([mask]) == {now["email"]: "redact"}
    assert now["email"] not in (first or {})


async def test_entries_expire_after_the_ttl(pg_cluster: LocalCluster) -> None:
    pg_cluster.psql(SETUP)
    cat = Catalog(pg_cluster.dsn(), ttl=0.0)
    try:
        mask = Mask("mk_a", "other", "email", "redact")
        before = await cat.mask_targets([mask])
        pg_cluster.psql("DROP TABLE mk_a.other; CREATE TABLE mk_a.other (email text)")
        after = await cat.mask_targets([mask])
        assert before != after
        assert after == {(await attnums(pg_cluster, "mk_a.other"))["email"]: "redact"}
    finally:
        await cat.close()


async def test_unreachable_catalog_returns_none(pg_cluster: LocalCluster) -> None:
    async def broken() -> NoReturn:
        raise OSError("connection refused")

    cat = Catalog(broken, timeout=0.5)
    assert await cat.mask_targets([Mask("mk_a", "customers", "email", "redact")]) is None
    # And again while the failure is recent (no connect attempt, still no exception).
    assert await cat.mask_targets([Mask("mk_a", "customers", "email", "redact")]) is None


async def test_dropped_connection_reconnects(catalog: Catalog, pg_cluster: LocalCluster) -> None:
    mask = Mask("mk_a", "other", "email", "redact")
    assert await catalog.mask_targets([mask])
    pg_cluster.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'pgwarden-catalog'"
    )
    catalog.invalidate()
    targets = await catalog.mask_targets([mask])
    other = await attnums(pg_cluster, "mk_a.other")
    assert targets == {other["email"]: "redact"}


async def test_a_missing_column_is_looked_up_again(
    catalog: Catalog, pg_cluster: LocalCluster
) -> None:
    mask = Mask("mk_a", "later", "email", "hash")
    assert await catalog.mask_targets([mask]) == {}
    # Created by another session, no invalidate(): masked from the next statement on.
    pg_cluster.psql("CREATE TABLE mk_a.later (id int, email text)")
    later = await attnums(pg_cluster, "mk_a.later")
    assert await catalog.mask_targets([mask]) == {later["email"]: "hash"}


async def test_a_missing_column_is_kept_absent_only_under_a_confirmed_generation(
    catalog: Catalog, pg_cluster: LocalCluster
) -> None:
    """Under a generation a probe confirmed, a masked column that does not exist is not
    looked up for every statement (a policy naming columns some tables lack would ask
    the catalog each time); the DDL that creates it moves the generation, and the next
    probe, which every statement waits for, has it looked up again."""
    mask = Mask("mk_a", "later_gen", "email", "hash")
    queries = 0
    real_fetch = catalog._fetch

    async def counted(query: str, *args: Any) -> list[Any]:
        nonlocal queries
        queries += 1
        return await real_fetch(query, *args)

    catalog._fetch = counted  # type: ignore[method-assign]  # counting this catalog's reads
    assert await catalog.refresh() is not None
    assert await catalog.mask_targets([mask]) == {}
    assert queries == 1
    assert await catalog.refresh() is not None  # nothing committed: the same generation
    assert await catalog.mask_targets([mask]) == {}
    assert queries == 1
    pg_cluster.psql("CREATE TABLE mk_a.later_gen (id int, email text)")
    assert await catalog.refresh() is not None
    later = await attnums(pg_cluster, "mk_a.later_gen")
    assert await catalog.mask_targets([mask]) == {later["email"]: "hash"}
    assert queries == 2
