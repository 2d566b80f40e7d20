# ruff: noqa: S608  (tests build SQL around table names of their own)
"""Statements that must not be judged by their first keyword, sent by an ai-agents token.

Every case runs against a table of its own, created directly; after the refusal the table
is checked directly: still there, the same rows, no table created, identity unchanged.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import TupleRow

from cli.localpg import MD5_USER, SUPERUSER
from tests.harness import RunningGateway

from . import (
    Refusal,
    assert_policy_refusal,
    connect,
    direct,
    fresh_table,
    original_rows,
    refusal_of,
    simple,
    table_exists,
    table_rows,
    token_for,
)

pytestmark = pytest.mark.server

MARKER = f"pgw_{uuid.uuid4().hex[:8]}"
WRITE = "ai-agents may not write without approval"
DDL = "ai-agents may not change the schema (DDL) without approval"
LOCK = "ai-agents may not lock rows"
READ_FILE = "pg_read_file"


@pytest.fixture
def table(gateway: RunningGateway) -> Iterator[str]:
    name = fresh_table(gateway)
    yield name
    direct(gateway, f'DROP TABLE IF EXISTS "{name}"')
    for (rel,) in direct(
        gateway,
        "SELECT relname FROM pg_class WHERE relname LIKE %s AND relkind = 'r'",
        (MARKER + "%",),
    ):
        direct(gateway, f'DROP TABLE IF EXISTS "{rel}"')


@pytest.fixture
def agent(gateway: RunningGateway) -> Iterator[psycopg.Connection[TupleRow]]:
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        yield conn


def refused(conn: psycopg.Connection[TupleRow], text: str) -> Refusal:
    try:
        rows = simple(conn, text)
    except psycopg.Error as exc:
        return refusal_of(exc)
    raise AssertionError(f"not refused: {text!r} returned {rows!r}")


def unchanged(
    gateway: RunningGateway, table: str, conn: psycopg.Connection[TupleRow] | None = None
) -> None:
    """Nothing of the refused message happened, as the database itself reports."""
    assert table_exists(gateway, table)
    assert table_rows(gateway, table) == original_rows()
    assert not direct(
        gateway, "SELECT relname FROM pg_class WHERE relname LIKE %s", (MARKER + "%",)
    )
    if conn is not None:
        # The session is usable, and nobody else.
        assert simple(conn, "SELECT current_user, session_user") == [(SUPERUSER, SUPERUSER)]
        assert simple(conn, "SHOW application_name") != [(MARKER,)]


# -- writes hidden under another command word ------------------------------------------

HIDDEN_WRITES = {
    "dml-in-cte": ("WITH d AS (DELETE FROM {t} RETURNING *) SELECT * FROM d", WRITE),
    "update-in-cte": (
        "WITH u AS (UPDATE {t} SET v = 'x' RETURNING id) SELECT count(*) FROM u",
        WRITE,
    ),
    "insert-in-nested-cte": (
        "WITH a AS (SELECT 1), b AS (INSERT INTO {t} VALUES (9, 'x') RETURNING id) "
        "SELECT * FROM a, (SELECT * FROM b) s",
        WRITE,
    ),
    "explain-analyze-delete": ("EXPLAIN ANALYZE DELETE FROM {t}", WRITE),
    "explain-analyze-update": ("EXPLAIN (ANALYZE, FORMAT JSON) UPDATE {t} SET v = 'x'", WRITE),
    "select-into": ("SELECT * INTO {marker}_into FROM {t}", DDL),
    "create-table-as": ("CREATE TABLE {marker}_ctas AS SELECT * FROM {t}", DDL),
    "merge": (
        "MERGE INTO {t} USING (SELECT 1 AS id) s ON {t}.id = s.id WHEN MATCHED THEN DELETE",
        WRITE,
    ),
    "insert-select": ("INSERT INTO {t} SELECT id + 10, v FROM {t}", WRITE),
    # The message is held on its first statement's row lock; the DELETE never runs either.
    "select-for-update-then-delete": ("SELECT * FROM {t} FOR UPDATE; DELETE FROM {t}", LOCK),
}


@pytest.mark.parametrize(("text", "reason"), list(HIDDEN_WRITES.values()), ids=list(HIDDEN_WRITES))
def test_hidden_writes_wait_for_approval(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow], text: str, reason: str
) -> None:
    r = refused(agent, text.format(t=f'"{table}"', marker=MARKER))
    assert_policy_refusal(r, approval=True, reason=reason)
    unchanged(gateway, table, agent)


def test_copy_of_a_delete_to_stdout(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow]
) -> None:
    with pytest.raises(psycopg.Error) as info, agent.cursor() as cur:
        with cur.copy(f'COPY (DELETE FROM "{table}" RETURNING *) TO STDOUT') as copy:
            data = b"".join(bytes(b) for b in copy)
        raise AssertionError(f"COPY ran: {data!r}")
    assert_policy_refusal(refusal_of(info.value), approval=True, reason=WRITE)
    unchanged(gateway, table, agent)


def test_prepare_then_execute_a_delete(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow]
) -> None:
    """PREPARE may be refused, EXECUTE must be; the delete never runs either way."""
    try:
        simple(agent, f'PREPARE {MARKER} AS DELETE FROM "{table}"')
    except psycopg.Error as exc:
        assert_policy_refusal(refusal_of(exc), approval=True, reason=WRITE)
    r = refused(agent, f"EXECUTE {MARKER}")
    if r.sqlstate != "26000":  # the PREPARE was refused, so the server knows no such name
        assert_policy_refusal(r, approval=True, reason=WRITE)
    # Through the extended protocol too (psycopg sends parameters with Parse/Bind/Execute).
    with pytest.raises(psycopg.Error) as info:
        agent.execute(f"EXECUTE {MARKER}", prepare=False)
    if info.value.diag.sqlstate != "26000":
        assert_policy_refusal(refusal_of(info.value), approval=True, reason=WRITE)
    unchanged(gateway, table, agent)


def test_prepare_and_execute_in_one_message(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow]
) -> None:
    r = refused(agent, f'PREPARE {MARKER}_p AS DELETE FROM "{table}"; EXECUTE {MARKER}_p')
    assert_policy_refusal(r, approval=True, reason=WRITE)
    unchanged(gateway, table, agent)
    # Nothing of the message ran: the name was never prepared.
    assert simple(agent, "SELECT count(*) FROM pg_prepared_statements") == [(0,)]


def test_prepared_read_then_execute_is_allowed(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow]
) -> None:
    simple(agent, f'PREPARE {MARKER}_r AS SELECT id, v FROM "{table}" ORDER BY id')
    assert simple(agent, f"EXECUTE {MARKER}_r") == original_rows()


def test_declare_cursor_over_a_write_cte(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow]
) -> None:
    r = refused(
        agent,
        f'BEGIN; DECLARE c CURSOR FOR WITH d AS (DELETE FROM "{table}" RETURNING *) '
        "SELECT * FROM d; FETCH ALL FROM c; COMMIT",
    )
    assert_policy_refusal(r, approval=True, reason=WRITE)
    assert agent.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    unchanged(gateway, table, agent)


def test_declare_cursor_over_an_escape(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow]
) -> None:
    r = refused(
        agent, "BEGIN; DECLARE c CURSOR FOR SELECT pg_read_file('/etc/hostname'); FETCH ALL FROM c"
    )
    assert_policy_refusal(r, reason=READ_FILE)
    assert agent.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    unchanged(gateway, table, agent)


# -- data changed or rows locked by a SELECT -----------------------------------------------


def test_large_object_writes_wait_for_approval(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow]
) -> None:
    [(oid,)] = direct(gateway, "SELECT lo_from_bytea(0, 'kept')")
    try:
        before = direct(gateway, "SELECT count(*) FROM pg_largeobject_metadata")
        for text in (
            f"SELECT lo_unlink({oid})",
            f"SELECT lo_put({oid}, 0, 'gone')",
            "SELECT lo_from_bytea(0, 'new')",
            "SELECT lo_create(0)",
            f"SELECT lowrite(lo_open({oid}, 131072), 'gone')",
        ):
            assert_policy_refusal(refused(agent, text), approval=True, reason=WRITE)
        assert direct(gateway, "SELECT count(*) FROM pg_largeobject_metadata") == before
        assert direct(gateway, f"SELECT lo_get({oid})") == [(b"kept",)]
        unchanged(gateway, table, agent)
    finally:
        direct(gateway, f"SELECT lo_unlink({oid})")


def test_sequence_writes_wait_for_approval(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow]
) -> None:
    seq = f"{table}_seq"
    direct(gateway, f'CREATE SEQUENCE "{seq}" OWNED BY "{table}".id')
    for text in (f"SELECT setval('\"{seq}\"', 1000)", f"SELECT nextval('\"{seq}\"')"):
        assert_policy_refusal(refused(agent, text), approval=True, reason=WRITE)
    assert direct(gateway, f'SELECT last_value, is_called FROM "{seq}"') == [(1, False)]
    unchanged(gateway, table, agent)


@pytest.mark.parametrize(
    "text",
    [
        "SELECT * FROM {t} FOR UPDATE",
        "SELECT * FROM {t} FOR SHARE NOWAIT",
        "WITH l AS (SELECT id FROM {t} FOR NO KEY UPDATE) SELECT count(*) FROM l",
        "BEGIN; DECLARE c CURSOR FOR SELECT * FROM {t} FOR UPDATE; FETCH ALL FROM c",
    ],
    ids=["for-update", "for-share", "in-cte", "cursor"],
)
def test_row_locks_wait_for_approval(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow], text: str
) -> None:
    r = refused(agent, text.format(t=f'"{table}"'))
    assert_policy_refusal(r, approval=True, reason=LOCK)
    assert agent.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    unchanged(gateway, table, agent)


def test_engineers_may_lock_rows(gateway: RunningGateway, table: str) -> None:
    with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
        assert simple(conn, f'SELECT id, v FROM "{table}" ORDER BY id FOR UPDATE') == (
            original_rows()
        )


def test_operator_backed_by_a_writing_function_waits_for_approval(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow]
) -> None:
    """`1 #=# 2` names no function, yet runs the one behind the operator."""
    wipe = f"{MARKER}_wipe"
    direct(
        gateway,
        f'CREATE FUNCTION public."{wipe}"(int, int) RETURNS boolean LANGUAGE sql '
        f'AS $$ DELETE FROM "{table}"; SELECT true $$',
    )
    try:
        direct(
            gateway,
            "CREATE OPERATOR public.#=# "
            f'(LEFTARG = int, RIGHTARG = int, FUNCTION = public."{wipe}")',
        )
        for text in ("SELECT 1 #=# 2", f'SELECT id FROM "{table}" WHERE id #=# 1'):
            r = refused(agent, text)
            assert_policy_refusal(r, approval=True, reason="functions the policy cannot see into")
        unchanged(gateway, table, agent)
    finally:
        direct(gateway, f'DROP FUNCTION public."{wipe}"(int, int) CASCADE')


def test_function_by_attribute_notation_waits_for_approval(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow]
) -> None:
    """`r.wipe` is wipe(r) when the table has no column wipe: a call with no call syntax."""
    wipe = f"{MARKER}_wipe"
    direct(
        gateway,
        f'CREATE FUNCTION public."{wipe}"(r "{table}") RETURNS boolean LANGUAGE sql '
        f'AS $$ DELETE FROM "{table}"; SELECT true $$',
    )
    try:
        for text in (
            f'SELECT r."{wipe}" FROM "{table}" r',
            f'SELECT (r)."{wipe}" FROM "{table}" r',
        ):
            r = refused(agent, text)
            assert_policy_refusal(r, approval=True, reason="functions the policy cannot see into")
        unchanged(gateway, table, agent)
    finally:
        direct(gateway, f'DROP FUNCTION public."{wipe}" CASCADE')


def test_cast_to_a_domain_checked_by_a_writing_function_waits_for_approval(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow]
) -> None:
    """`1::d` runs d's CHECK, and with it whatever function the CHECK calls."""
    wipe, domain = f"{MARKER}_wipe", f"{MARKER}_d"
    direct(
        gateway,
        f'CREATE FUNCTION public."{wipe}"(int) RETURNS boolean LANGUAGE sql '
        f'AS $$ DELETE FROM "{table}"; SELECT true $$',
    )
    try:
        direct(gateway, f'CREATE DOMAIN public."{domain}" AS int CHECK (public."{wipe}"(VALUE))')
        for text in (
            f'SELECT 1::"{domain}"',
            f'SELECT CAST(id AS public."{domain}") FROM "{table}"',
        ):
            r = refused(agent, text)
            assert_policy_refusal(r, approval=True, reason="functions the policy cannot see into")
        unchanged(gateway, table, agent)
    finally:
        direct(gateway, f'DROP FUNCTION public."{wipe}" CASCADE')


# -- function calls wherever they are nested, however they are spelled ------------------

ESCAPES = {
    "in-generate-series-subquery": (
        "SELECT 1 FROM generate_series(1, (SELECT length(pg_read_file('/etc/hostname'))))"
    ),
    "in-where": "SELECT id FROM {t} WHERE v <> pg_read_file('/etc/hostname')",
    "in-lateral": "SELECT * FROM {t}, LATERAL (SELECT pg_read_file('/etc/hostname')) f",
    "in-case": "SELECT CASE WHEN id > 0 THEN pg_read_file('/etc/hostname') END FROM {t}",
    "in-values": "VALUES (pg_read_file('/etc/hostname'))",
    "in-order-by": "SELECT id FROM {t} ORDER BY pg_read_file('/etc/hostname')",
    "in-create-table-default": (
        "CREATE TABLE {marker}_def (a text DEFAULT pg_read_file('/etc/hostname'))"
    ),
    "in-insert-values": "INSERT INTO {t} VALUES (50, pg_read_file('/etc/hostname'))",
    "upper-case": "SELECT PG_READ_FILE('/etc/hostname')",
    "quoted": "SELECT \"pg_read_file\"('/etc/hostname')",
    "schema-quoted": "SELECT pg_catalog.\"pg_read_file\"('/etc/hostname')",
    "schema-mixed-case": "SELECT PG_CATALOG.Pg_Read_File('/etc/hostname')",
    "public-quoted-upper": "SELECT public.\"PG_READ_FILE\"('/etc/hostname')",
    "unicode-escape-identifier": "SELECT U&\"pg\\005fread\\005ffile\"('/etc/hostname')",
    "unicode-escape-custom-char": "SELECT U&\"!0070g_read_file\" UESCAPE '!' ('/etc/hostname')",
    "binary-variant": "SELECT pg_read_binary_file('/etc/hostname')",
    "ls-dir": "SELECT * FROM pg_ls_dir('.')",
    "stat-file": "SELECT (pg_stat_file('PG_VERSION')).size",
    "terminate": "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE false",
    "reload-conf": "SELECT pg_reload_conf()",
    "lo-import": "SELECT lo_import('/etc/hostname')",
}


@pytest.mark.parametrize("text", list(ESCAPES.values()), ids=list(ESCAPES))
def test_escape_functions_are_found_wherever_nested(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow], text: str
) -> None:
    before = direct(gateway, "SELECT count(*) FROM pg_largeobject_metadata")
    r = refused(agent, text.format(t=f'"{table}"', marker=MARKER))
    assert_policy_refusal(r, reason="may not use server-side escapes")
    unchanged(gateway, table, agent)
    assert direct(gateway, "SELECT count(*) FROM pg_largeobject_metadata") == before


# -- identity changes ---------------------------------------------------------------------

IDENTITY = {
    "set_config-role": (f"SELECT set_config('role', '{MD5_USER}', false)", "changing role"),
    "set_config-role-computed": (
        f"SELECT set_config('ro' || 'le', '{MD5_USER}', false)",
        "changing role",
    ),
    "set_config-session-authorization": (
        f"SELECT set_config('session_authorization', '{MD5_USER}', false)",
        "changing session authorization",
    ),
    "set-role": (f"SET ROLE {MD5_USER}", "SET ROLE"),
    "set-local-role": (f"BEGIN; SET LOCAL ROLE {MD5_USER}; SELECT 1", "SET ROLE"),
    "set-role-to": (f"SET role TO '{MD5_USER}'", "SET ROLE"),
    "set-session-authorization": (
        f"SET SESSION AUTHORIZATION {MD5_USER}",
        "SET SESSION AUTHORIZATION",
    ),
    "update-pg_settings": (
        f"UPDATE pg_settings SET setting = '{MD5_USER}' WHERE name = 'role'",
        "changing role",
    ),
}


@pytest.mark.parametrize(("text", "reason"), list(IDENTITY.values()), ids=list(IDENTITY))
def test_identity_changes_are_denied(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow], text: str, reason: str
) -> None:
    r = refused(agent, text)
    assert_policy_refusal(r, reason=reason)
    assert agent.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    unchanged(gateway, table, agent)


# -- a second statement hidden by comments, quotes and dollar quotes ---------------------

HIDDEN_SECOND = {
    "block-comment": "SET application_name = '{marker}'; /* ; */ DELETE FROM {t}",
    "nested-block-comment": "SET application_name = '{marker}' /* /* ; */ ; */; DELETE FROM {t}",
    "line-comment": "SET application_name = '{marker}' -- ; \n; DELETE FROM {t}",
    "dollar-quote": "SELECT $$;$$; SET application_name = '{marker}'; DELETE FROM {t}",
    "tagged-dollar-quote": "SELECT $q$ $$; $q$; SET application_name = '{marker}'; DELETE FROM {t}",
    "escaped-quote": "SELECT E'x\\';'; SET application_name = '{marker}'; DELETE FROM {t}",
    "quoted-identifier": "SELECT 1 AS \";\"; SET application_name = '{marker}'; DELETE FROM {t}",
}


@pytest.mark.parametrize("text", list(HIDDEN_SECOND.values()), ids=list(HIDDEN_SECOND))
def test_hidden_second_statement_refuses_the_whole_message(
    gateway: RunningGateway, table: str, agent: psycopg.Connection[TupleRow], text: str
) -> None:
    r = refused(agent, text.format(t=f'"{table}"', marker=MARKER))
    assert_policy_refusal(r, approval=True, reason=WRITE)
    # Not even the allowed SET before the DELETE ran.
    assert simple(agent, "SHOW application_name") != [(MARKER,)]
    unchanged(gateway, table, agent)


@pytest.mark.parametrize(
    "text",
    [
        "DELETE FROM {t} WHERE id = 1; /* ; */ DELETE FROM {t}",
        "DELETE FROM {t} WHERE id = 1; SELECT $$;$$; DELETE FROM {t}",
    ],
    ids=["block-comment", "dollar-quote"],
)
def test_engineers_bounded_delete_does_not_run_when_the_message_is_held(
    gateway: RunningGateway, table: str, text: str
) -> None:
    with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
        r = refused(conn, text.format(t=f'"{table}"'))
        assert_policy_refusal(r, approval=True, reason="without a WHERE clause")
        unchanged(gateway, table, conn)


@pytest.mark.parametrize(
    "where",
    ["true", "'t'", "1 = 1", "true OR id = 1", "NOT false", "id = id"],
)
def test_engineers_trivial_where_counts_as_no_where(
    gateway: RunningGateway, table: str, where: str
) -> None:
    with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
        r = refused(conn, f'DELETE FROM "{table}" WHERE {where}')
        assert_policy_refusal(r, approval=True, reason="without a WHERE clause")
        unchanged(gateway, table, conn)
