# ruff: noqa: S608  (tests build SQL around table names of their own)
"""Classified values never reach engineers or ai-agents through serialisers or copies.

Through the real gateway, real OPA and real PostgreSQL, with psycopg (and the raw protocol
for the FunctionCall message). Built-ins that run SQL text, read a cursor or serialise a
relation by name (query_to_xml, table_to_xml, ts_stat, ...) and user-written functions are
opaque to lineage: every output column whose origin PostgreSQL does not report is masked
whole. A write whose value reads a classified column (UPDATE ... SET other = email, INSERT
... SELECT ssn, MERGE) needs approval for engineers and is refused to ai-agents, so the copy
cannot be read back later in cleartext; whatever it assigns is masked in RETURNING.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from gateway.protocol import FunctionCall, Query
from tests.harness import RunningGateway

from . import (
    ALL_CUSTOMER_SECRETS,
    REFUSED,
    RawClient,
    assert_no_customer_secret,
    assert_policy_refusal,
    connect,
    direct,
    errors_in,
    refusal_of,
    simple,
    token_for,
)

pytestmark = pytest.mark.server

SECRETS = ALL_CUSTOMER_SECRETS
ROLES = ("engineers", "ai-agents")


@pytest.fixture(scope="module")
def user_functions(gateway: RunningGateway) -> Iterator[None]:
    """Server-side SQL functions that return classified columns (created by a DBA)."""
    direct(
        gateway,
        "CREATE OR REPLACE FUNCTION pgw_email_of(int) RETURNS text LANGUAGE sql STABLE"
        " AS 'SELECT email FROM customers WHERE id = $1';"
        " CREATE OR REPLACE FUNCTION pgw_customers() RETURNS SETOF customers LANGUAGE sql"
        " STABLE AS 'SELECT * FROM customers'",
    )
    yield
    direct(gateway, "DROP FUNCTION pgw_email_of(int); DROP FUNCTION pgw_customers()")


SERIALISERS = [
    "SELECT query_to_xml('SELECT email, ssn FROM customers', true, false, '')",
    "SELECT query_to_xml_and_xmlschema('SELECT * FROM customers', false, false, '')",
    "SELECT table_to_xml('customers', true, false, '')",
    "SELECT table_to_xml('public.customers'::regclass, false, true, '')",
    "SELECT schema_to_xml('public', true, false, '')",
    "SELECT * FROM ts_stat('SELECT to_tsvector(''simple'', email || '' '' || ssn) FROM customers')",
    "SELECT x FROM (SELECT table_to_xml('customers', true, false, '')::text AS x) s",
    "SELECT pgw_email_of(1)",
    "SELECT id, pgw_email_of(id) FROM orders",
    "SELECT * FROM pgw_customers()",
    "SELECT c.email FROM pgw_customers() c",
    # Built-ins over the value itself: traced by lineage, masked as expressions.
    "SELECT to_jsonb(c) FROM customers c",
    "SELECT row_to_json(c) FROM customers c",
    "SELECT format('%s', c) FROM customers c",
    "SELECT array_agg(c)::text FROM customers c",
    "SELECT string_agg(email, ',') FROM customers",
    "SELECT quote_literal(ssn) FROM customers",
    "SELECT xmlforest(email, ssn) FROM customers",
    "SELECT json_populate_record(c, '{}') FROM customers c",
]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("text", SERIALISERS)
def test_serialisers_and_functions_relay_no_classified_value(
    gateway: RunningGateway, user_functions: None, role: str, text: str
) -> None:
    assert any(s in repr(direct(gateway, text)) for s in SECRETS), text  # the premise
    with connect(gateway.dsn(token_for(gateway, role))) as conn:
        try:
            rows = simple(conn, text)
        except psycopg.Error as exc:
            refusal = refusal_of(exc)
            # ai-agents: held (opaque code) or denied (an expression is an oracle).
            assert role == "ai-agents", (text, refusal)
            assert refusal.sqlstate == REFUSED, refusal
            assert_no_customer_secret(refusal)
        else:
            # Engineers may run it, masked: the answer is "mask", never cleartext.
            assert role == "engineers", (text, rows)
            assert rows, text
            assert_no_customer_secret(rows)
        assert simple(conn, "SELECT 1") == [(1,)]


@pytest.mark.parametrize("role", ROLES)
def test_a_cursor_serialised_by_cursor_to_xml_is_masked(gateway: RunningGateway, role: str) -> None:
    with connect(gateway.dsn(token_for(gateway, role)), autocommit=False) as conn:
        simple(conn, "DECLARE pgw_c CURSOR FOR SELECT id, email, ssn FROM customers")
        try:
            rows = simple(conn, "SELECT cursor_to_xml('pgw_c', 10, false, true, '')")
        except psycopg.Error as exc:
            assert role == "ai-agents"
            assert_policy_refusal(refusal_of(exc), approval=True)
            conn.rollback()
        else:
            assert role == "engineers"
            assert rows
            assert_no_customer_secret(rows)
            conn.rollback()


@pytest.mark.parametrize("role", ROLES)
def test_the_function_call_message_serialises_nothing_classified(
    gateway: RunningGateway, role: str
) -> None:
    [(oid,)] = direct(gateway, "SELECT 'query_to_xml(text,bool,bool,text)'::regprocedure::oid")
    client = RawClient(gateway, token_for(gateway, role))
    try:
        args = (b"SELECT email, ssn FROM customers", b"t", b"f", b"")
        client.send(FunctionCall(int(oid), (0,), args, 0))
        reply = client.until_ready()
        assert "V" not in [code for code, _ in reply], reply  # nothing ran
        [error] = errors_in(reply)
        assert error.sqlstate == REFUSED and "pgwarden" in (error.message or ""), error
        assert_no_customer_secret(reply)
        client.send(Query(b"SELECT 40 + 2"))
        assert [code for code, _ in client.until_ready()] == ["T", "D", "C", "Z"]
    finally:
        client.close()


# -- write-laundering ------------------------------------------------------------------


@pytest.fixture
def notes(gateway: RunningGateway) -> Iterator[str]:
    """An unclassified table of our own: id int, body text, rows 1 and 2."""
    name = f"notes_{uuid.uuid4().hex[:10]}"
    direct(
        gateway,
        f"CREATE TABLE {name} (id int PRIMARY KEY, body text);"
        f" INSERT INTO {name} VALUES (1, 'note 1'), (2, 'note 2')",
    )
    yield name
    direct(gateway, f"DROP TABLE {name}")


COPIES = [
    "UPDATE {t} SET body = c.email FROM customers c WHERE c.id = {t}.id RETURNING body",
    "UPDATE {t} SET body = (SELECT upper(ssn) FROM customers WHERE id = 1) WHERE id = 1"
    " RETURNING body",
    "INSERT INTO {t} (id, body) SELECT id + 100, ssn FROM customers RETURNING body",
    "INSERT INTO {t} SELECT id + 100, c::text FROM customers c RETURNING *",
    "INSERT INTO {t} (id, body) VALUES (1, 'x')"
    " ON CONFLICT (id) DO UPDATE SET body = (SELECT email FROM customers LIMIT 1) RETURNING body",
    "MERGE INTO {t} n USING customers c ON n.id = c.id"
    " WHEN MATCHED THEN UPDATE SET body = c.card_number",
    "WITH u AS (UPDATE {t} SET body = c.phone FROM customers c WHERE c.id = {t}.id"
    " RETURNING body) SELECT body FROM u",
]


@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("role", ROLES)
def test_a_copy_of_a_classified_value_is_held_and_cannot_be_read_back(
    gateway: RunningGateway, notes: str, role: str, copy: str
) -> None:
    text = copy.format(t=notes)
    before = direct(gateway, f"SELECT id, body FROM {notes} ORDER BY id")
    with connect(gateway.dsn(token_for(gateway, role))) as conn:
        with pytest.raises(psycopg.Error) as exc:
            simple(conn, text)
        refusal = refusal_of(exc.value)
        # Engineers: an admin approves the copy first; ai-agents: the source is an oracle.
        assert_policy_refusal(refusal, approval=role == "engineers")
        if role == "engineers":
            assert "may not copy classified column public.customers." in refusal.message
        assert_no_customer_secret(refusal)
        # Nothing was copied: a later SELECT of the unclassified column shows no secret.
        rows = simple(conn, f"SELECT id, body FROM {notes} ORDER BY id")
        assert rows == before
        assert_no_customer_secret(rows)
    assert direct(gateway, f"SELECT id, body FROM {notes} ORDER BY id") == before


@pytest.mark.parametrize("role", ROLES)
def test_copying_within_customers_is_held_too(gateway: RunningGateway, role: str) -> None:
    """UPDATE customers SET name = email RETURNING name: name is not classified, email is."""
    with connect(gateway.dsn(token_for(gateway, role))) as conn:
        with pytest.raises(psycopg.Error) as exc:
            simple(conn, "UPDATE customers SET name = email WHERE id = 1 RETURNING name")
        assert_policy_refusal(refusal_of(exc.value), approval=role == "engineers")
    assert direct(gateway, "SELECT name FROM customers WHERE id = 1") == [("Ada",)]


def test_an_admins_copy_runs_with_its_returning_masked(gateway: RunningGateway, notes: str) -> None:
    with connect(gateway.dsn(token_for(gateway, "admins"))) as conn:
        rows = simple(
            conn,
            f"UPDATE {notes} SET body = c.email FROM customers c WHERE c.id = {notes}.id"
            f" RETURNING {notes}.id, body",
        )
    assert sorted(r[0] for r in rows) == [1, 2]
    assert_no_customer_secret(rows)
    # The premise: the copy happened.
    assert direct(gateway, f"SELECT body FROM {notes} WHERE id = 1") == [("ada@example.com",)]


def test_pii_readers_copy_freely(gateway: RunningGateway, notes: str) -> None:
    with connect(gateway.dsn(token_for(gateway, "engineers", "pii-readers"))) as conn:
        rows = simple(
            conn,
            f"UPDATE {notes} SET body = c.email FROM customers c WHERE c.id = 1 AND {notes}.id = 1"
            " RETURNING body",
        )
    assert rows == [("ada@example.com",)]
