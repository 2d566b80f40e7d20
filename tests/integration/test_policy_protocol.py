# ruff: noqa: S608  (tests build SQL around table names of their own)
"""How refusals meet the protocol: multi-statement messages, extended-protocol pipelines,
explicit transactions, startup options and the FunctionCall message.

Where the expected behaviour is "what PostgreSQL would do", the same sequence is run
straight against PostgreSQL with a statement the server itself rejects, and the two
outcomes are compared.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.rows import TupleRow

from cli.localpg import SUPERUSER
from gateway.protocol import Bind, DataRow, Execute, FunctionCall, Query, Sync
from tests.harness import RunningGateway

from . import (
    IN_FAILED_TRANSACTION,
    REFUSED,
    RawClient,
    assert_policy_refusal,
    connect,
    direct,
    errors_in,
    fresh_table,
    original_rows,
    refusal_of,
    simple,
    table_rows,
    token_for,
)

pytestmark = pytest.mark.server

DENIED_READ = "SELECT pg_read_file(%s)"
# What PostgreSQL itself rejects at Parse time, to compare pgwarden's refusal with.
SERVER_REJECTS = "SELECT * FROM pgwarden_no_such_table WHERE %s IS NOT NULL"


@pytest.fixture
def table(gateway: RunningGateway) -> Iterator[str]:
    name = fresh_table(gateway)
    yield name
    direct(gateway, f'DROP TABLE IF EXISTS "{name}"')


def engineers(gateway: RunningGateway, **kw: Any) -> psycopg.Connection[TupleRow]:
    return connect(gateway.dsn(token_for(gateway, "engineers")), **kw)


# -- multi-statement simple Query messages -------------------------------------------------


def test_message_with_a_denied_statement_runs_nothing(gateway: RunningGateway, table: str) -> None:
    with engineers(gateway) as conn:
        with pytest.raises(psycopg.Error) as info:
            simple(
                conn,
                f"INSERT INTO \"{table}\" VALUES (10, 'a'); SELECT pg_read_file('/etc/hostname');"
                f" INSERT INTO \"{table}\" VALUES (11, 'b')",
            )
        assert_policy_refusal(refusal_of(info.value), reason="pg_read_file")
        assert simple(conn, "SELECT 1") == [(1,)]
    assert table_rows(gateway, table) == original_rows()


def test_deny_beats_approval_in_one_message(gateway: RunningGateway, table: str) -> None:
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        with pytest.raises(psycopg.Error) as info:
            simple(conn, f"DELETE FROM \"{table}\"; SELECT pg_read_file('/etc/hostname')")
        assert_policy_refusal(refusal_of(info.value), reason="pg_read_file")
    assert table_rows(gateway, table) == original_rows()


def test_message_of_allowed_statements_runs_them_all(gateway: RunningGateway, table: str) -> None:
    with engineers(gateway) as conn:
        rows = simple(
            conn,
            f"INSERT INTO \"{table}\" VALUES (10, 'a');"
            f" UPDATE \"{table}\" SET v = 'u' WHERE id = 1;"
            f' SELECT count(*) FROM "{table}"',
        )
        assert rows == [(4,)]
    assert table_rows(gateway, table) == [(1, "u"), (2, "v2"), (3, "v3"), (10, "a")]


# -- extended protocol: pipelines --------------------------------------------------------


def pipeline_outcome(
    dsn: str, table: str, bad: str, *, sync_after_first: bool
) -> tuple[str | None, list[str]]:
    """INSERT 10, then `bad`, then INSERT 11 in one pipeline; the first error's SQLSTATE and
    what each statement's result turned out to be. Afterwards the session must work."""
    sqlstate: str | None = None
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursors = []
        try:
            with conn.pipeline() as p:
                cursors.append(conn.execute(f'INSERT INTO "{table}" VALUES (%s, %s)', (10, "a")))
                if sync_after_first:
                    p.sync()
                cursors.append(conn.execute(bad, ("/etc/hostname",)))
                cursors.append(conn.execute(f'INSERT INTO "{table}" VALUES (%s, %s)', (11, "b")))
        except psycopg.Error as exc:
            sqlstate = exc.diag.sqlstate
        # When the error is raised depends on when results arrive: a later execute() may
        # never have been called. Those that were report what ran.
        statuses = [str(cur.statusmessage) for cur in cursors]
        statuses += ["None"] * (3 - len(statuses))
        # Usable after Sync: a new statement, parameters and all.
        assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
    return sqlstate, statuses


@pytest.mark.parametrize("sync_after_first", [False, True], ids=["one-sync", "sync-between"])
def test_denied_parse_in_a_pipeline_behaves_as_a_server_error(
    gateway: RunningGateway, sync_after_first: bool
) -> None:
    # First straight to PostgreSQL, with a statement the server itself rejects at Parse.
    t_direct = fresh_table(gateway)
    t_gw = fresh_table(gateway)
    try:
        state_direct, statuses_direct = pipeline_outcome(
            gateway.direct_dsn(), t_direct, SERVER_REJECTS, sync_after_first=sync_after_first
        )
        rows_direct = table_rows(gateway, t_direct)
        state_gw, statuses_gw = pipeline_outcome(
            gateway.dsn(token_for(gateway, "engineers")),
            t_gw,
            DENIED_READ,
            sync_after_first=sync_after_first,
        )
        rows_gw = table_rows(gateway, t_gw)
    finally:
        direct(gateway, f'DROP TABLE IF EXISTS "{t_direct}", "{t_gw}"')
    assert state_direct == "42P01"
    assert state_gw == REFUSED
    assert statuses_gw == statuses_direct
    assert rows_gw == rows_direct
    # Nothing after the refused Parse ran: row 11 never arrived; row 10 only when synced first.
    assert rows_gw == ([*original_rows(), (10, "a")] if sync_after_first else original_rows())


def test_denied_parse_error_fields(gateway: RunningGateway) -> None:
    with engineers(gateway) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(DENIED_READ, ("/etc/hostname",))
        assert_policy_refusal(refusal_of(info.value), reason="pg_read_file")
        assert conn.execute("SELECT %s::text", ("ok",)).fetchone() == ("ok",)


async def test_asyncpg_prepared_statements(gateway: RunningGateway, table: str) -> None:
    conn = await asyncpg.connect(gateway.url(token_for(gateway, "ai-agents")), timeout=10)
    try:
        kept = await conn.prepare(f'SELECT v FROM "{table}" WHERE id = $1')
        assert await kept.fetchval(2) == "v2"
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.prepare("SELECT pg_read_file($1)")
        assert info.value.sqlstate == REFUSED
        assert "pgwarden" in str(info.value) and "pg_read_file" in str(info.value)
        assert "decision id" in (info.value.detail or "")
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute(f'DELETE FROM "{table}" WHERE id = $1', 1)
        assert info.value.sqlstate == REFUSED
        assert "approval required" in str(info.value)
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch(f'WITH d AS (DELETE FROM "{table}" RETURNING id) SELECT * FROM d')
        assert info.value.sqlstate == REFUSED
        # The connection and the statement prepared before the refusals still work.
        assert await kept.fetchval(3) == "v3"
        assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
    finally:
        await conn.close()
    assert table_rows(gateway, table) == original_rows()


# -- explicit transactions -----------------------------------------------------------------


def test_transaction_after_a_refusal_is_aborted_until_rollback(
    gateway: RunningGateway, table: str
) -> None:
    with engineers(gateway, autocommit=False) as conn:
        conn.execute(f"INSERT INTO \"{table}\" VALUES (10, 'a')")
        with pytest.raises(psycopg.Error) as info:
            conn.execute(f'GRANT SELECT ON "{table}" TO PUBLIC')
        assert_policy_refusal(refusal_of(info.value), reason="only admins may")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        for _ in range(2):
            with pytest.raises(psycopg.errors.InFailedSqlTransaction) as failed:
                conn.execute("SELECT 1")
            assert failed.value.diag.sqlstate == IN_FAILED_TRANSACTION
            assert failed.value.diag.message_primary == (
                "current transaction is aborted, commands ignored until end of transaction block"
            )
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)
        conn.execute(f"INSERT INTO \"{table}\" VALUES (20, 'after')")
        conn.commit()
    # Only what ran after the ROLLBACK committed.
    assert table_rows(gateway, table) == [*original_rows(), (20, "after")]


@pytest.mark.parametrize("refused", ["DELETE FROM {t}", "SELECT pg_read_file('/etc/hostname')"])
def test_commit_after_a_refusal_rolls_back(
    gateway: RunningGateway, table: str, refused: str
) -> None:
    """As in PostgreSQL, COMMIT of a failed transaction is a ROLLBACK: nothing is kept."""
    with engineers(gateway) as conn:
        simple(conn, "BEGIN")
        simple(conn, f"UPDATE \"{table}\" SET v = 'changed' WHERE id = 1")
        with pytest.raises(psycopg.Error) as info:
            simple(conn, refused.format(t=f'"{table}"'))
        assert refusal_of(info.value).sqlstate == REFUSED
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            simple(conn, f"UPDATE \"{table}\" SET v = 'changed' WHERE id = 2")
        with psycopg.ClientCursor(conn) as cur:
            cur.execute(b"COMMIT")
            assert cur.statusmessage == "ROLLBACK"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert table_rows(gateway, table) == original_rows()


def test_savepoint_recovers_from_a_refusal(gateway: RunningGateway, table: str) -> None:
    with engineers(gateway) as conn:
        simple(conn, "BEGIN")
        simple(conn, f"INSERT INTO \"{table}\" VALUES (10, 'kept')")
        simple(conn, "SAVEPOINT s")
        with pytest.raises(psycopg.Error) as info:
            simple(conn, "SET ROLE postgres")
        assert refusal_of(info.value).sqlstate == REFUSED
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            simple(conn, "SELECT 1")
        simple(conn, "ROLLBACK TO SAVEPOINT s")
        simple(conn, f"INSERT INTO \"{table}\" VALUES (11, 'also')")
        simple(conn, "COMMIT")
    assert table_rows(gateway, table) == [*original_rows(), (10, "kept"), (11, "also")]


def test_extended_protocol_refusal_inside_a_transaction(
    gateway: RunningGateway, table: str
) -> None:
    with connect(gateway.dsn(token_for(gateway, "ai-agents")), autocommit=False) as conn:
        assert conn.execute(f'SELECT v FROM "{table}" WHERE id = %s', (1,)).fetchone() == ("v1",)
        with pytest.raises(psycopg.Error) as info:
            conn.execute(f'DELETE FROM "{table}" WHERE id = %s', (1,))
        assert_policy_refusal(refusal_of(info.value), approval=True, reason="may not write")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT %s::int", (1,))
        conn.rollback()
        assert conn.execute("SELECT %s::int", (1,)).fetchone() == (1,)
    assert table_rows(gateway, table) == original_rows()


def test_psql_transaction_matches_postgresql(gateway: RunningGateway, table: str) -> None:
    """The same psql script straight to PostgreSQL (with a server-side error) and through
    pgwarden (with a refusal) gives the same statement-by-statement output."""
    script = (
        "BEGIN;\n"
        f"INSERT INTO \"{table}\" VALUES (10, 'a');\n"
        "{bad};\n"
        "SELECT 1;\n"
        f"INSERT INTO \"{table}\" VALUES (11, 'b');\n"
        "ROLLBACK;\n"
        f'SELECT count(*) FROM "{table}";\n'
    )

    def psql(dsn: str, bad: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["psql", "-X", "-At", "-v", "VERBOSITY=sqlstate", "-d", dsn],
            input=script.replace("{bad}", bad),
            capture_output=True,
            text=True,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
            timeout=30,
            check=False,
        )

    plain = psql(gateway.direct_dsn(), "SELECT * FROM pgwarden_no_such_table")
    through = psql(
        gateway.dsn(token_for(gateway, "engineers")), "ALTER SYSTEM SET work_mem = '9MB'"
    )
    assert plain.stdout == through.stdout == "BEGIN\nINSERT 0 1\nROLLBACK\n3\n"
    assert plain.stderr.splitlines()[0].endswith("42P01")
    assert through.stderr.splitlines()[0].endswith(REFUSED)
    assert plain.stderr.splitlines()[1:] == through.stderr.splitlines()[1:]
    assert through.stderr.splitlines()[1:] == [f"ERROR:  {IN_FAILED_TRANSACTION}"] * 2
    assert table_rows(gateway, table) == original_rows()


# -- startup options ---------------------------------------------------------------------


def test_startup_search_path_option_works(gateway: RunningGateway) -> None:
    dsn = gateway.dsn(token_for(gateway, "ai-agents"), options="-c search_path=public")
    with connect(dsn) as conn:
        assert simple(conn, "SHOW search_path") == [("public",)]
        assert simple(conn, "SELECT count(*) FROM orders") == [(3,)]


@pytest.mark.parametrize(
    "option",
    ["-c role=postgres", "-c session_authorization=postgres", "-crole=postgres", "--role=postgres"],
)
def test_startup_option_changing_identity_is_refused(gateway: RunningGateway, option: str) -> None:
    dsn = gateway.dsn(token_for(gateway, "ai-agents"), options=option)
    with pytest.raises(psycopg.OperationalError) as info:
        connect(dsn)
    text = str(info.value)
    assert "FATAL" in text and "pgwarden" in text and "startup option refused" in text
    # The SQLSTATE, on the wire.
    client = RawClient(gateway, token_for(gateway, "ai-agents"), options=option)
    try:
        [error] = errors_in(client.startup_reply)
        assert (error.severity, error.sqlstate) == ("FATAL", REFUSED)
        assert not any(code == "Z" for code, _ in client.startup_reply)
    finally:
        client.close()


async def test_startup_parameter_role_via_asyncpg_is_refused(gateway: RunningGateway) -> None:
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(
            gateway.url(token_for(gateway, "ai-agents")),
            server_settings={"role": "postgres"},
            timeout=10,
        )
    assert info.value.sqlstate == REFUSED
    assert "pgwarden" in str(info.value)


def test_admins_may_set_role_at_startup(gateway: RunningGateway) -> None:
    dsn = gateway.dsn(token_for(gateway, "admins"), options=f"-c role={SUPERUSER}")
    with connect(dsn) as conn:
        assert simple(conn, "SELECT current_user") == [(SUPERUSER,)]


# -- a statement prepared by SQL, executed by protocol ---------------------------------------


@pytest.mark.parametrize(
    "text", [b"SELECT email, ssn FROM customers", b"SELECT * FROM customers"], ids=["named", "star"]
)
def test_sql_prepared_statement_run_by_bind_is_masked(gateway: RunningGateway, text: bytes) -> None:
    """PREPARE by Query, then Bind/Execute of that name: decided on the same facts as the
    SQL EXECUTE would be (schemas resolved, * expanded), so the same masks apply."""
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        client.send(Query(b"PREPARE by_sql AS " + text))
        assert not errors_in(client.until_ready())
        client.send(Bind("", "by_sql"), Execute(""), Sync())
        reply = client.until_ready()
    finally:
        client.close()
    assert not errors_in(reply)
    rows = [DataRow.decode(body).values for code, body in reply if code == "D"]
    assert len(rows) == 2
    for secret in (b"ada@example.com", b"grace@example.org", b"123-45-6789", b"987-65-4321"):
        assert secret not in repr(rows).encode(), rows


# -- the FunctionCall message --------------------------------------------------------------


def _function_call(
    gateway: RunningGateway, groups: tuple[str, ...], signature: str, arg: bytes
) -> tuple[RawClient, list[tuple[str, bytes]]]:
    [(oid,)] = direct(gateway, f"SELECT '{signature}'::regprocedure::oid")
    client = RawClient(gateway, token_for(gateway, *groups))
    client.send(FunctionCall(int(oid), (1,), (arg,), 0))
    return client, client.until_ready()


def test_function_call_message_is_decided_as_a_call_of_its_function(
    gateway: RunningGateway,
) -> None:
    """ai-agents: a call is code, held for approval; nothing runs, the session carries on."""
    before = direct(gateway, "SELECT count(*) FROM pg_largeobject_metadata")
    client, reply = _function_call(
        gateway, ("ai-agents",), "lo_creat(integer)", b"\xff\xff\xff\xff"
    )
    try:
        codes = [code for code, _ in reply]
        assert "V" not in codes  # no FunctionCallResponse: nothing ran
        [error] = errors_in(reply)
        assert error.sqlstate == REFUSED and "pgwarden" in (error.message or "")
        assert "approval required" in (error.message or "")
        assert codes[-1] == "Z"
        client.send(Query(b"SELECT 40 + 2"))
        reply = client.until_ready()
        assert not errors_in(reply)
        assert [code for code, _ in reply] == ["T", "D", "C", "Z"]
    finally:
        client.close()
    assert direct(gateway, "SELECT count(*) FROM pg_largeobject_metadata") == before


def test_function_call_message_allowed_for_admins_runs(gateway: RunningGateway) -> None:
    client, reply = _function_call(gateway, ("admins",), "lo_creat(integer)", b"\xff\xff\xff\xff")
    try:
        codes = [code for code, _ in reply]
        assert codes == ["V", "Z"], reply
        client.send(Query(b"SELECT 40 + 2"))
        assert [code for code, _ in client.until_ready()] == ["T", "D", "C", "Z"]
    finally:
        client.close()
    [result] = [body for code, body in reply if code == "V"]
    loid = int(result[4:].decode())  # int32 length, then the new OID as text (format 0)
    direct(gateway, f"SELECT lo_unlink({loid})")


def test_function_call_of_a_server_side_escape_is_denied(gateway: RunningGateway) -> None:
    """pg_terminate_backend through the FunctionCall message is still an escape."""
    client, reply = _function_call(
        gateway, ("engineers",), "pg_terminate_backend(integer,bigint)", b"\x00\x00\x00\x01"
    )
    try:
        [error] = errors_in(reply)
        assert error.sqlstate == REFUSED and "pg_terminate_backend" in (error.message or "")
        assert "V" not in [code for code, _ in reply]
    finally:
        client.close()
