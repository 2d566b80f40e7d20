# ruff: noqa: S608  (tests build SQL around role names of their own)
"""Questions about a masked value are refused: an ai-agents token through the real gateway.

A masked column may be shown (masked), never asked about. Each statement below was seen to
tell an ai-agents client something about customers.email although every value it showed
was masked: a NATURAL JOIN compares it, INTERSECT/EXCEPT/UNION/DISTINCT compare it, an
expression over it fails (division by zero) or returns rows (a set-returning function)
depending on it. Credential columns of the system catalogs are masked like classified
columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.harness import RunningGateway

from . import assert_policy_refusal, connect, direct, refusal_of, simple, token_for

pytestmark = pytest.mark.server

SECRETS = ("ada@example.com", "grace@example.org", "123-45-6789", "987-65-4321")
ORACLE = "ai-agents may not use classified column public.customers.email"


@pytest.fixture
def agent(gateway: RunningGateway) -> Iterator[psycopg.Connection[TupleRow]]:
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        yield conn


def assert_refused(conn: psycopg.Connection[TupleRow], text: str, reason: str = ORACLE) -> None:
    with pytest.raises(psycopg.Error) as exc:
        simple(conn, text)
    assert_policy_refusal(refusal_of(exc.value), reason=reason)


def assert_clean(seen: Any) -> None:
    text = repr(seen)
    for secret in SECRETS:
        assert secret not in text, (secret, text[:500])


def test_natural_join_on_a_classified_column_is_an_oracle(
    gateway: RunningGateway, agent: psycopg.Connection[TupleRow]
) -> None:
    probe = "SELECT id FROM customers NATURAL JOIN (SELECT 'ada@example.com'::text AS email) v"
    # The premise: the join answers the question.
    assert direct(gateway, probe) == [(1,)]
    assert_refused(agent, probe, reason=f"{ORACLE} outside the output list (join)")
    assert_refused(
        agent, "SELECT id FROM (SELECT 'ada@example.com'::text AS email) v NATURAL JOIN customers"
    )
    assert_refused(
        agent,
        "SELECT id FROM customers JOIN (SELECT 'ada@example.com'::text AS email) v USING (email)",
    )
    # A NATURAL JOIN that shares only unclassified names is not a question about email.
    assert simple(agent, "SELECT name FROM customers NATURAL JOIN (SELECT 1 AS id) v") == [("Ada",)]


@pytest.mark.parametrize(
    "probe",
    [
        "SELECT email FROM customers INTERSECT SELECT 'ada@example.com'",
        "SELECT 'ada@example.com' EXCEPT SELECT email FROM customers",
        "SELECT email FROM customers UNION SELECT 'ada@example.com'",
        "SELECT DISTINCT email FROM customers",
        "SELECT DISTINCT ON (email) id FROM customers",
    ],
)
def test_set_operations_and_distinct_compare_classified_values(
    gateway: RunningGateway, agent: psycopg.Connection[TupleRow], probe: str
) -> None:
    assert direct(gateway, probe) is not None
    with pytest.raises(psycopg.Error) as exc:
        simple(agent, probe)
    refusal = refusal_of(exc.value)
    assert_policy_refusal(refusal, reason=ORACLE)
    assert "(group)" in refusal.message, refusal


def test_union_all_only_shows_masked_values(agent: psycopg.Connection[TupleRow]) -> None:
    rows = simple(agent, "SELECT email FROM customers UNION ALL SELECT 'x'")
    assert len(rows) == 3
    assert_clean(rows)


@pytest.mark.parametrize(
    "probe",
    [
        # 22012 only when the address starts with 'a': one bit per query.
        "SELECT 1/(ascii(email)-97) FROM customers",
        # As many rows as the character code.
        "SELECT x FROM customers, LATERAL generate_series(1, ascii(email)) x",
        "SELECT count(*) FROM customers, LATERAL generate_series(1, ascii(email)) x",
        # One row per character.
        "SELECT regexp_split_to_table(email, '') FROM customers",
        "SELECT length(email) FROM customers",
        "SELECT email::int FROM customers",
        "SELECT CASE WHEN email LIKE 'a%' THEN 1/0 END FROM customers",
        "SELECT x FROM (SELECT ascii(email) AS x FROM customers) s",
        "SELECT upper(x) FROM (SELECT email AS x FROM customers) s",
        "SELECT count(email) FROM customers",
        "SELECT ascii((SELECT email FROM customers LIMIT 1))",
        "SELECT row_to_json(c)::text FROM customers c",
    ],
)
def test_classified_columns_inside_expressions_are_oracles(
    agent: psycopg.Connection[TupleRow], probe: str
) -> None:
    assert_refused(agent, probe, reason=f"{ORACLE} outside the output list (expression)")


def test_division_by_zero_no_longer_reaches_the_client(
    gateway: RunningGateway, agent: psycopg.Connection[TupleRow]
) -> None:
    probe = "SELECT 1/(ascii(email)-97) FROM customers"
    with pytest.raises(psycopg.Error) as direct_exc:
        direct(gateway, probe)
    assert direct_exc.value.diag.sqlstate == "22012"  # the premise
    with pytest.raises(psycopg.Error) as exc:
        simple(agent, probe)
    assert exc.value.diag.sqlstate == "42501"


@pytest.mark.parametrize(
    "query",
    [
        "SELECT email FROM customers ORDER BY id",
        "SELECT * FROM customers ORDER BY id",
        "SELECT c.* FROM customers c ORDER BY id",
        "SELECT c FROM customers c ORDER BY id",
        "SELECT (c).email FROM customers c ORDER BY id",
        "SELECT e FROM (SELECT email AS e, id FROM customers) s ORDER BY id",
    ],
)
def test_bare_classified_columns_are_still_shown_masked(
    agent: psycopg.Connection[TupleRow], query: str
) -> None:
    rows = simple(agent, query)
    assert len(rows) == 2, query
    assert_clean(rows)


def test_credentials_in_the_system_catalogs_are_masked(
    gateway: RunningGateway, agent: psycopg.Connection[TupleRow]
) -> None:
    role = "pgw_oracle_cred"
    direct(
        gateway,
        f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'hunter2-secret'",
    )
    try:
        hashes = direct(gateway, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")
        assert str(hashes[0][0]).startswith(("SCRAM-SHA-256$", "md5"))  # the premise
        secret = str(hashes[0][0])
        for query in (
            f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'",
            f"SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = '{role}'",
            f"SELECT * FROM pg_authid WHERE rolname = '{role}'",
            f"SELECT passwd FROM pg_shadow WHERE usename = '{role}'",
        ):
            rows = simple(agent, query)
            assert rows, query
            assert secret not in repr(rows), (query, rows)
            assert "SCRAM-SHA-256$" not in repr(rows), (query, rows)
        # Masked, not hidden: the row is there, the value is the redaction.
        shown = simple(agent, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")
        assert shown[0][0] is not None and "hunter2" not in shown[0][0], shown
        assert_refused(
            agent,
            f"SELECT rolname FROM pg_authid WHERE rolpassword LIKE 'SCRAM%' AND rolname = '{role}'",
            reason="pg_catalog.pg_authid.rolpassword",
        )
        assert_refused(
            agent,
            f"SELECT usename FROM pg_shadow WHERE length(passwd) > 0 AND usename = '{role}'",
            reason="pg_catalog.pg_shadow.passwd",
        )
    finally:
        direct(gateway, f"DROP ROLE IF EXISTS {role}")


def test_user_mapping_options_are_masked(
    gateway: RunningGateway, agent: psycopg.Connection[TupleRow]
) -> None:
    direct(
        gateway,
        "CREATE FOREIGN DATA WRAPPER pgw_oracle_fdw;"
        " CREATE SERVER pgw_oracle_srv FOREIGN DATA WRAPPER pgw_oracle_fdw;"
        " CREATE USER MAPPING FOR PUBLIC SERVER pgw_oracle_srv"
        " OPTIONS (user 'remote', password 'mapping-secret')",
    )
    try:
        assert "mapping-secret" in repr(
            direct(gateway, "SELECT umoptions FROM pg_user_mappings")
        )  # the premise
        for query in (
            "SELECT umoptions FROM pg_user_mappings WHERE srvname = 'pgw_oracle_srv'",
            "SELECT * FROM pg_user_mappings WHERE srvname = 'pgw_oracle_srv'",
            "SELECT umoptions FROM pg_user_mapping",
        ):
            rows = simple(agent, query)
            assert rows, query
            assert "mapping-secret" not in repr(rows), (query, rows)
        shown = simple(
            agent, "SELECT umoptions FROM pg_user_mappings WHERE srvname = 'pgw_oracle_srv'"
        )
        assert shown == [(None,)], shown
    finally:
        direct(
            gateway,
            "DROP SERVER IF EXISTS pgw_oracle_srv CASCADE;"
            " DROP FOREIGN DATA WRAPPER IF EXISTS pgw_oracle_fdw",
        )


def test_expressions_through_views(
    gateway: RunningGateway, agent: psycopg.Connection[TupleRow]
) -> None:
    """An expression written into a view by its owner is read like a column (masked, as
    pgwarden reads through the view); an expression the agent writes over a view column that
    comes from a classified column is an oracle like one over the column itself."""
    direct(
        gateway,
        "CREATE VIEW pgw_oracle_v AS SELECT id, email AS contact FROM customers;"
        " CREATE VIEW pgw_oracle_loud AS SELECT id, upper(email) AS loud FROM customers",
    )
    try:
        rows = simple(agent, "SELECT loud FROM pgw_oracle_loud ORDER BY id")
        assert len(rows) == 2
        assert not any(s.upper() in repr(rows) for s in SECRETS), rows
        rows = simple(agent, "SELECT contact FROM pgw_oracle_v ORDER BY id")
        assert len(rows) == 2
        assert_clean(rows)
        assert simple(agent, "SELECT count(*) FROM pgw_oracle_v WHERE id + 1 = 2") == [(1,)]
        for probe in (
            "SELECT length(contact) FROM pgw_oracle_v",
            "SELECT 1/(ascii(loud)-65) FROM pgw_oracle_loud",
            "SELECT x FROM pgw_oracle_v, LATERAL generate_series(1, ascii(contact)) x",
        ):
            assert_refused(agent, probe, reason=f"{ORACLE} outside the output list (expression)")
    finally:
        direct(gateway, "DROP VIEW IF EXISTS pgw_oracle_v, pgw_oracle_loud")
