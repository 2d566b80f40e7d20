"""Catalog.refresh against a real PostgreSQL: the cache follows DDL committed on the server,
from the DDL watch's counter when installed, from the snapshot otherwise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, NoReturn

import psycopg
import pytest
from psycopg.rows import TupleRow

from cli.localpg import LocalCluster
from gateway.policy.decision import Mask
from gateway.sql import Catalog, StatementAnalyzer
from gateway.sql import catalog as catalog_module
from gateway.sql.catalog import WATCH_SQL
from tests.harness import create_scratch_database, drop_scratch_database

pytestmark = pytest.mark.server

EMAIL = [Mask("public", "people", "email", "email")]


@pytest.fixture
def database(pg_cluster: LocalCluster) -> Iterator[tuple[str, psycopg.Connection[TupleRow]]]:
    name, dsn = create_scratch_database(pg_cluster, "pgwarden_gen")
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("CREATE TABLE people (id int, email text)")
    try:
        yield dsn, conn
    finally:
        conn.close()
        drop_scratch_database(pg_cluster, name)


class CountingCatalog(Catalog):
    """Counts the probes it sends to the server."""

    probes = 0

    async def _probe(self, conn: Any) -> str | None:
        self.probes += 1
        return await super()._probe(conn)


@pytest.fixture
async def catalog(
    database: tuple[str, psycopg.Connection[TupleRow]],
) -> AsyncIterator[CountingCatalog]:
    cat = CountingCatalog(database[0])
    yield cat
    await cat.close()


def attnum(conn: psycopg.Connection[TupleRow], column: str) -> tuple[int, int]:
    row = conn.execute(
        "SELECT attrelid::int8, attnum FROM pg_attribute"
        " WHERE attrelid = 'people'::regclass AND attname = %s",
        (column,),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def test_without_the_watch_any_commit_moves_the_generation(
    catalog: CountingCatalog, database: tuple[str, psycopg.Connection[TupleRow]]
) -> None:
    _, conn = database
    first = await catalog.refresh()
    assert first is not None and first.startswith("snapshot:") and not catalog.watched
    assert await catalog.refresh() == first  # nothing committed: the cache stands
    before = await catalog.mask_targets(EMAIL)
    assert before == {attnum(conn, "email"): "email"}
    conn.execute("ALTER TABLE people DROP COLUMN email")
    conn.execute("ALTER TABLE people ADD COLUMN email text")
    moved = await catalog.refresh()
    assert moved is not None and moved != first
    # Resolved again, not served from the entry cached before the DDL.
    assert await catalog.mask_targets(EMAIL) == {attnum(conn, "email"): "email"}
    assert attnum(conn, "email") not in (before or {})


async def test_with_the_watch_only_ddl_moves_the_generation(
    catalog: CountingCatalog, database: tuple[str, psycopg.Connection[TupleRow]]
) -> None:
    _, conn = database
    conn.execute(WATCH_SQL.read_bytes())
    first = await catalog.refresh()
    assert first is not None and first.startswith("watch:") and catalog.watched
    conn.execute("INSERT INTO people VALUES (1, 'ada@example.com')")
    assert await catalog.refresh() == first  # writes leave the cache alone
    conn.execute("ALTER TABLE people RENAME COLUMN email TO contact")
    assert await catalog.refresh() != first
    assert await catalog.mask_targets(EMAIL) == {}


async def test_a_disabled_or_replaced_watch_is_not_trusted(
    catalog: CountingCatalog, database: tuple[str, psycopg.Connection[TupleRow]]
) -> None:
    _, conn = database
    conn.execute(WATCH_SQL.read_bytes())
    watched = await catalog.refresh()
    assert watched is not None and watched.startswith("watch:")
    # Disabled, DDL goes unseen by the counter: the snapshot takes over.
    conn.execute("ALTER EVENT TRIGGER pgwarden_ddl_watch DISABLE")
    disabled = await catalog.refresh()
    assert disabled is not None and disabled.startswith("snapshot:") and not catalog.watched
    # Enabled again, without a probe in between: the trigger's row changed, so does the
    # generation, though the counter did not move.
    conn.execute("ALTER EVENT TRIGGER pgwarden_ddl_watch ENABLE ALWAYS")
    again = await catalog.refresh()
    assert again is not None and again.startswith("watch:") and again != watched
    conn.execute("ALTER EVENT TRIGGER pgwarden_ddl_watch DISABLE")
    conn.execute("ALTER TABLE people ADD COLUMN note text")
    conn.execute("ALTER EVENT TRIGGER pgwarden_ddl_watch ENABLE ALWAYS")
    assert await catalog.refresh() not in (again, None)
    # ENABLE (origin only) skips DDL run under session_replication_role = replica.
    conn.execute("ALTER EVENT TRIGGER pgwarden_ddl_watch ENABLE")
    origin = await catalog.refresh()
    assert origin is not None and origin.startswith("snapshot:")


async def test_concurrent_callers_share_a_probe_sent_after_they_called(
    catalog: CountingCatalog,
) -> None:
    await catalog.refresh()
    catalog.probes = 0
    results = await asyncio.gather(*(catalog.refresh() for _ in range(20)))
    assert len(set(results)) == 1
    # One probe may already be under way when the others call: at most one more.
    assert 1 <= catalog.probes <= 2


async def test_an_unreachable_server_confirms_nothing() -> None:
    async def refuse() -> NoReturn:
        raise ConnectionRefusedError("no server")

    cat = Catalog(refuse, timeout=0.5)
    assert await cat.refresh() is None
    assert cat.generation is None and not cat.knows(1, 1)
    assert await cat.mask_targets(EMAIL) is None


async def test_a_shape_resolves_once_per_generation_and_afresh_after_ddl(
    database: tuple[str, psycopg.Connection[TupleRow]], catalog: CountingCatalog
) -> None:
    """Texts of one shape resolve once (each keeps its own text); DDL that moves the
    generation makes the next one resolve against the new catalog."""

    _, conn = database
    analyzer = StatementAnalyzer()
    lookups = 0
    real_lookup = catalog._lookup

    async def counted(names: set[str]) -> dict[str, dict[str, tuple[str, ...]]]:
        nonlocal lookups
        lookups += 1
        return await real_lookup(names)

    catalog._lookup = counted  # type: ignore[method-assign]  # counting this catalog's lookups
    await catalog.refresh()
    first = await catalog.resolve(analyzer.analyze("SELECT * FROM people WHERE id = 1")[0])
    second = await catalog.resolve(analyzer.analyze("SELECT * FROM people WHERE id = 2")[0])
    assert lookups == 1
    assert second.text == "SELECT * FROM people WHERE id = 2"
    assert (
        {c.column for c in second.columns}
        == {c.column for c in first.columns}
        == {
            "id",
            "email",
        }
    )
    conn.execute("ALTER TABLE people ADD COLUMN phone text")
    await catalog.refresh()
    third = await catalog.resolve(analyzer.analyze("SELECT * FROM people WHERE id = 3")[0])
    assert lookups == 2
    assert {c.column for c in third.columns} == {"id", "email", "phone"}


async def test_a_caller_arriving_while_a_probe_is_in_flight_waits_for_the_next(
    database: tuple[str, psycopg.Connection[TupleRow]], catalog: CountingCatalog
) -> None:
    """The probe in flight was sent before the later callers asked: a DDL committed just
    before they asked may be missing from its answer, so they get a probe of their own
    (shared among them), and the earlier caller is not held back for it."""
    dsn, conn = database
    conn.execute(WATCH_SQL.read_text())
    await catalog.refresh()  # connected, reading the watch's counter
    catalog.probes = 0
    # Holding the counter's table locked keeps the first probe on the server.
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE pgwarden.ddl_generation IN ACCESS EXCLUSIVE MODE")
        first = asyncio.ensure_future(catalog.refresh())
        for _ in range(500):
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'pgwarden-catalog' AND wait_event_type = 'Lock'"
            ).fetchone()
            if waiting is not None and waiting[0] == 1:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the first probe never reached the server")
        later = asyncio.ensure_future(catalog.refresh())
        soon = catalog.refresh_soon()
        for _ in range(5):
            await asyncio.sleep(0)
        assert catalog.probes == 1 and not first.done() and not later.done()
        blocker.rollback()
        results = [await first, await later, await soon]
    assert catalog.probes == 2
    assert len(set(results)) == 1 and results[0] is not None
    assert results[0].startswith("watch:")


async def test_a_snapshot_is_steady_once_probes_in_a_row_found_it_unmoved(
    catalog: CountingCatalog,
    database: tuple[str, psycopg.Connection[TupleRow]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records overlap the catalog check only where it rarely fails (gate.record_during_
    catalog_check): a snapshot counts once STEADY_PROBES probes in a row found it unmoved,
    and a commit that moves it makes it unsteady again; with the watch it always is."""
    _, conn = database
    monkeypatch.setattr(catalog_module, "STEADY_PROBES", 3)
    first = await catalog.refresh()
    assert first is not None and first.startswith("snapshot:")
    assert not catalog.steady  # the first reading: nothing to compare it with
    for expected in (False, False, True):
        assert await catalog.refresh() == first
        assert catalog.steady is expected
    conn.execute("INSERT INTO people VALUES (1, 'ada@example.com')")
    assert await catalog.refresh() != first
    assert not catalog.steady
    conn.execute(WATCH_SQL.read_bytes())
    watched = await catalog.refresh()
    assert watched is not None and watched.startswith("watch:") and catalog.steady


async def test_a_probe_sent_after_a_moment_serves_callers_that_need_no_older_one(
    catalog: CountingCatalog, database: tuple[str, psycopg.Connection[TupleRow]]
) -> None:
    """refresh(since=): a statement needs every DDL committed before it arrived seen, so a
    probe sent after that moment serves all of its steps (the check that found its plan
    stale, the re-check of its prepared statement, its resolution): one round trip, not one
    per step. A moment after the last probe's sending, or the cache dropped since, takes a
    probe of its own, which sees DDL committed meanwhile."""
    _, conn = database
    arrived = time.monotonic()
    first = await catalog.refresh()
    assert catalog.probes == 1
    assert await catalog.refresh(arrived) == first
    assert await catalog.refresh(arrived) == first
    assert catalog.probes == 1
    # A statement that arrives after that probe was sent: DDL may have come in between.
    conn.execute("ALTER TABLE people ADD COLUMN later text")
    moved = await catalog.refresh(time.monotonic())
    assert catalog.probes == 2 and moved is not None and moved != first
    # Nothing older than `since` is served after the cache was dropped.
    arrived = time.monotonic()
    assert await catalog.refresh() == moved
    assert catalog.probes == 3
    catalog.invalidate()
    assert await catalog.refresh(arrived) == moved
    assert catalog.probes == 4
    # And without `since`, every call asks the server, as before.
    await catalog.refresh()
    assert catalog.probes == 5
