# ruff: noqa: S608  (the property test builds statements from SQL fragments of its own)
"""LATERAL in any FROM-clause shape: an ai-agents client never sees a classified value.

Through the real gateway, real OPA and real PostgreSQL, with psycopg. A LATERAL item written
with JOIN syntax (`CROSS JOIN LATERAL`, `JOIN LATERAL ... ON`, `LEFT JOIN LATERAL`), nested
in joins, as `ROWS FROM`, `XMLTABLE`, or beside `TABLESAMPLE` reads the items on its left
exactly as the comma form does: what it shows is masked, what it computes or compares is
refused. A property test draws FROM-clause shapes and checks both on every one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import TupleRow

from tests.harness import RunningGateway

from . import (
    ALL_CUSTOMER_SECRETS,
    CUSTOMER_SECRETS,
    REFUSED,
    assert_no_customer_secret,
    assert_policy_refusal,
    connect,
    direct,
    refusal_of,
    simple,
    token_for,
)

pytestmark = pytest.mark.server

SECRETS = CUSTOMER_SECRETS
ALL_SECRETS = ALL_CUSTOMER_SECRETS


@pytest.fixture
def agent(gateway: RunningGateway) -> Iterator[psycopg.Connection[TupleRow]]:
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        yield conn


def refused_or_rows(conn: psycopg.Connection[TupleRow], text: str) -> tuple[Any, list[Any]]:
    """(the refusal or None, the rows): whatever the client is given, nothing else."""
    try:
        return None, simple(conn, text)
    except psycopg.Error as exc:
        return refusal_of(exc), []


# Each statement leaked the cleartext (or answered a question about it) to ai-agents before
# the right side of a JOIN saw its left side.
LEAKS = [
    "SELECT l.v FROM customers c CROSS JOIN LATERAL unnest(ARRAY[c.email]) l(v)",
    "SELECT l.v FROM customers c LEFT JOIN LATERAL unnest(ARRAY[c.ssn]) l(v) ON true",
    "SELECT l.v FROM customers c JOIN LATERAL (SELECT lower(c.email) AS v) l ON true",
    "SELECT l.v FROM customers c CROSS JOIN LATERAL (SELECT ARRAY[c.card_number] AS v) l",
    "SELECT l.v FROM customers c CROSS JOIN LATERAL (SELECT c::text AS v) l",
    "SELECT l.v FROM customers c CROSS JOIN LATERAL ROWS FROM (unnest(ARRAY[c.phone])) l(v)",
    "SELECT l.v FROM customers c CROSS JOIN LATERAL"
    " regexp_split_to_table(c.email || ',' || c.ssn, ',') l(v)",
    "SELECT l.v FROM customers c TABLESAMPLE bernoulli (100)"
    " CROSS JOIN LATERAL jsonb_array_elements_text(jsonb_build_array(c.email)) l(v)",
    "SELECT l.v FROM customers c CROSS JOIN LATERAL"
    " XMLTABLE('/x' PASSING xmlelement(name x, c.email) COLUMNS v text PATH '.') l",
    "SELECT l.v FROM orders o JOIN (customers c CROSS JOIN LATERAL"
    " (SELECT c.email || '' AS v) l) ON o.customer_id = c.id",
]

ORACLES = [
    # Which rows come back answers the question.
    "SELECT c.id FROM customers c JOIN LATERAL (SELECT c.email AS v) l ON l.v LIKE 'ada%'",
    "SELECT c.id FROM customers c LEFT JOIN LATERAL (SELECT c.email AS v) l ON true"
    " WHERE l.v LIKE 'ada%'",
    "SELECT c.id FROM customers c CROSS JOIN LATERAL (SELECT c.ssn AS v) l ORDER BY l.v",
    "SELECT count(*) FROM customers c CROSS JOIN LATERAL (SELECT c.email AS v) l"
    " GROUP BY c.id HAVING max(l.v) > 'b'",
    # As many rows as the first character's code.
    "SELECT count(*) FROM customers c CROSS JOIN LATERAL"
    " (SELECT 1 FROM generate_series(1, 300) LIMIT ascii(c.email)) l",
]


@pytest.mark.parametrize("text", LEAKS)
def test_a_lateral_join_relays_no_classified_value(
    gateway: RunningGateway, agent: psycopg.Connection[TupleRow], text: str
) -> None:
    assert any(s in repr(direct(gateway, text)) for s in ALL_SECRETS)  # the premise
    refusal, rows = refused_or_rows(agent, text)
    assert_no_customer_secret(rows)
    if refusal is not None:
        assert_policy_refusal(refusal)
        assert_no_customer_secret(refusal)
    assert simple(agent, "SELECT 1") == [(1,)]


@pytest.mark.parametrize("text", ORACLES)
def test_a_question_over_a_lateral_alias_is_refused(
    gateway: RunningGateway, agent: psycopg.Connection[TupleRow], text: str
) -> None:
    assert direct(gateway, text) is not None  # the premise: it runs
    with pytest.raises(psycopg.Error) as exc:
        simple(agent, text)
    assert_policy_refusal(refusal_of(exc.value), reason="public.customers.")


def test_a_lateral_subselect_that_only_shows_a_column_is_masked(
    agent: psycopg.Connection[TupleRow],
) -> None:
    rows = simple(
        agent,
        "SELECT c.id, l.v FROM customers c JOIN LATERAL (SELECT c.email AS v) l ON true"
        " ORDER BY c.id",
    )
    assert [r[0] for r in rows] == [1, 2]
    assert all(r[1] is None or r[1] not in SECRETS["email"] for r in rows), rows
    assert_no_customer_secret(rows)


# -- property: any FROM-clause shape ------------------------------------------------------

# The relation the lateral item reads from, always reachable as `c`.
LEFT_SIDES = [
    "customers c",
    "customers c TABLESAMPLE bernoulli (100)",
    "(SELECT * FROM customers) c",
    "orders o JOIN customers c ON o.customer_id = c.id",
    "customers c LEFT JOIN orders o ON o.customer_id = c.id",
]
# (template, passes the value through unchanged): the item reaching c.{col} as l.v.
REACHES = [
    ("(SELECT c.{col} AS v) l", True),
    ("(SELECT v FROM (SELECT c.{col} AS v) s) l", True),
    ("(SELECT lower(c.{col}) AS v) l", False),
    ("(SELECT c.{col} || '' AS v) l", False),
    ("(SELECT string_agg(x, ',') AS v FROM unnest(ARRAY[c.{col}]) x) l", False),
    ("(SELECT c::text AS v) l", False),
    ("(SELECT x AS v FROM unnest(ARRAY[c.{col}]) x) l", False),
    ("unnest(ARRAY[c.{col}]) l(v)", False),
    ("ROWS FROM (unnest(ARRAY[c.{col}])) l(v)", False),
    ("regexp_split_to_table(c.{col}, ';') l(v)", False),
    ("jsonb_array_elements_text(jsonb_build_array(c.{col})) l(v)", False),
    ("XMLTABLE('/x' PASSING xmlelement(name x, c.{col}) COLUMNS v text PATH '.') l", False),
]
# How the lateral item joins: the comma form and every JOIN spelling PostgreSQL allows.
CONNECTORS = [
    ", LATERAL {reach}",
    " CROSS JOIN LATERAL {reach}",
    " JOIN LATERAL {reach} ON true",
    " INNER JOIN LATERAL {reach} ON true",
    " LEFT JOIN LATERAL {reach} ON true",
    " LEFT JOIN LATERAL {reach} ON l.v IS NOT NULL",
]
# (wrapper, where the item ends up): nested inside another join, or with joins after it.
WRAPPERS = [
    "{inner}",
    "orders o2 JOIN ({inner}) ON o2.customer_id = c.id",
    "{inner} CROSS JOIN LATERAL (SELECT l.v AS w) l2",
    "{inner} JOIN orders o3 ON o3.id = 1",
]
# (clause, uses the value other than by showing it)
CLAUSES = [
    ("", False),
    ("WHERE {shown} LIKE '%'", True),
    ("ORDER BY {shown}", True),
    ("GROUP BY {shown}", True),
    ("GROUP BY {shown} HAVING max({shown}) > ''", True),
]


@st.composite
def from_shapes(draw: st.DrawFn) -> tuple[str, str, bool]:
    """(statement, classified column, whether only a masked pass-through is acceptable)."""
    col = draw(st.sampled_from(sorted(SECRETS)))
    left = draw(st.sampled_from(LEFT_SIDES))
    reach, passes = draw(st.sampled_from(REACHES))
    connector = draw(st.sampled_from(CONNECTORS))
    wrapper = draw(st.sampled_from(WRAPPERS))
    clause, compares = draw(st.sampled_from(CLAUSES))
    if connector.startswith(",") and "({inner})" in wrapper:
        connector = " CROSS JOIN LATERAL {reach}"  # a comma list cannot stand in parentheses
    inner = left + connector.format(reach=reach.format(col=col))
    from_clause = wrapper.format(inner=inner)
    shown = "l2.w" if "l2" in wrapper else "l.v"
    text = f"SELECT {shown} FROM {from_clause} {clause.format(shown=shown)}".strip()
    only_shown = passes and not compares and "ON l.v" not in connector
    return text, col, only_shown


@settings(
    max_examples=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(shape=from_shapes())
def test_no_from_clause_shape_relays_a_classified_value_to_ai_agents(
    gateway: RunningGateway, shape: tuple[str, str, bool]
) -> None:
    text, col, only_shown = shape
    # The premise: the statement runs and, straight to the database, shows the cleartext.
    assert any(s in repr(direct(gateway, text)) for s in SECRETS[col]), text
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        refusal, rows = refused_or_rows(conn, text)
        assert_no_customer_secret(rows)
        if refusal is not None:
            assert refusal.sqlstate == REFUSED, (text, refusal)
            assert_no_customer_secret(refusal)
        else:
            # Only a column shown as it is may pass (masked): anything computed or compared
            # on it answers a question about the value.
            assert only_shown, (text, rows)
            assert rows, text
        assert simple(conn, "SELECT 1") == [(1,)]
