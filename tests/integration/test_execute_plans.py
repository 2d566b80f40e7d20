# ruff: noqa: S608 - table and schema names are the test's own
"""An Execute of a protocol-prepared statement is relayed on the plan its Parse made (no
decision, no task of its own) only while that plan holds. Through the real gateway, OPA and
PostgreSQL, with psycopg's prepared statements (Parse once, then Bind/Execute alone): after
the search_path moved or the token was revoked, the next execution is decided afresh.
The policy and the catalog conditions are in test_policy_reload.py and
test_policy_ddl_masks.py, next to the fixtures that change them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.harness import RunningGateway

from . import assert_no_customer_secret, connect, direct, fresh_table, simple, token_for

pytestmark = pytest.mark.server

SHADOW = "shadow@example.net"


def planned_executes(gateway: RunningGateway) -> int:
    """Executes the gateway relayed on their Parse-time plan so far, over all targets."""
    context = gateway.gateway.context
    assert context is not None
    return sum(context.metrics.planned_executes.values())


@pytest.fixture(scope="module")
def shadow(gateway: RunningGateway) -> Iterator[None]:
    """rt_plan.customers: a table of the name whose email column is not classified."""
    direct(gateway, "DROP SCHEMA IF EXISTS rt_plan CASCADE")
    direct(gateway, "CREATE SCHEMA rt_plan")
    direct(gateway, "CREATE TABLE rt_plan.customers (id int, email text)")
    direct(gateway, f"INSERT INTO rt_plan.customers VALUES (1, '{SHADOW}')")
    try:
        yield
    finally:
        direct(gateway, "DROP SCHEMA rt_plan CASCADE")


def test_a_planned_execute_is_decided_afresh_once_the_search_path_moved(
    gateway: RunningGateway, shadow: None
) -> None:
    query = "SELECT email FROM customers WHERE id > %s"
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        simple(conn, "SET search_path = rt_plan")
        before = planned_executes(gateway)
        for _ in range(3):
            assert conn.execute(query, (0,), prepare=True).fetchall() == [(SHADOW,)]
        # The executions after the first (Parse) were relayed on the plan.
        assert planned_executes(gateway) >= before + 2
        simple(conn, "SET search_path = public")
        # Its estimate under the new path, from a run of its own: inside the client's
        # pipeline (Bind sent, no Sync yet) pgwarden cannot explain it, and an ai-agent's
        # read without an estimate asks approval (gateway/guards/estimate.py).
        assert conn.execute(query, (0,), prepare=False).fetchall()
        # The same prepared statement, planned by the server under public now: the plan
        # made for rt_plan.customers (nothing to mask) must not serve it.
        for _ in range(2):
            rows = conn.execute(query, (0,), prepare=True).fetchall()
            assert rows, "no rows"
            assert_no_customer_secret(rows)


def test_a_planned_execute_is_refused_once_its_token_is_revoked(gateway: RunningGateway) -> None:
    table = fresh_table(gateway, "plan_revoked")
    token = gateway.token("agent:plan-revoked")
    query = f'SELECT count(*) FROM "{table}" WHERE id > %s'
    with psycopg.connect(gateway.dsn(token), autocommit=True, connect_timeout=10) as conn:
        before = planned_executes(gateway)
        for _ in range(3):
            assert conn.execute(query, (0,), prepare=True).fetchall() == [(3,)]
        assert planned_executes(gateway) >= before + 2
        gateway.revoke(token)
        # Nothing in flight while the gateway learns of it (polled every 0.25 s), so that
        # whatever ends the session, no Execute is answered by the session's end instead.
        time.sleep(1.0)
        planned = planned_executes(gateway)
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute(query, (0,), prepare=True)
        assert "token revoked" in str(info.value)
        assert conn.closed or conn.broken
        assert planned_executes(gateway) == planned


def test_an_agents_query_plan_is_refused_once_its_token_is_revoked(
    gateway: RunningGateway,
) -> None:
    """ai-agents' Queries of one shape and one cost estimate run on the plan the first left,
    until the token is revoked: the next text of the shape is never served it."""
    table = fresh_table(gateway, "qplan_revoked")
    token = gateway.token("agent:qplan-revoked", groups=("ai-agents",))
    shape = f'SELECT count(*) FROM "{table}" WHERE id > {{}}'
    context = gateway.gateway.context
    assert context is not None
    with psycopg.connect(gateway.dsn(token), autocommit=True, connect_timeout=10) as conn:
        before = sum(context.metrics.planned_queries.values())
        for bound in (-1, -2, -3):
            assert simple(conn, shape.format(bound)) == [(3,)]
        assert sum(context.metrics.planned_queries.values()) >= before + 2
        gateway.revoke(token)
        time.sleep(1.0)  # as above: nothing in flight while the gateway learns of it
        planned = sum(context.metrics.planned_queries.values())
        with pytest.raises(psycopg.OperationalError) as info:
            simple(conn, shape.format(-4))
        assert "token revoked" in str(info.value)
        assert conn.closed or conn.broken
        assert sum(context.metrics.planned_queries.values()) == planned


def test_masked_executes_run_on_the_plan_and_stay_masked(gateway: RunningGateway) -> None:
    """A statement whose decision masks columns is relayed on its plan after its first
    Execute (the masks resolved once and kept with it), in text and binary results alike,
    and every execution's rows are masked as the first one's: type-correct values, never
    the cleartext."""
    query = "SELECT id, email, phone, ssn, card_number FROM customers WHERE id > %s"
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        for binary in (False, True):
            before = planned_executes(gateway)
            seen: list[list[tuple[object, ...]]] = []
            with conn.cursor(binary=binary) as cur:
                for _ in range(4):
                    cur.execute(query, (0,), prepare=True)
                    seen.append(cur.fetchall())
            assert planned_executes(gateway) >= before + 3, binary
            assert seen[0], "no rows came back"
            assert all(rows == seen[0] for rows in seen), seen
            assert_no_customer_secret(seen)
            for _, email, phone, ssn, card in seen[0]:
                assert isinstance(email, str) and "***@" in email
                assert isinstance(phone, str) and phone.startswith("*")
                assert ssn == "***"
                assert isinstance(card, str) and len(card) == 32
