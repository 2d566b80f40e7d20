# ruff: noqa: S608  (tests build SQL around table names of their own)
"""Just-in-time approval through the real gateway: a held statement runs once approved and
the client gets its rows; a deny or a time-out is an error carrying the request id; an
approval after the time-out is a one-time grant; a cancel or a disconnect withdraws the
request; a held session leaves the others alone."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from cli.localpg import LocalCluster
from gateway.control import VoteRefused

from . import (
    IN_FAILED_TRANSACTION,
    REFUSED,
    direct,
    fresh_table,
    original_rows,
    refusal_of,
    simple,
    table_exists,
    table_rows,
)
from .approvals import (
    REQUEST_ID,
    Held,
    agent,
    approval_events,
    approval_records,
    gateway_for_approvals,
    own_table,
    statement_record,
    stored,
    vote,
    wait_status,
)

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def held_gw(pg_cluster: LocalCluster, app_database: str, opa_binary: Path) -> Iterator[Any]:
    """Statements wait up to 60 s: each test decides them well before."""
    yield from gateway_for_approvals(pg_cluster, opa_binary, approval={"wait_seconds": 60})


@pytest.fixture(scope="module")
def brief_gw(pg_cluster: LocalCluster, app_database: str, opa_binary: Path) -> Iterator[Any]:
    """Statements wait 1 s: for time-outs."""
    yield from gateway_for_approvals(pg_cluster, opa_binary, approval={"wait_seconds": 1})


@pytest.fixture
def table(held_gw: Any) -> Iterator[str]:
    yield from own_table(held_gw)


def engineer(gw: Any, name: str = "user:ann") -> str:
    return str(gw.token(name, groups=("engineers",)))


def test_approved_while_held_the_client_gets_its_rows(held_gw: Any, table: str) -> None:
    held = Held(
        held_gw.dsn(agent(held_gw)),
        lambda c: simple(c, f'DELETE FROM "{table}" WHERE id = 2 RETURNING id, v'),
    )
    try:
        rid = held.request_id()
        notice = held.notices[0]
        assert "engineers or admins" in (notice.detail)
        assert f"pgwarden approvals approve {rid}" in (notice.hint)
        # Held: nothing ran yet.
        assert held.running and table_rows(held_gw, table) == original_rows()
        request = stored(held_gw, rid)
        assert request.status == "pending" and request.subject == "agent:bot"
        assert f'DELETE FROM "{table}" WHERE id = 2' in request.text
        assert request.reasons == ("ai-agents may not write without approval",)
        assert request.facts[0]["command"] == "DELETE"
        judged = vote(held_gw, rid, engineer(held_gw))
        assert judged.request.status == "approved"
        assert held.done() and held.error is None, held.error
        assert held.result == [(2, "v2")]
        assert table_rows(held_gw, table) == [(1, "v1"), (3, "v3")]
        # The session goes on.
        assert simple(held.conn, "SELECT 1") == [(1,)]
        # Each step is a record on the audit chain.
        events = approval_events(held_gw, request.session_id, 3)
        assert events == ["requested", "vote", "approved"], events
    finally:
        held.close()


def test_denied_the_client_reads_the_note_and_nothing_ran(held_gw: Any, table: str) -> None:
    held = Held(held_gw.dsn(agent(held_gw)), lambda c: simple(c, f'DELETE FROM "{table}"'))
    try:
        rid = held.request_id()
        vote(held_gw, rid, engineer(held_gw), "deny", "not on a Friday")
        assert held.done()
        r = refusal_of(held.error or AssertionError("not refused"))
        assert r.sqlstate == REFUSED
        assert "denied by user:ann: not on a Friday" in r.message
        assert rid in (r.detail or "")
        assert table_rows(held_gw, table) == original_rows()
        assert simple(held.conn, "SELECT 1") == [(1,)]
    finally:
        held.close()


def test_extended_protocol_holds_at_execute_with_parameters(held_gw: Any, table: str) -> None:
    def run(c: psycopg.Connection[Any]) -> Any:
        return c.execute(
            f'UPDATE "{table}" SET v = %s WHERE id = %s RETURNING v', ("new", 3)
        ).fetchall()

    held = Held(held_gw.dsn(agent(held_gw)), run)
    try:
        rid = held.request_id()
        assert stored(held_gw, rid).params == ("new", "3")
        assert stored(held_gw, rid).protocol == "extended"
        vote(held_gw, rid, engineer(held_gw))
        assert held.done() and held.error is None, held.error
        assert held.result == [("new",)]
    finally:
        held.close()


async def test_asyncpg_approved_and_denied(held_gw: Any, table: str) -> None:
    conn = await asyncpg.connect(held_gw.url(agent(held_gw)))
    notices: asyncio.Queue[str] = asyncio.Queue()
    conn.add_log_listener(lambda _c, msg: notices.put_nowait(str(msg)))
    try:

        async def decide(verdict: str) -> None:
            found = REQUEST_ID.search(await notices.get())
            assert found is not None
            approver = engineer(held_gw)
            await asyncio.to_thread(vote, held_gw, found.group(1), approver, verdict, "n")

        statement = f'UPDATE "{table}" SET v = $1 WHERE id = $2 RETURNING id'
        _, rows = await asyncio.gather(decide("approve"), conn.fetch(statement, "a", 1))
        assert [tuple(r) for r in rows] == [(1,)]
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="denied by user:ann"):
            await asyncio.gather(decide("deny"), conn.fetch(statement, "b", 2))
        assert await conn.fetchval("SELECT 1") == 1
        assert table_rows(held_gw, table) == [(1, "a"), (2, "v2"), (3, "v3")]
    finally:
        await conn.close()


def test_denied_inside_a_transaction_fails_it_as_postgres_would(held_gw: Any, table: str) -> None:
    def run(c: psycopg.Connection[Any]) -> Any:
        simple(c, "BEGIN")
        return simple(c, f'DELETE FROM "{table}" WHERE id = 1')

    held = Held(held_gw.dsn(agent(held_gw)), run)
    try:
        rid = held.request_id()
        vote(held_gw, rid, engineer(held_gw), "deny", "no")
        assert held.done()
        assert refusal_of(held.error or AssertionError()).sqlstate == REFUSED
        with pytest.raises(psycopg.Error) as info:
            simple(held.conn, "SELECT 1")
        assert info.value.diag.sqlstate == IN_FAILED_TRANSACTION
        simple(held.conn, "ROLLBACK")
        assert simple(held.conn, "SELECT 1") == [(1,)]
        assert table_rows(held_gw, table) == original_rows()
    finally:
        held.close()


def test_approved_inside_a_transaction_runs_in_it(held_gw: Any, table: str) -> None:
    def run(c: psycopg.Connection[Any]) -> Any:
        simple(c, "BEGIN")
        return simple(c, f'DELETE FROM "{table}" WHERE id = 1 RETURNING id')

    held = Held(held_gw.dsn(agent(held_gw)), run)
    try:
        vote(held_gw, held.request_id(), engineer(held_gw))
        assert held.done() and held.result == [(1,)], held.error
        simple(held.conn, "ROLLBACK")
        assert table_rows(held_gw, table) == original_rows()
    finally:
        held.close()


def test_cancel_while_held_withdraws_the_request(held_gw: Any, table: str) -> None:
    held = Held(held_gw.dsn(agent(held_gw)), lambda c: simple(c, f'DELETE FROM "{table}"'))
    try:
        rid = held.request_id()
        held.conn.cancel_safe(timeout=5)
        assert held.done(15)
        error = held.error
        assert isinstance(error, psycopg.errors.QueryCanceled), error
        assert rid in (error.diag.message_detail or "")
        assert stored(held_gw, rid).status == "withdrawn"
        # An approval now comes too late: nothing runs, no grant is made.
        with pytest.raises(Exception, match="withdrawn"):
            vote(held_gw, rid, engineer(held_gw))
        assert simple(held.conn, "SELECT 1") == [(1,)]
        assert table_rows(held_gw, table) == original_rows()
    finally:
        held.close()


def test_disconnect_while_held_withdraws_the_request(held_gw: Any, table: str) -> None:
    held = Held(held_gw.dsn(agent(held_gw)), lambda c: simple(c, f'DELETE FROM "{table}"'))
    rid = held.request_id()
    # Closed under the thread's feet: the gateway sees the connection go.
    held.conn.pgconn.finish()
    wait_status(held_gw, rid, "withdrawn")
    assert held.done(15)
    assert table_rows(held_gw, table) == original_rows()
    # The statement's own record gets its outcome: not run, withdrawn.
    shown = statement_record(held_gw, rid, until="57014")
    assert "57014" in shown and "withdrawn: the client went away" in shown


def test_justification_travels_with_the_request(held_gw: Any, table: str) -> None:
    def run(c: psycopg.Connection[Any]) -> Any:
        simple(c, "SET pgwarden.reason = 'ticket OPS-12: remove test rows'")
        return simple(c, f'DELETE FROM "{table}" WHERE id = 3')

    held = Held(held_gw.dsn(agent(held_gw)), run)
    try:
        rid = held.request_id()
        assert stored(held_gw, rid).justification == "ticket OPS-12: remove test rows"
        assert "ticket OPS-12" in held.notices[-1].detail
        vote(held_gw, rid, engineer(held_gw), "deny", "no")
        assert held.done()
    finally:
        held.close()


def test_a_held_session_does_not_slow_a_busy_one(held_gw: Any, table: str) -> None:
    """Statements a busy session completes while another is held, against as many without a
    hold: the held one costs the busy one nothing it can count (asserted on counts)."""

    def busy_for(stop: threading.Event, done: list[int]) -> None:
        with psycopg.connect(held_gw.dsn(agent(held_gw)), autocommit=True) as c:
            while not stop.is_set():
                c.execute(f'SELECT count(*) FROM "{table}"').fetchone()
                done[0] += 1

    held = Held(held_gw.dsn(agent(held_gw)), lambda c: simple(c, f'DELETE FROM "{table}"'))
    try:
        rid = held.request_id()
        stop, done = threading.Event(), [0]
        busy = threading.Thread(target=busy_for, args=(stop, done))
        busy.start()
        # The busy session runs 200 statements while the other stays held throughout.
        while done[0] < 200 and busy.is_alive():
            assert held.running and stored(held_gw, rid).status == "pending"
            threading.Event().wait(0.05)
        stop.set()
        busy.join(10)
        print(f"busy session completed {done[0]} statements while one was held")
        assert done[0] >= 200
        assert held.running
        vote(held_gw, rid, engineer(held_gw), "deny", "done")
        assert held.done()
    finally:
        held.close()


# -- time-outs and grants ----------------------------------------------------------------


def test_timeout_then_approval_is_a_grant_used_once(brief_gw: Any) -> None:
    name = fresh_table(brief_gw)
    dsn = brief_gw.dsn(agent(brief_gw))
    statement = f'DELETE FROM "{name}" WHERE id = 1 RETURNING id'
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            simple(conn, statement)
        r = refusal_of(info.value)
        assert r.sqlstate == REFUSED and "approval required" in r.message
        hint = info.value.diag.message_hint or ""
        assert "run the same statement again" in hint
        rid = next(
            line.split(": ", 1)[1]
            for line in (r.detail or "").splitlines()
            if line.startswith("approval request: ")
        )
        assert stored(brief_gw, rid).status == "timed_out"
        judged = vote(brief_gw, rid, engineer(brief_gw))
        assert judged.request.status == "granted" and judged.grant is not None
        # Another statement (another literal) is not covered by it.
        with pytest.raises(psycopg.Error, match="approval required"):
            simple(conn, f'DELETE FROM "{name}" WHERE id = 2 RETURNING id')
        # The same statement, spelled differently, runs once under the grant.
        assert simple(conn, statement.replace("DELETE FROM", "delete  from")) == [(1,)]
        with pytest.raises(psycopg.Error, match="approval required"):
            simple(conn, statement)
    events = approval_events(brief_gw, stored(brief_gw, rid).session_id, 9)
    asked = ["requested", "timed_out"]
    assert events == [*asked, "vote", "granted", *asked, "grant_used", *asked], events
    assert table_rows(brief_gw, name) == [(2, "v2"), (3, "v3")]


def test_a_grant_raced_by_two_sessions_is_used_once(brief_gw: Any) -> None:
    name = fresh_table(brief_gw)
    dsn = brief_gw.dsn(agent(brief_gw))
    statement = f"UPDATE \"{name}\" SET v = v || '!' WHERE id = 1"
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(psycopg.Error) as info:
        simple(conn, statement)
    rid = next(
        line.split(": ", 1)[1]
        for line in (info.value.diag.message_detail or "").splitlines()
        if line.startswith("approval request: ")
    )
    vote(brief_gw, rid, engineer(brief_gw))
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def race() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            barrier.wait()
            try:
                simple(c, statement)
                outcomes.append("ran")
            except psycopg.Error as exc:
                outcomes.append(exc.diag.sqlstate or "?")

    threads = [threading.Thread(target=race) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["42501", "42501", "42501", "ran"]
    assert table_rows(brief_gw, name)[0] == (1, "v1!")


# -- who may approve ---------------------------------------------------------------------


def test_the_requester_never_approves_its_own_request(held_gw: Any, table: str) -> None:
    held = Held(held_gw.dsn(agent(held_gw)), lambda c: simple(c, f'DELETE FROM "{table}"'))
    try:
        rid = held.request_id()
        # The requester's subject with an approver's groups (and with admins): still refused.
        for groups in (("engineers",), ("admins", "engineers")):
            own = held_gw.token("agent:bot", groups=groups)
            with pytest.raises(VoteRefused, match="its own request"):
                vote(held_gw, rid, own)
        assert held.running and stored(held_gw, rid).votes == ()
        vote(held_gw, rid, engineer(held_gw), "deny", "cleanup")
        assert held.done()
    finally:
        held.close()
    assert table_rows(held_gw, table) == original_rows()


def test_an_approver_outside_the_approvers_groups_is_refused(held_gw: Any, table: str) -> None:
    held = Held(held_gw.dsn(agent(held_gw)), lambda c: simple(c, f'DELETE FROM "{table}"'))
    try:
        rid = held.request_id()
        for groups in (("ai-agents",), ("pii-readers",), ()):
            outsider = held_gw.token("user:eve", groups=groups)
            with pytest.raises(VoteRefused, match="only members of engineers or admins"):
                vote(held_gw, rid, outsider)
        assert held.running and stored(held_gw, rid).status == "pending"
        vote(held_gw, rid, held_gw.token("user:root", groups=("admins",)), "deny", "no")
        assert held.done()
    finally:
        held.close()


def test_four_eyes_a_schema_change_by_an_agent_needs_two_people(held_gw: Any) -> None:
    name = f"four_eyes_{uuid.uuid4().hex[:8]}"
    held = Held(held_gw.dsn(agent(held_gw)), lambda c: simple(c, f'CREATE TABLE "{name}" (id int)'))
    try:
        rid = held.request_id()
        assert stored(held_gw, rid).approvers_required == 2
        assert "2 distinct approvers" in held.notices[0].detail
        first = vote(held_gw, rid, engineer(held_gw, "user:ann"))
        assert not first.decided and first.request.status == "pending"
        # One person twice is still one.
        with pytest.raises(VoteRefused, match="already voted"):
            vote(held_gw, rid, held_gw.token("user:ann", groups=("admins",)))
        assert held.running and not table_exists(held_gw, name)
        second = vote(held_gw, rid, held_gw.token("user:bob", groups=("admins",)))
        assert second.decided and second.request.status == "approved"
        assert held.done() and held.error is None, held.error
        assert table_exists(held_gw, name)
        # The statement's own audit record names its request and the approvers it needed.
        shown = statement_record(held_gw, rid)
        assert f'"approval_id":"{rid}"' in shown.replace(" ", "")
        assert '"approvers_required":2' in shown.replace(" ", "")
    finally:
        held.close()
        direct(held_gw, f'DROP TABLE IF EXISTS "{name}"')


def _request_of(error: BaseException) -> str:
    assert isinstance(error, psycopg.Error), error
    found = REQUEST_ID.search(error.diag.message_detail or "")
    assert found is not None, error.diag.message_detail
    return found.group(1)


def test_a_grant_names_the_bind_parameters(brief_gw: Any) -> None:
    name = fresh_table(brief_gw)
    statement = f'DELETE FROM "{name}" WHERE id = %s RETURNING id'
    with psycopg.connect(brief_gw.dsn(agent(brief_gw)), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(statement, (1,))
        vote(brief_gw, _request_of(info.value), engineer(brief_gw))
        # Other parameters are another statement: asked about again.
        with pytest.raises(psycopg.Error, match="approval required"):
            conn.execute(statement, (2,))
        assert conn.execute(statement, (1,)).fetchall() == [(1,)]
    assert table_rows(brief_gw, name) == [(2, "v2"), (3, "v3")]


def test_a_time_window_grant_covers_the_shape_until_it_ends(brief_gw: Any) -> None:
    name = fresh_table(brief_gw, rows=5)
    with psycopg.connect(brief_gw.dsn(agent(brief_gw)), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            simple(conn, f'DELETE FROM "{name}" WHERE id = 1')
        rid = _request_of(info.value)
        judged = vote(brief_gw, rid, engineer(brief_gw), window_seconds=3)
        grant = judged.grant
        assert grant is not None and grant.kind == "window"
        assert grant.expires == pytest.approx(judged.vote.time + 3)
        # Any literal, several times, while the window lasts.
        for i in (1, 2, 3):
            simple(conn, f'DELETE FROM "{name}" WHERE id = {i}')
        # Another shape is not covered.
        with pytest.raises(psycopg.Error, match="approval required"):
            simple(conn, f"UPDATE \"{name}\" SET v = 'x' WHERE id = 4")
        while time.time() < grant.expires + 0.2:
            time.sleep(0.1)
        with pytest.raises(psycopg.Error, match="approval required"):
            simple(conn, f'DELETE FROM "{name}" WHERE id = 4')
    assert table_rows(brief_gw, name) == [(4, "v4"), (5, "v5")]
    # The window's end is an audit record too (the sweep runs every few seconds; hastened).
    brief_gw.run(brief_gw.gateway.approvals.sweep_grants())
    ends: list[dict[str, Any]] = []
    deadline = time.monotonic() + 15
    while not ends and time.monotonic() < deadline:
        records = approval_records(brief_gw, "--limit", "1000", want=0)
        ends = [r for r in records if r["event"] == "grant_expired" and r["approval_id"] == rid]
    assert len(ends) == 1 and ends[0]["grant_id"] == grant.id


def test_a_message_of_several_statements_is_held_and_run_as_a_whole(
    held_gw: Any, table: str
) -> None:
    message = f'SELECT 1; DELETE FROM "{table}" WHERE id = 1; UPDATE "{table}" SET v = \'w\''
    held = Held(held_gw.dsn(agent(held_gw)), lambda c: simple(c, message))
    try:
        rid = held.request_id()
        request = stored(held_gw, rid)
        assert len(request.facts) == 3 and "UPDATE" in request.text
        # Nothing of it ran, not even the statement the policy allows.
        assert table_rows(held_gw, table) == original_rows()
        vote(held_gw, rid, engineer(held_gw))
        assert held.done() and held.error is None, held.error
        assert table_rows(held_gw, table) == [(2, "w"), (3, "w")]
    finally:
        held.close()


@pytest.fixture
def storeless_gw(pg_cluster: LocalCluster, app_database: str, opa_binary: Path) -> Iterator[Any]:
    """A gateway whose control store the test closes under it (see close_control_store)."""
    yield from gateway_for_approvals(pg_cluster, opa_binary, approval={"wait_seconds": 30})


def close_control_store(gw: Any) -> None:
    control = gw.gateway.control
    assert control is not None
    gw.run(control.close())


def test_a_control_store_that_cannot_take_the_request_fails_closed(storeless_gw: Any) -> None:
    name = fresh_table(storeless_gw)
    with psycopg.connect(storeless_gw.dsn(agent(storeless_gw)), autocommit=True) as conn:
        # Closed once the session is in: a login needs the store itself (the token registry).
        close_control_store(storeless_gw)
        with pytest.raises(psycopg.Error) as info:
            simple(conn, f'DELETE FROM "{name}"')
        assert info.value.diag.sqlstate == "58000"
        assert "approval request could not be made, statement not run" in str(info.value)
        assert simple(conn, "SELECT 1") == [(1,)]
    assert table_rows(storeless_gw, name) == original_rows()


async def test_asyncpg_timeout_withdraws_the_held_execute(held_gw: Any, table: str) -> None:
    """asyncpg's own timeout sends a CancelRequest: the request held at Execute is withdrawn
    and the connection goes on, in and out of a transaction."""
    conn = await asyncpg.connect(held_gw.url(agent(held_gw)))
    notices: asyncio.Queue[str] = asyncio.Queue()
    conn.add_log_listener(lambda _c, msg: notices.put_nowait(str(msg)))
    try:
        statement = f'DELETE FROM "{table}" WHERE id = $1'
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute(statement, 1, timeout=1.5)
        found = REQUEST_ID.search(await notices.get())
        assert found is not None
        await asyncio.to_thread(wait_status, held_gw, found.group(1), "withdrawn")
        assert await conn.fetchval("SELECT 1") == 1
        tr = conn.transaction()
        await tr.start()
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute(statement, 2, timeout=1.5)
        # As after a cancelled statement on PostgreSQL: the transaction is failed.
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.fetchval("SELECT 1")
        await tr.rollback()
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    assert table_rows(held_gw, table) == original_rows()
