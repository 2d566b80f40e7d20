# ruff: noqa: S608  (tests build SQL around view names of their own)
"""Views do not launder classified columns: an ai-agents token through the real gateway.

Views, nested views and materialized views over customers are created directly (as the
superuser, as an admin would); reading them through the gateway must be masked like
reading customers, and a predicate on a classified view column is an oracle like one on
customers. A view over orders alone is unaffected. A user-defined function that reads
customers waits for approval.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.harness import RunningGateway

from . import assert_policy_refusal, connect, direct, refusal_of, simple, token_for

pytestmark = pytest.mark.server

EMAILS = {"ada@example.com", "grace@example.org"}
SSNS = {"123-45-6789", "987-65-4321"}
ORACLE = "ai-agents may not use classified column public.customers.email outside the output list"
OPAQUE = "ai-agents may not call functions the policy cannot see into without approval"


@pytest.fixture
def names(gateway: RunningGateway) -> Iterator[dict[str, str]]:
    """Fresh views of our own: a unique suffix keeps the gateway's catalog cache honest."""
    tag = uuid.uuid4().hex[:8]
    made = {
        "v": f"pv_v_{tag}",
        "nested": f"pv_nested_{tag}",
        "deep": f"pv_deep_{tag}",
        "mv": f"pv_mv_{tag}",
        "row": f"pv_row_{tag}",
        "orders": f"pv_orders_{tag}",
        "fn": f"pv_fn_{tag}",
        "fnview": f"pv_fnview_{tag}",
    }
    direct(
        gateway,
        f"""
        CREATE VIEW {made["v"]} AS SELECT id, email, ssn FROM customers;
        CREATE VIEW {made["nested"]} AS SELECT email AS contact, id FROM {made["v"]};
        CREATE VIEW {made["deep"]} AS SELECT upper(contact) AS loud FROM {made["nested"]};
        CREATE MATERIALIZED VIEW {made["mv"]} AS
            SELECT c.id, c.email, o.amount FROM customers c JOIN orders o ON o.customer_id = c.id;
        CREATE VIEW {made["row"]} AS SELECT id, row_to_json(c) AS j FROM customers c;
        CREATE VIEW {made["orders"]} AS SELECT id, customer_id, amount FROM orders;
        CREATE FUNCTION {made["fn"]}() RETURNS SETOF text LANGUAGE sql
            AS 'SELECT email FROM customers';
        CREATE VIEW {made["fnview"]} AS SELECT e FROM {made["fn"]}() AS e;
        """,
    )
    yield made
    direct(
        gateway,
        f"""
        DROP VIEW IF EXISTS {made["fnview"]};
        DROP FUNCTION IF EXISTS {made["fn"]}();
        DROP VIEW IF EXISTS {made["orders"]}, {made["row"]}, {made["deep"]}, {made["nested"]},
            {made["v"]};
        DROP MATERIALIZED VIEW IF EXISTS {made["mv"]};
        """,
    )


@pytest.fixture
def agent(gateway: RunningGateway) -> Iterator[psycopg.Connection[TupleRow]]:
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        yield conn


def values(rows: list[tuple[Any, ...]]) -> set[str]:
    return {str(v) for row in rows for v in row if v is not None}


def assert_no_cleartext(rows: list[tuple[Any, ...]], secrets: set[str] = EMAILS) -> None:
    assert rows, "the view must return rows (masked, not filtered)"
    shown = values(rows)
    for secret in secrets:
        assert not any(secret in v for v in shown), (secret, rows)
        assert not any(secret.upper() in v for v in shown), (secret, rows)


def test_the_views_hold_cleartext_directly(gateway: RunningGateway, names: dict[str, str]) -> None:
    """The premise: the data is there, and only the gateway hides it."""
    assert values(direct(gateway, f"SELECT email FROM {names['v']}")) == EMAILS
    assert values(direct(gateway, f"SELECT email FROM {names['mv']}")) == EMAILS


def test_a_classified_column_of_a_view_is_masked(
    agent: psycopg.Connection[TupleRow], names: dict[str, str]
) -> None:
    assert_no_cleartext(simple(agent, f"SELECT email FROM {names['v']} ORDER BY id"))
    assert_no_cleartext(simple(agent, f"SELECT ssn FROM {names['v']}"), SSNS)


def test_star_over_a_view_is_masked(
    agent: psycopg.Connection[TupleRow], names: dict[str, str]
) -> None:
    rows = simple(agent, f"SELECT * FROM {names['v']}")
    assert len(rows) == 2
    assert_no_cleartext(rows, EMAILS | SSNS)


def test_extended_protocol_over_a_view_is_masked(
    agent: psycopg.Connection[TupleRow], names: dict[str, str]
) -> None:
    with agent.cursor() as cur:
        cur.execute(f"SELECT email FROM {names['v']} WHERE id = %s", (1,), prepare=True)
        assert_no_cleartext(cur.fetchall(), {"ada@example.com"})


def test_nested_views_are_masked(
    agent: psycopg.Connection[TupleRow], names: dict[str, str]
) -> None:
    assert_no_cleartext(simple(agent, f"SELECT contact FROM {names['nested']}"))
    assert_no_cleartext(simple(agent, f"SELECT loud FROM {names['deep']}"))


def test_a_materialized_view_is_masked(
    agent: psycopg.Connection[TupleRow], names: dict[str, str]
) -> None:
    rows = simple(agent, f"SELECT email, amount FROM {names['mv']}")
    assert len(rows) == 3
    assert_no_cleartext(rows)


def test_a_whole_row_view_is_masked(
    agent: psycopg.Connection[TupleRow], names: dict[str, str]
) -> None:
    assert_no_cleartext(simple(agent, f"SELECT j FROM {names['row']}"), EMAILS | SSNS)


@pytest.mark.parametrize(
    "where",
    [
        "email LIKE 'a%'",
        "contact LIKE 'a%'",
    ],
)
def test_a_predicate_on_a_classified_view_column_is_an_oracle(
    agent: psycopg.Connection[TupleRow], names: dict[str, str], where: str
) -> None:
    view = names["v"] if where.startswith("email") else names["nested"]
    with pytest.raises(psycopg.Error) as info:
        simple(agent, f"SELECT count(*) FROM {view} WHERE {where}")
    assert_policy_refusal(refusal_of(info.value), reason=ORACLE)
    assert simple(agent, "SELECT 1") == [(1,)]  # the session stays usable


def test_a_predicate_on_an_unclassified_view_column_is_allowed(
    agent: psycopg.Connection[TupleRow], names: dict[str, str]
) -> None:
    assert simple(agent, f"SELECT count(*) FROM {names['v']} WHERE id = 1") == [(1,)]
    with pytest.raises(psycopg.Error) as info:
        simple(agent, f"SELECT count(*) FROM {names['mv']} ORDER BY email")
    assert_policy_refusal(refusal_of(info.value), reason="public.customers.email")


def test_a_view_over_orders_only_is_untouched(
    agent: psycopg.Connection[TupleRow], gateway: RunningGateway, names: dict[str, str]
) -> None:
    text = f"SELECT id, customer_id, amount FROM {names['orders']} ORDER BY id"
    rows = simple(agent, text)
    assert rows == direct(gateway, text)
    assert [r[0] for r in rows] == [1, 2, 3]
    assert simple(agent, f"SELECT count(*) FROM {names['orders']} WHERE amount > 8") == [(2,)]


def test_a_user_function_reading_customers_is_refused(
    agent: psycopg.Connection[TupleRow], names: dict[str, str]
) -> None:
    # Its LANGUAGE sql body is read: what it returns is computed from customers.email, an
    # oracle for ai-agents wherever the call stands (denied, as `upper(email)` is).
    for text in (f"SELECT * FROM {names['fn']}()", f"SELECT public.{names['fn']}()"):
        with pytest.raises(psycopg.Error) as info:
            simple(agent, text)
        assert_policy_refusal(refusal_of(info.value), reason="public.customers.email")
    # A view over it hides nothing either: the view's lineage stops at the function, so it
    # waits for approval as opaque code.
    with pytest.raises(psycopg.Error) as info:
        simple(agent, f"SELECT e FROM {names['fnview']}")
    assert_policy_refusal(refusal_of(info.value), approval=True, reason=OPAQUE)
    assert simple(agent, "SELECT lower('A'), now() IS NOT NULL") == [("a", True)]


def test_engineers_see_view_columns_masked_too(
    gateway: RunningGateway, names: dict[str, str]
) -> None:
    with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
        assert_no_cleartext(simple(conn, f"SELECT email FROM {names['v']}"))


def test_pii_readers_see_cleartext_through_views(
    gateway: RunningGateway, names: dict[str, str]
) -> None:
    with connect(gateway.dsn(token_for(gateway, "ai-agents", "pii-readers"))) as conn:
        assert values(simple(conn, f"SELECT email FROM {names['v']}")) == EMAILS
