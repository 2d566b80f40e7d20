"""Masks never fail open after DDL made directly on the server: an ai-agents token through
the real gateway, with and without the DDL watch (event trigger) installed.

Each test warms the gateway's catalog with a read, changes the schema straight on the
server (superuser, bypassing the gateway), then reads again at once: no classified value
may reach the client in clear.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.rows import TupleRow

from cli.localpg import APP_SCHEMA_SQL, SUPERUSER
from gateway.control.targets import Target
from gateway.sql.catalog import STEADY_PROBES
from tests.harness import (
    RunningGateway,
    StoredTargets,
    create_scratch_database,
    drop_scratch_database,
)

from . import connect, simple, token_for
from .test_audit_support import records_after, wait_for
from .test_execute_plans import planned_executes

pytestmark = pytest.mark.server

EMAILS = {"ada@example.com", "grace@example.org"}
NAMES = {"Ada", "Grace"}
SSNS = {"123-45-6789", "987-65-4321"}
# A copy of customers, then swapped in under its name (the classic online migration).
NEW_COPY = "CREATE TABLE customers_new AS TABLE customers"
SWAP = (
    "BEGIN; ALTER TABLE customers RENAME TO customers_old;"
    " ALTER TABLE customers_new RENAME TO customers; COMMIT"
)
WATCH_SQL = Path(__file__).resolve().parents[2] / "gateway" / "sql" / "ddl_watch.sql"


@dataclass
class Db:
    """A scratch copy of the sample database behind a target of its own."""

    target: str
    dsn: str  # superuser, straight to the server
    conn: psycopg.Connection[TupleRow]
    # The DDL watch is installed (else the generation is the snapshot).
    watched: bool = False

    def ddl(self, text: str) -> None:
        self.conn.execute(text.encode())


@pytest.fixture(params=["watched", "unwatched"])
def db(request: pytest.FixtureRequest, gateway: RunningGateway) -> Iterator[Db]:
    name, dsn = create_scratch_database(gateway.cluster, "pgwarden_ddl")
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(APP_SCHEMA_SQL.encode())
    if request.param == "watched":
        conn.execute(WATCH_SQL.read_bytes())
    target = f"ddl_{uuid.uuid4().hex[:8]}"
    registry = StoredTargets(gateway.settings)
    registry.add(
        Target(
            name=target,
            host="127.0.0.1",
            port=gateway.cluster.port,
            dbname=name,
            user=SUPERUSER,
            password_env="PGWARDEN_TEST_UPSTREAM_PW",
            sslmode="disable",
        )
    )
    try:
        yield Db(target, dsn, conn, watched=request.param == "watched")
    finally:
        conn.close()
        registry.remove(target)
        drop_scratch_database(gateway.cluster, name)


@pytest.fixture
def agent(gateway: RunningGateway, db: Db) -> Iterator[psycopg.Connection[TupleRow]]:
    with connect(gateway.dsn(token_for(gateway, "ai-agents"), target=db.target)) as conn:
        yield conn


def read(conn: psycopg.Connection[TupleRow], text: str, *, prepare: bool = False) -> set[str]:
    with conn.cursor() as cur:
        cur.execute(text.encode() if not prepare else text, prepare=prepare)
        return {str(v) for row in cur.fetchall() for v in row if v is not None}


def assert_masked(seen: set[str], clear: set[str]) -> None:
    assert seen, "no rows came back"
    assert not seen & clear, f"cleartext reached the client: {seen & clear}"


def test_table_swap(db: Db, agent: psycopg.Connection[TupleRow]) -> None:
    db.ddl(NEW_COPY)
    assert_masked(read(agent, "SELECT id, email FROM customers"), EMAILS)
    db.ddl(SWAP)
    assert_masked(read(agent, "SELECT id, email FROM customers"), EMAILS)
    assert_masked(read(agent, "SELECT * FROM customers"), EMAILS)


def test_new_table_under_the_classified_name(db: Db, agent: psycopg.Connection[TupleRow]) -> None:
    assert_masked(read(agent, "SELECT id, email FROM customers"), EMAILS)
    db.ddl("ALTER TABLE customers RENAME TO customers_gone")
    db.ddl("CREATE TABLE customers (email text, id int)")
    db.ddl("INSERT INTO customers SELECT email, id FROM customers_gone")
    assert_masked(read(agent, "SELECT id, email FROM customers"), EMAILS)


def test_classified_column_dropped_and_added(db: Db, agent: psycopg.Connection[TupleRow]) -> None:
    assert_masked(read(agent, "SELECT id, email FROM customers"), EMAILS)
    db.ddl("ALTER TABLE customers DROP COLUMN email")
    db.ddl("ALTER TABLE customers ADD COLUMN email text")
    db.ddl(
        "UPDATE customers SET email = CASE id WHEN 1 THEN 'ada@example.com'"
        " ELSE 'grace@example.org' END"
    )
    assert_masked(read(agent, "SELECT id, email FROM customers"), EMAILS)
    assert_masked(read(agent, "SELECT * FROM customers"), EMAILS)


def test_schema_renamed(db: Db, agent: psycopg.Connection[TupleRow]) -> None:
    assert_masked(read(agent, "SELECT id, email FROM customers"), EMAILS)
    db.ddl(
        "BEGIN; ALTER SCHEMA public RENAME TO public_old; CREATE SCHEMA public;"
        " CREATE TABLE public.customers AS SELECT * FROM public_old.customers; COMMIT"
    )
    assert_masked(read(agent, "SELECT id, email FROM customers"), EMAILS)
    assert_masked(read(agent, "SELECT id, email FROM public.customers"), EMAILS)


def test_view_redefined_over_a_classified_column(
    db: Db, agent: psycopg.Connection[TupleRow]
) -> None:
    db.ddl("CREATE VIEW people AS SELECT id, name AS label FROM customers")
    assert read(agent, "SELECT label FROM people") == NAMES  # nothing classified: clear
    db.ddl("CREATE OR REPLACE VIEW people AS SELECT id, email AS label FROM customers")
    assert_masked(read(agent, "SELECT label FROM people"), EMAILS)
    assert_masked(read(agent, "SELECT * FROM people"), EMAILS)


def test_another_column_renamed_to_the_classified_name(
    db: Db, agent: psycopg.Connection[TupleRow]
) -> None:
    assert read(agent, "SELECT name FROM customers") == NAMES
    assert_masked(read(agent, "SELECT id, email FROM customers"), EMAILS)
    db.ddl(
        "BEGIN; ALTER TABLE customers RENAME COLUMN email TO email_before;"
        " ALTER TABLE customers RENAME COLUMN name TO email; COMMIT"
    )
    # `email` is classified by name: whatever column now answers to it is masked.
    assert_masked(read(agent, "SELECT id, email FROM customers"), NAMES)


def test_prepared_statement_after_a_view_is_redefined(
    db: Db, agent: psycopg.Connection[TupleRow]
) -> None:
    db.ddl("CREATE VIEW people AS SELECT id, name AS label FROM customers")
    query = "SELECT label FROM people WHERE id > %s"
    with agent.cursor() as cur:
        cur.execute(query, (0,), prepare=True)
        assert {r[0] for r in cur.fetchall()} == NAMES
        db.ddl("CREATE OR REPLACE VIEW people AS SELECT id, email AS label FROM customers")
        # The same prepared statement: the server plans it again over the new view.
        cur.execute(query, (0,), prepare=True)
        assert_masked({str(r[0]) for r in cur.fetchall() if r[0] is not None}, EMAILS)


def _wait_for_lock_wait(db: Db, timeout: float = 20.0) -> None:
    """Until a gateway backend waits for a lock (the swap below holds customers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = db.conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        ).fetchall()
        if rows:
            return
        time.sleep(0.02)
    raise AssertionError("the gateway's statement never waited for the swap's lock")


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_swap_committed_while_the_statement_waits(
    db: Db, agent: psycopg.Connection[TupleRow], protocol: str
) -> None:
    """The decision is made before the swap commits, the server runs the statement after:
    the RowDescription names a table the decision never saw, resolved before rows flow."""
    db.ddl(NEW_COPY)
    assert_masked(read(agent, "SELECT id, email FROM customers"), EMAILS)
    swap = psycopg.connect(db.dsn, autocommit=True)
    try:
        swap.execute(
            b"BEGIN; ALTER TABLE customers RENAME TO customers_old;"
            b" ALTER TABLE customers_new RENAME TO customers"
        )
        seen: list[set[str]] = []
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                text = "SELECT id, email FROM customers"
                if protocol == "simple":
                    seen.append({str(v) for r in simple(agent, text) for v in r if v is not None})
                else:
                    seen.append(read(agent, text))
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        _wait_for_lock_wait(db)
        swap.execute(b"COMMIT")
        thread.join(30)
        assert not errors, errors
        assert_masked(seen[0], EMAILS)
    finally:
        swap.close()


def test_table_swapped_under_a_statement_the_driver_does_not_describe_again(
    gateway: RunningGateway, db: Db
) -> None:
    """asyncpg keeps a prepared statement's description and sends Bind/Execute alone: the
    only description pgwarden has names the table swapped away."""
    db.ddl(NEW_COPY)

    async def scenario() -> tuple[set[str], set[str]]:
        conn = await asyncpg.connect(gateway.url(token_for(gateway, "ai-agents"), target=db.target))
        try:
            stmt = await conn.prepare("SELECT id, email FROM customers")
            before = {str(v) for r in await stmt.fetch() for v in r if v is not None}
            db.ddl(SWAP)
            after = {str(v) for r in await stmt.fetch() for v in r if v is not None}
            return before, after
        finally:
            await conn.close()

    before, after = asyncio.run(scenario())
    assert_masked(before, EMAILS)
    assert_masked(after, EMAILS)


def test_columns_added_while_a_star_waits(db: Db, agent: psycopg.Connection[TupleRow]) -> None:
    """`SELECT *` is decided on a table without ssn and nickname; the server runs it after
    both were added: ssn is masked by its classification, and nickname, which the policy
    was never asked about, is masked whole."""
    db.ddl("ALTER TABLE customers DROP COLUMN ssn")
    assert_masked(read(agent, "SELECT * FROM customers"), EMAILS)
    add = psycopg.connect(db.dsn, autocommit=True)
    try:
        add.execute(
            b"BEGIN; ALTER TABLE customers ADD COLUMN ssn text, ADD COLUMN nickname text;"
            b" UPDATE customers SET nickname = 'nick-' || name,"
            b" ssn = CASE id WHEN 1 THEN '123-45-6789' ELSE '987-65-4321' END"
        )
        seen: list[set[str]] = []
        thread = threading.Thread(
            target=lambda: seen.append(read(agent, "SELECT * FROM customers"))
        )
        thread.start()
        _wait_for_lock_wait(db)
        add.execute(b"COMMIT")
        thread.join(30)
        assert seen, "the read failed"
        assert_masked(seen[0], EMAILS | SSNS | {"nick-Ada", "nick-Grace"})
        assert seen[0] >= NAMES  # columns the decision saw keep their own treatment
    finally:
        add.close()


def test_a_planned_execute_is_decided_afresh_after_ddl(
    gateway: RunningGateway, db: Db, agent: psycopg.Connection[TupleRow]
) -> None:
    """A prepared statement executed on the plan its Parse made (nothing to mask: a table
    without classified columns) is decided again once DDL put a classified column under
    its name, however the generation is read (watch or snapshot)."""
    db.ddl("CREATE TABLE notes (id int, body text)")
    db.ddl("INSERT INTO notes VALUES (1, 'plain'), (2, 'text')")
    query = "SELECT body FROM notes WHERE id > %s"
    context = gateway.gateway.context
    assert context is not None
    metrics = context.metrics
    with agent.cursor() as cur:
        before = sum(metrics.planned_executes.values())
        for _ in range(3):
            cur.execute(query, (0,), prepare=True)
            assert {r[0] for r in cur.fetchall()} == {"plain", "text"}
        # Without the watch any commit anywhere moves the generation: only watched is sure.
        if db.watched:
            assert sum(metrics.planned_executes.values()) >= before + 2
        db.ddl(
            "BEGIN; ALTER TABLE notes RENAME TO notes_old;"
            " CREATE VIEW notes AS SELECT id, email AS body FROM customers; COMMIT"
        )
        cur.execute(query, (0,), prepare=True)
        assert_masked({str(r[0]) for r in cur.fetchall() if r[0] is not None}, EMAILS)


def in_band_checks(gateway: RunningGateway, target: str, result: str) -> int:
    """Catalog checks sent ahead of planned Executes on `target`'s sessions, by result."""
    context = gateway.gateway.context
    assert context is not None
    return context.metrics.in_band_checks[(target, result)]


def warm_rounds(db: Db) -> int:
    """Executions of a prepared statement after which its catalog check goes in band: a few
    with the watch; without it, once the snapshot has been steady for STEADY_PROBES probes
    (any commit moves it, and nothing else commits on this database meanwhile)."""
    return 4 if db.watched else STEADY_PROBES + 8


NOTES_OVER_EMAILS = (
    "BEGIN; ALTER TABLE notes RENAME TO notes_old;"
    " CREATE VIEW notes AS SELECT id, email AS body FROM customers; COMMIT"
)


def test_a_planned_read_is_checked_in_band_and_sent_again_once_its_plan_is_stale(
    gateway: RunningGateway, db: Db, agent: psycopg.Connection[TupleRow]
) -> None:
    """A prepared read on its Parse-time plan has its catalog check ahead of it on the
    session's own connection (no probe of its own): with the DDL watch every such read.
    DDL committed before the next read fails the check there, so the server skips the read;
    it is decided afresh and sent again, and the client sees one answer, masked."""
    db.ddl("CREATE TABLE notes (id int, body text)")
    db.ddl("INSERT INTO notes VALUES (1, 'plain'), (2, 'text')")
    query = "SELECT body FROM notes WHERE id > %s"
    start = in_band_checks(gateway, db.target, "passed")
    with agent.cursor() as cur:
        for _ in range(warm_rounds(db)):
            cur.execute(query, (0,), prepare=True)
            assert {r[0] for r in cur.fetchall()} == {"plain", "text"}
        passed = in_band_checks(gateway, db.target, "passed")
        failed = in_band_checks(gateway, db.target, "failed")
        assert passed >= start + 2
        db.ddl(NOTES_OVER_EMAILS)
        for _ in range(2):
            cur.execute(query, (0,), prepare=True)
            assert_masked({str(r[0]) for r in cur.fetchall() if r[0] is not None}, EMAILS)
        assert in_band_checks(gateway, db.target, "failed") == failed + 1
        if db.watched:
            assert in_band_checks(gateway, db.target, "passed") >= passed + 1


def test_a_planned_write_checked_in_band_runs_once_when_its_plan_went_stale(
    gateway: RunningGateway, db: Db
) -> None:
    """A prepared INSERT (no budget: admins) has its check in band as a read does. DDL
    committed before the next execution fails the check, so the server skips the INSERT;
    sent again, it runs exactly once, and the client sees one answer."""
    db.ddl("CREATE TABLE jot (id int)")
    insert = "INSERT INTO jot VALUES (%s)"
    start = in_band_checks(gateway, db.target, "passed")
    with connect(gateway.dsn(token_for(gateway, "admins"), target=db.target)) as conn:
        rounds = warm_rounds(db)
        for i in range(rounds):
            assert conn.execute(insert, (i,), prepare=True).rowcount == 1
        if db.watched:  # (without the watch each INSERT's commit moves the snapshot)
            assert in_band_checks(gateway, db.target, "passed") >= start + 2
        failed = in_band_checks(gateway, db.target, "failed")
        db.ddl("ALTER TABLE jot ADD COLUMN note text")
        assert conn.execute(insert, (-1,), prepare=True).rowcount == 1
        assert conn.execute(insert, (-2,), prepare=True).rowcount == 1
        if db.watched:
            assert in_band_checks(gateway, db.target, "failed") == failed + 1
    rows = db.conn.execute("SELECT id, count(*) FROM jot GROUP BY id ORDER BY id").fetchall()
    assert rows == [(-2, 1), (-1, 1), *((i, 1) for i in range(rounds))]


def test_the_in_band_check_is_never_a_statement_of_the_clients(
    gateway: RunningGateway, db: Db, agent: psycopg.Connection[TupleRow]
) -> None:
    """The check's prepared statement is visible in pg_prepared_statements: an agent that
    deallocates it and prepares its own under that name (a check that always passes) never
    has it bound in the check's place. After a DEALLOCATE the check's statement is closed
    and parsed again: the read after DDL fails the real check, is decided afresh, masked."""
    db.ddl("CREATE TABLE notes (id int, body text)")
    db.ddl("INSERT INTO notes VALUES (1, 'plain'), (2, 'text')")
    query = "SELECT body FROM notes WHERE id > %s"
    with agent.cursor() as cur:
        for _ in range(warm_rounds(db)):
            cur.execute(query, (0,), prepare=True)
            assert {r[0] for r in cur.fetchall()} == {"plain", "text"}
        names = [
            r[0]
            for r in simple(
                agent, "SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgwarden:check:%'"
            )
        ]
        assert len(names) == 1, names
        name = str(names[0])
        simple(agent, f'DEALLOCATE "{name}"')
        simple(agent, f'PREPARE "{name}"(text) AS SELECT 1')
        failed = in_band_checks(gateway, db.target, "failed")
        db.ddl(NOTES_OVER_EMAILS)
        for _ in range(2):
            cur.execute(query, (0,), prepare=True)
            assert_masked({str(r[0]) for r in cur.fetchall() if r[0] is not None}, EMAILS)
        # The check that ran after the DDL was pgwarden's, and failed.
        assert in_band_checks(gateway, db.target, "failed") == failed + 1
        held = dict(simple(agent, "SELECT name, statement FROM pg_prepared_statements"))
        assert "pg_catalog./" in str(held[name]), held[name]


def planned_queries(gateway: RunningGateway) -> int:
    context = gateway.gateway.context
    assert context is not None
    return sum(context.metrics.planned_queries.values())


def test_an_agents_query_plan_is_decided_afresh_after_ddl(
    gateway: RunningGateway, db: Db, agent: psycopg.Connection[TupleRow]
) -> None:
    """ai-agents' Queries of one shape and one cost estimate run on the plan the first left
    (nothing to mask: a table without classified columns) only while the catalog is the
    one it was made under: after DDL that leaves the estimate as it was, the next text is
    decided afresh; after DDL that puts a classified column under the name, its values
    reach the client masked, however the generation is read (watch or snapshot)."""
    db.ddl("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    db.ddl("INSERT INTO notes VALUES (1, 'plain'), (2, 'text')")
    # Never analysed, so every bound has the planner's default estimate.
    shape = "SELECT body FROM notes WHERE id > {}"
    before = planned_queries(gateway)
    for bound in (-1, -2, -3):
        assert {r[0] for r in simple(agent, shape.format(bound))} == {"plain", "text"}
    # Without the watch any commit anywhere moves the generation: only watched is sure.
    if db.watched:
        assert planned_queries(gateway) >= before + 2
    db.ddl("COMMENT ON TABLE notes IS 'the catalog moved, the estimate did not'")
    planned = planned_queries(gateway)
    assert {r[0] for r in simple(agent, shape.format(-4))} == {"plain", "text"}
    assert planned_queries(gateway) == planned
    db.ddl(
        "BEGIN; ALTER TABLE notes RENAME TO notes_old;"
        " CREATE VIEW notes AS SELECT id, email AS body FROM customers; COMMIT"
    )
    assert_masked({str(r[0]) for r in simple(agent, shape.format(-5)) if r[0] is not None}, EMAILS)


def test_a_planned_execute_checked_while_ddl_moved_the_catalog_is_recorded_truthfully(
    gateway: RunningGateway, db: Db
) -> None:
    """With the DDL watch, an Execute on its Parse-time plan is recorded while its catalog
    check is in flight (the waits overlap); a record written for a plan the check then finds
    stale gets an outcome saying the statement was not sent under it, and the statement is
    decided and recorded afresh. Without the watch (a snapshot generation moves with every
    write) the waits overlap only while the snapshot has been steady, else the check comes
    first: at most that one Execute is recorded twice. The client sees what a direct
    connection would either way."""
    db.ddl("CREATE TABLE plan_ddl (id int); INSERT INTO plan_ddl VALUES (1), (2), (3)")
    subject = f"agent:plan-ddl-{uuid.uuid4().hex[:8]}"
    query = "SELECT count(*) FROM plan_ddl WHERE id > %s"
    before = records_after(gateway.settings)
    since = before[-1].pos if before else 0
    with connect(gateway.dsn(gateway.token(subject), target=db.target)) as conn:
        planned = planned_executes(gateway)
        for _ in range(3):
            assert conn.execute(query, (0,), prepare=True).fetchall() == [(3,)]
        assert planned_executes(gateway) >= planned + 2
        db.ddl("ALTER TABLE plan_ddl ADD COLUMN added_later int")
        for _ in range(2):
            assert conn.execute(query, (0,), prepare=True).fetchall() == [(3,)]

    def trail() -> list[dict[str, Any]] | None:
        records = records_after(gateway.settings, since)
        requests = [r for r in records if r.kind == "request" and r.subject == subject]
        outcomes = {r.request_id: r.record() for r in records if r.kind == "outcome"}
        if len(requests) < 5 or any(r.id not in outcomes for r in requests):
            return None
        return [outcomes[r.id] for r in requests]

    outcomes = wait_for(trail)
    sent = [o for o in outcomes if o["forwarded"]]
    stale = [o for o in outcomes if not o["forwarded"]]
    assert [o["command_tag"] for o in sent] == ["SELECT 1"] * 5
    # The first Execute after the DDL: recorded under the stale plan, never sent (without
    # the watch only if the snapshot was steady before the DDL moved it).
    assert len(stale) == 1 if db.watched else len(stale) <= 1, outcomes
    for record in stale:
        assert record["command_tag"] is None
        assert "decided again" in (record["error_message"] or "")


def test_an_agents_read_decided_again_after_ddl_keeps_the_estimate_of_its_parse(
    gateway: RunningGateway, db: Db
) -> None:
    """asyncpg leaves a Parse's parameter types to the server. An Execute decided again after
    DDL (here a table the statement does not read) runs on the estimate its Parse made: inside
    the client's Bind/Execute pipeline nothing can be explained, and an agent's read without
    an estimate would wait for a human."""

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        conn = await asyncpg.connect(gateway.url(token_for(gateway, "ai-agents"), target=db.target))
        try:
            stmt = await conn.prepare("SELECT id FROM customers WHERE id > $1 ORDER BY id")
            before = [r[0] for r in await stmt.fetch(0)]
            db.ddl(f"CREATE TABLE unrelated_{uuid.uuid4().hex[:8]} (id int)")
            after = [r[0] for r in await stmt.fetch(0)]
            typed = [await conn.fetchval("SELECT id::text || $1 FROM customers LIMIT 1", "!")]
            db.ddl(f"CREATE TABLE unrelated_{uuid.uuid4().hex[:8]} (id int)")
            typed.append(await conn.fetchval("SELECT id::text || $1 FROM customers LIMIT 1", "!"))
            return before, after, typed
        finally:
            await conn.close()

    before, after, typed = asyncio.run(scenario())
    assert before == after and len(before) == 2, (before, after)
    assert typed == [f"{before[0]}!"] * 2, typed
