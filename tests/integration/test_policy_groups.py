"""The reference policy, row by row, through the real gateway, real OPA and real PostgreSQL.

Each case runs one statement with a token of one group against a table of its own (created
directly). Allowed statements must give the right result; denied ones a 42501 naming
pgwarden, the reason and a decision id; held ones "approval required". A refused statement
leaves the database exactly as it was, which is checked by querying it directly afterwards.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.harness import RunningGateway

from . import (
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

Check = Callable[[Any, str, list[tuple[Any, ...]]], None]


@dataclass(frozen=True)
class Case:
    sql: str
    outcome: str  # allow | deny | approve
    reason: str | None = None
    check: Check | None = None

    def text(self, table: str) -> str:
        return self.sql.format(t=f'"{table}"', marker=MARKER, spool=SPOOL)


MARKER = f"pgw_{uuid.uuid4().hex[:8]}"
# Where a program or COPY would leave a file if it ran: writable by the server's OS user.
SPOOL = Path(tempfile.mkdtemp(prefix="pgw-spool-"))
SPOOL.chmod(0o777)
atexit.register(shutil.rmtree, SPOOL, True)


def rows_are(expected: list[tuple[Any, ...]]) -> Check:
    def check(gateway: RunningGateway, table: str, result: list[tuple[Any, ...]]) -> None:
        assert result == expected

    return check


def table_now(expected: list[tuple[Any, ...]]) -> Check:
    def check(gateway: RunningGateway, table: str, result: list[tuple[Any, ...]]) -> None:
        assert table_rows(gateway, table) == expected

    return check


def table_gone(gateway: RunningGateway, table: str, result: list[tuple[Any, ...]]) -> None:
    assert not table_exists(gateway, table)


def granted_to_public(gateway: RunningGateway, table: str, result: list[tuple[Any, ...]]) -> None:
    assert direct(
        gateway, "SELECT has_table_privilege('public', %s, 'SELECT')", (f'"{table}"',)
    ) == [(True,)]


def renamed_column(gateway: RunningGateway, table: str, result: list[tuple[Any, ...]]) -> None:
    assert direct(
        gateway,
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum = 2",
        (f'"{table}"',),
    ) == [("w",)]


def same_as_direct(query: str) -> Check:
    def check(gateway: RunningGateway, table: str, result: list[tuple[Any, ...]]) -> None:
        assert result == direct(gateway, query)

    return check


def assert_idle(conn: psycopg.Connection[TupleRow]) -> None:
    """The connection is idle and open after a refusal."""
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert not conn.closed


def run_case(gateway: RunningGateway, groups: tuple[str, ...], case: Case) -> None:
    table = fresh_table(gateway)
    try:
        token = token_for(gateway, *groups)
        text = case.text(table)
        public_before = direct(
            gateway, "SELECT has_table_privilege('public', %s, 'SELECT')", (f'"{table}"',)
        )
        with connect(gateway.dsn(token)) as conn:
            try:
                result = simple(conn, text)
            except psycopg.Error as exc:
                refusal = refusal_of(exc)
                assert case.outcome != "allow", f"{text!r} refused: {refusal}"
                assert_policy_refusal(
                    refusal, approval=case.outcome == "approve", reason=case.reason
                )
                # The session is still usable (and still governed by the same row).
                if set(groups) & {"admins", "engineers", "ai-agents"}:
                    assert simple(conn, "SELECT 41 + 1") == [(42,)]
                else:
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        simple(conn, "SELECT 41 + 1")
                    assert_idle(conn)
            else:
                assert case.outcome == "allow", f"{text!r} was not refused: {result!r}"
                if case.check is not None:
                    case.check(gateway, table, result)
                return
        # Refused: nothing changed, as seen straight in the database.
        assert table_exists(gateway, table)
        assert table_rows(gateway, table) == original_rows()
        assert (
            direct(gateway, "SELECT has_table_privilege('public', %s, 'SELECT')", (f'"{table}"',))
            == public_before
        )
        assert direct(gateway, "SELECT count(*) FROM customers") == [(2,)]
        assert direct(gateway, "SELECT count(*) FROM orders") == [(3,)]
        assert not direct(gateway, "SELECT 1 FROM pg_roles WHERE rolname = %s", (MARKER,))
        assert not direct(gateway, "SELECT 1 FROM pg_class WHERE relname LIKE %s", (MARKER + "%",))
    finally:
        direct(gateway, f'DROP TABLE IF EXISTS "{table}"')


ORDERS = [(1, 1, 10.5), (2, 1, 20), (3, 2, 7.25)]
SELECT_ORDERS = Case(
    "SELECT id, customer_id, amount::float FROM orders ORDER BY id", "allow", check=rows_are(ORDERS)
)
SELECT_OWN = Case("SELECT id, v FROM {t} ORDER BY id", "allow", check=rows_are(original_rows()))


# -- admins: everything that parses -----------------------------------------------------

ADMINS = {
    "select": SELECT_ORDERS,
    "select-own": SELECT_OWN,
    "insert": Case(
        "INSERT INTO {t} VALUES (10, 'ten')",
        "allow",
        check=table_now([*original_rows(), (10, "ten")]),
    ),
    "update-no-where": Case(
        "UPDATE {t} SET v = 'x'", "allow", check=table_now([(1, "x"), (2, "x"), (3, "x")])
    ),
    "delete-no-where": Case("DELETE FROM {t}", "allow", check=table_now([])),
    "truncate": Case("TRUNCATE {t}", "allow", check=table_now([])),
    "drop": Case("DROP TABLE {t}", "allow", check=table_gone),
    "alter": Case("ALTER TABLE {t} RENAME COLUMN v TO w", "allow", check=renamed_column),
    "grant": Case("GRANT SELECT ON {t} TO PUBLIC", "allow", check=granted_to_public),
    "do-block": Case(
        "DO $$BEGIN INSERT INTO {t} VALUES (99, 'do'); END$$",
        "allow",
        check=table_now([*original_rows(), (99, "do")]),
    ),
    "pg_read_file": Case(
        "SELECT pg_read_file('PG_VERSION')",
        "allow",
        check=same_as_direct("SELECT pg_read_file('PG_VERSION')"),
    ),
}


# -- engineers: write freely, what is hard to undo waits for an admin, no escapes -------

ENGINEERS = {
    "select": SELECT_ORDERS,
    "select-classified": Case(
        "SELECT name FROM customers WHERE email = 'ada@example.com'",
        "allow",
        check=rows_are([("Ada",)]),
    ),
    "insert": Case(
        "INSERT INTO {t} VALUES (10, 'ten')",
        "allow",
        check=table_now([*original_rows(), (10, "ten")]),
    ),
    "update-where": Case(
        "UPDATE {t} SET v = 'x' WHERE id = 2",
        "allow",
        check=table_now([(1, "v1"), (2, "x"), (3, "v3")]),
    ),
    "delete-where": Case(
        "DELETE FROM {t} WHERE id = 1", "allow", check=table_now([(2, "v2"), (3, "v3")])
    ),
    "delete-no-where": Case(
        "DELETE FROM {t}",
        "approve",
        "engineers may not UPDATE or DELETE without a WHERE clause without approval",
    ),
    "update-no-where": Case(
        "UPDATE {t} SET v = 'x'",
        "approve",
        "engineers may not UPDATE or DELETE without a WHERE clause without approval",
    ),
    "delete-where-true": Case(
        "DELETE FROM {t} WHERE true",
        "approve",
        "engineers may not UPDATE or DELETE without a WHERE clause without approval",
    ),
    "update-where-1=1": Case(
        "UPDATE {t} SET v = 'x' WHERE 1 = 1",
        "approve",
        "engineers may not UPDATE or DELETE without a WHERE clause without approval",
    ),
    "truncate": Case("TRUNCATE {t}", "approve", "engineers may not TRUNCATE without approval"),
    "drop": Case(
        "DROP TABLE {t}", "approve", "engineers may not change the schema (DDL) without approval"
    ),
    "create": Case(
        "CREATE TABLE {marker}_new (a int)",
        "approve",
        "engineers may not change the schema (DDL) without approval",
    ),
    "do-block": Case(
        "DO $$BEGIN DELETE FROM {t}; END$$",
        "approve",
        "engineers may not run DO blocks (opaque code) without approval",
    ),
    "grant": Case("GRANT SELECT ON {t} TO PUBLIC", "deny", "only admins may"),
    "create-role": Case("CREATE ROLE {marker}", "deny", "only admins may"),
    "set-role": Case("SET ROLE postgres", "deny", "SET ROLE"),
    "set-session-authorization": Case(
        "SET SESSION AUTHORIZATION postgres", "deny", "SET SESSION AUTHORIZATION"
    ),
    "alter-system": Case("ALTER SYSTEM SET work_mem = '7777kB'", "deny", "ALTER SYSTEM"),
    "copy-to-program": Case(
        "COPY {t} TO PROGRAM 'touch {spool}/{marker}'", "deny", "COPY ... PROGRAM"
    ),
    "copy-to-file": Case(
        "COPY {t} TO '{spool}/{marker}.csv'", "deny", "COPY to or from a server file"
    ),
    "pg_read_file": Case(
        "SELECT pg_read_file('/etc/passwd')", "deny", "function pg_catalog.pg_read_file"
    ),
    "terminate-backend": Case(
        "SELECT pg_terminate_backend(pg_backend_pid())", "deny", "pg_terminate_backend"
    ),
    "session-setting": Case("SET work_mem = '8MB'", "allow"),
    "unparseable": Case("SELEC 1", "deny", "do not parse"),
}


# -- ai-agents: read (masked), every change waits, no opaque code, no oracles -----------

AI_AGENTS = {
    "select": SELECT_ORDERS,
    "select-own": SELECT_OWN,
    "select-unclassified-column": Case(
        "SELECT name FROM customers WHERE id = 2", "allow", check=rows_are([("Grace",)])
    ),
    "insert": Case("INSERT INTO {t} VALUES (10, 'ten')", "approve", "ai-agents may not write"),
    "update": Case("UPDATE {t} SET v = 'x' WHERE id = 1", "approve", "ai-agents may not write"),
    "delete": Case("DELETE FROM {t} WHERE id = 1", "approve", "ai-agents may not write"),
    "delete-no-where": Case("DELETE FROM {t}", "approve", "ai-agents may not write"),
    "truncate": Case("TRUNCATE {t}", "approve", "ai-agents may not write"),
    "drop": Case(
        "DROP TABLE {t}", "approve", "ai-agents may not change the schema (DDL) without approval"
    ),
    "alter": Case(
        "ALTER TABLE {t} ADD COLUMN w int", "approve", "ai-agents may not change the schema"
    ),
    "pg_read_file": Case(
        "SELECT pg_read_file('/etc/passwd')",
        "deny",
        "ai-agents may not use server-side escapes (function pg_catalog.pg_read_file)",
    ),
    "do-block": Case(
        "DO $$BEGIN DELETE FROM {t}; END$$",
        "deny",
        "ai-agents may not run DO blocks: opaque code is denied",
    ),
    "where-on-email": Case(
        "SELECT id FROM customers WHERE email = 'ada@example.com'",
        "deny",
        "classified column public.customers.email outside the output list (predicate)",
    ),
    "order-by-ssn": Case(
        "SELECT id FROM customers ORDER BY ssn", "deny", "classified column public.customers.ssn"
    ),
    "join-on-phone": Case(
        "SELECT a.id FROM customers a JOIN customers b ON a.phone = b.phone",
        "deny",
        "classified column public.customers.phone",
    ),
    "grant": Case("GRANT SELECT ON {t} TO PUBLIC", "deny", "only admins may"),
    "set-role": Case("SET ROLE postgres", "deny", "SET ROLE"),
    "alter-system": Case("ALTER SYSTEM SET work_mem = '7777kB'", "deny", "ALTER SYSTEM"),
    "copy-to-program": Case(
        "COPY {t} TO PROGRAM 'touch {spool}/{marker}'", "deny", "COPY ... PROGRAM"
    ),
    "session-setting": Case("SET work_mem = '8MB'", "allow"),
    "unparseable": Case("SELEC 1", "deny", "do not parse"),
    # A notification reaches other sessions' listeners (workers act on it): a write.
    "notify": Case("NOTIFY pgwarden_test", "approve", "ai-agents may not write"),
    "pg-notify": Case("SELECT pg_notify('pgwarden_test', 'x')", "approve", "may not write"),
    "listen": Case("LISTEN pgwarden_test", "allow"),
    # Triggers and foreign keys off for the session's writes: a server-side escape.
    "replication-role": Case(
        "SET session_replication_role = replica", "deny", "session_replication_role"
    ),
    "replication-role-set-config": Case(
        "SELECT set_config('session_replication_role', 'replica', false)",
        "deny",
        "session_replication_role",
    ),
}


# -- in none of the rows: nothing at all ----------------------------------------------

NOBODY_REASON = "principals in none of admins, engineers, ai-agents may not run statements"
NOBODY = {
    "select": Case("SELECT 1", "deny", NOBODY_REASON),
    "select-own": Case("SELECT * FROM {t}", "deny", NOBODY_REASON),
    "insert": Case("INSERT INTO {t} VALUES (10, 'ten')", "deny", NOBODY_REASON),
    "delete": Case("DELETE FROM {t} WHERE id = 1", "deny", NOBODY_REASON),
    "drop": Case("DROP TABLE {t}", "deny", NOBODY_REASON),
    "set": Case("SET work_mem = '8MB'", "deny", NOBODY_REASON),
    "begin": Case("BEGIN", "deny", NOBODY_REASON),
}


# -- pii-readers: lifts masking (and so the oracle rule), grants nothing by itself ------

AI_PII = {
    "where-on-email": Case(
        "SELECT id FROM customers WHERE email = 'grace@example.org'",
        "allow",
        check=rows_are([(2,)]),
    ),
    "insert": Case("INSERT INTO {t} VALUES (10, 'ten')", "approve", "ai-agents may not write"),
    "pg_read_file": Case("SELECT pg_read_file('/etc/passwd')", "deny", "server-side escapes"),
}
ENGINEERS_PII = {
    "delete-where": Case(
        "DELETE FROM {t} WHERE id = 3", "allow", check=table_now([(1, "v1"), (2, "v2")])
    ),
    "delete-no-where": Case("DELETE FROM {t}", "approve", "without a WHERE clause"),
    "grant": Case("GRANT SELECT ON {t} TO PUBLIC", "deny", "only admins may"),
}


def params(table: dict[str, Case]) -> list[Any]:
    return [pytest.param(case, id=name) for name, case in table.items()]


@pytest.mark.parametrize("case", params(ADMINS))
def test_admins(gateway: RunningGateway, case: Case) -> None:
    run_case(gateway, ("admins",), case)


@pytest.mark.parametrize("case", params(ENGINEERS))
def test_engineers(gateway: RunningGateway, case: Case) -> None:
    run_case(gateway, ("engineers",), case)
    assert list(SPOOL.iterdir()) == []


@pytest.mark.parametrize("case", params(AI_AGENTS))
def test_ai_agents(gateway: RunningGateway, case: Case) -> None:
    run_case(gateway, ("ai-agents",), case)
    assert list(SPOOL.iterdir()) == []


@pytest.mark.parametrize("groups", [(), ("viewers",), ("pii-readers",), ("Admins", "AI-agents")])
@pytest.mark.parametrize("case", params(NOBODY))
def test_nobody(gateway: RunningGateway, groups: tuple[str, ...], case: Case) -> None:
    run_case(gateway, groups, case)


@pytest.mark.parametrize("case", params(AI_PII))
def test_ai_agents_who_are_pii_readers(gateway: RunningGateway, case: Case) -> None:
    run_case(gateway, ("ai-agents", "pii-readers"), case)


@pytest.mark.parametrize("case", params(ENGINEERS_PII))
def test_engineers_who_are_pii_readers(gateway: RunningGateway, case: Case) -> None:
    run_case(gateway, ("pii-readers", "engineers"), case)


def test_most_privileged_row_applies(gateway: RunningGateway) -> None:
    """Groups grant, never restrict: ai-agents + admins may write."""
    run_case(
        gateway,
        ("ai-agents", "admins"),
        Case("DELETE FROM {t}", "allow", check=table_now([])),
    )


def test_alter_system_left_no_trace(gateway: RunningGateway) -> None:
    """The refused ALTER SYSTEMs above never reached postgresql.auto.conf."""
    auto_conf = direct(gateway, "SELECT pg_read_file('postgresql.auto.conf')")[0][0]
    assert "7777kB" not in auto_conf


@pytest.mark.parametrize("groups", [("ai-agents",), ("engineers",), ("admins",)])
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_allowed_reads_of_unclassified_columns_are_intact(
    gateway: RunningGateway, groups: tuple[str, ...], protocol: str
) -> None:
    """An allowed read returns the right rows: masks cover classified columns, nothing else."""
    queries = {
        "SELECT id, name FROM customers ORDER BY id": [(1, "Ada"), (2, "Grace")],
        "SELECT name FROM customers WHERE id = 2": [("Grace",)],
        "SELECT count(*) FROM customers": [(2,)],
        "SELECT o.id, c.name FROM orders o JOIN customers c ON c.id = o.customer_id "
        "ORDER BY o.id": [(1, "Ada"), (2, "Ada"), (3, "Grace")],
    }
    with connect(gateway.dsn(token_for(gateway, *groups))) as conn:
        for query, expected in queries.items():
            if protocol == "simple":
                rows = simple(conn, query)
            else:
                rows = conn.execute(query + " LIMIT %s", (10,)).fetchall()
            assert rows == expected, query


EXPRESSIONS_OVER_CLASSIFIED = [
    "SELECT upper(email) FROM customers WHERE id = 1",
    "SELECT row_to_json(c)::text FROM customers c WHERE id = 1",
    "SELECT x FROM (SELECT ssn || '' AS x FROM customers WHERE id = 1) s",
]


@pytest.mark.parametrize("groups", [("engineers",), ("admins",)])
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_expressions_over_classified_columns_never_show_them(
    gateway: RunningGateway, groups: tuple[str, ...], protocol: str
) -> None:
    """Masks follow a classified value into expressions (for all but pii-readers)."""
    queries = [
        *EXPRESSIONS_OVER_CLASSIFIED,
        "SELECT email FROM customers WHERE id = 1 UNION ALL SELECT 'z' WHERE false",
    ]
    secrets = ("ada@example.com", "123-45-6789")
    with connect(gateway.dsn(token_for(gateway, *groups))) as conn:
        for query in queries:
            if protocol == "simple":
                rows = simple(conn, query)
            else:
                rows = conn.execute(query + " LIMIT %s", (10,)).fetchall()
            assert len(rows) == 1, query
            shown = str(rows[0][0]).lower()
            assert not any(s in shown for s in secrets), (query, rows)


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_expressions_over_classified_columns_are_oracles_for_ai_agents(
    gateway: RunningGateway, protocol: str
) -> None:
    """For ai-agents an expression over a classified column is refused, not masked: what it
    computes (an error, a row count) would reach the client unmasked."""
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        for query in EXPRESSIONS_OVER_CLASSIFIED:
            with pytest.raises(psycopg.Error) as exc:
                if protocol == "simple":
                    simple(conn, query)
                else:
                    conn.execute(query + " LIMIT %s", (10,)).fetchall()
            assert_policy_refusal(refusal_of(exc.value), reason="(expression)")
        rows = simple(
            conn, "SELECT email FROM customers WHERE id = 1 UNION ALL SELECT 'z' WHERE false"
        )
        assert len(rows) == 1 and "ada@example.com" not in str(rows[0][0]).lower(), rows


@pytest.mark.parametrize("groups", [("ai-agents",), ("engineers",)])
def test_what_pools_and_drivers_send_is_allowed(
    gateway: RunningGateway, groups: tuple[str, ...]
) -> None:
    """A server-side cursor of psycopg (DECLARE, FETCH, MOVE, CLOSE), and what pools send on
    every checkout (DISCARD ALL, RESET ALL...), work for every row; afterwards masks and
    search_path tracking still hold."""
    with connect(gateway.dsn(token_for(gateway, *groups)), autocommit=False) as conn:
        with conn.cursor(name="pgw_cursor") as cur:  # DECLARE ... CURSOR, FETCH, CLOSE
            cur.execute("SELECT id, name, email FROM customers ORDER BY id")
            rows = cur.fetchmany(1) + cur.fetchall()
        assert [(r[0], r[1]) for r in rows] == [(1, "Ada"), (2, "Grace")]
        assert "ada@example.com" not in repr(rows) and "grace@example.org" not in repr(rows)
        for text in (
            "DECLARE c2 CURSOR WITH HOLD FOR SELECT id FROM orders ORDER BY id",
            "MOVE NEXT IN c2",
            "FETCH 1 FROM c2",
            "CLOSE c2",
            "CLOSE ALL",
            "SAVEPOINT s1",
            "RELEASE SAVEPOINT s1",
            "SET application_name = 'pool-checkout'",
            "SET TIME ZONE 'UTC'",
            "SHOW application_name",
        ):
            simple(conn, text)
        conn.commit()
    with connect(gateway.dsn(token_for(gateway, *groups))) as conn:
        simple(conn, "SET search_path = pg_catalog")
        simple(conn, "PREPARE p AS SELECT 1")
        for text in (
            "LISTEN pgw_pool",
            "UNLISTEN *",
            "DEALLOCATE ALL",
            "RESET ALL",
            "DISCARD PLANS",
            "DISCARD SEQUENCES",
            "DISCARD TEMP",
            "DISCARD ALL",
        ):
            simple(conn, text)
        # search_path was reset to the default: names resolve, and masks apply, as before.
        assert simple(conn, "SHOW search_path") == [('"$user", public',)]
        rows = simple(conn, "SELECT email FROM customers ORDER BY id")
        assert rows == [("a***@example.com",), ("g***@example.org",)]
        with pytest.raises(psycopg.Error):  # DISCARD ALL forgot it
            simple(conn, "EXECUTE p")
