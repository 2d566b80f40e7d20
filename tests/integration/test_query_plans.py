# ruff: noqa: S608 - table and schema names are the test's own; literals are what is tested
"""Simple-protocol Queries relayed on the plan of their shape (no task, no analysis, no
decision of their own) through the real gateway, OPA and PostgreSQL: texts that differ only
in literals, where no fact or decision depends on a literal's value. Each record keeps its
exact text; a statement whose literals matter, or whose plan's conditions moved (search_path,
masks), is decided on its own. The literal kinds of the analysis (constant WHERE,
set_config's setting) are in test_statement_plans.py, the policy reading the text in
test_policy_reload.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import RunningGateway

from . import assert_no_customer_secret, connect, direct, fresh_table, simple, token_for
from .test_audit_support import last_pos, records_after, wait_for

pytestmark = pytest.mark.server

SHADOW = "plans_query_shadow"


def planned_queries(gateway: RunningGateway) -> int:
    """Queries the gateway relayed on the plan of their shape so far, over all targets."""
    context = gateway.gateway.context
    assert context is not None
    return sum(context.metrics.planned_queries.values())


def _requests(gateway: RunningGateway, pos: int, marker: str, count: int) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        found = [
            r.record()
            for r in records_after(gateway.settings, pos)
            if r.kind == "request" and marker in r.record()["text"]
        ]
        return found if len(found) >= count else None

    return wait_for(ready)


def test_texts_of_one_shape_run_on_its_plan_and_keep_their_own_text(
    gateway: RunningGateway,
) -> None:
    table = fresh_table(gateway, "qplan", rows=6)
    pos = last_pos(gateway.settings)
    texts = [f"SELECT v FROM {table} WHERE id = {i}" for i in range(1, 7)]
    with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
        before = planned_queries(gateway)
        for i, text in enumerate(texts, start=1):
            assert simple(conn, text) == [(f"v{i}",)]
        # The first is decided on the task path; the others of its shape on its plan.
        assert planned_queries(gateway) >= before + 4
    records = _requests(gateway, pos, table, len(texts))
    assert [r["text"] for r in records] == texts
    assert len({r["decision"]["decision_id"] for r in records}) == 1
    assert [r["decision"]["cache_hit"] for r in records][1:] == [True] * (len(texts) - 1)


def test_masked_texts_of_one_shape_run_on_its_plan_and_stay_masked(
    gateway: RunningGateway,
) -> None:
    """Engineers are not pii-readers: customers' classified columns are masked for them."""
    with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
        before = planned_queries(gateway)
        seen = [
            simple(
                conn, f"SELECT id, email, phone, ssn, card_number FROM customers WHERE id <> {i}"
            )
            for i in range(100, 105)
        ]
        assert planned_queries(gateway) >= before + 3
    assert seen[0], "no rows came back"
    assert all(rows == seen[0] for rows in seen), seen
    assert_no_customer_secret(seen)
    for _, email, phone, ssn, card in seen[0]:
        assert "***@" in email and phone.startswith("*") and ssn == "***" and len(card) == 32


@pytest.fixture
def shadow(gateway: RunningGateway) -> Any:
    """SHADOW.customers: a table of the name whose email column is not classified."""
    direct(gateway, f"DROP SCHEMA IF EXISTS {SHADOW} CASCADE")
    direct(gateway, f"CREATE SCHEMA {SHADOW}")
    direct(gateway, f"CREATE TABLE {SHADOW}.customers (id int, email text)")
    direct(gateway, f"INSERT INTO {SHADOW}.customers VALUES (1, 'one@shadow'), (2, 'two@shadow')")
    try:
        yield
    finally:
        direct(gateway, f"DROP SCHEMA {SHADOW} CASCADE")


@pytest.mark.parametrize(
    "move_path",
    [
        f"SET search_path = {SHADOW}",
        # A literal that names an object (the schema) in a statement of a shape of its own.
        f"SELECT set_config('search_path', '{SHADOW}', false)",
    ],
)
def test_a_plan_made_under_one_search_path_never_serves_another(
    gateway: RunningGateway, shadow: None, move_path: str
) -> None:
    """The plan made for public.customers (email masked) must not serve the texts of its
    shape once the search_path names an unclassified table of that name, nor the other way
    round."""
    shape = "SELECT email FROM customers WHERE id = {}"
    with connect(gateway.dsn(token_for(gateway, "engineers"))) as conn:
        before = planned_queries(gateway)
        for i in (1, 2, 1):
            rows = simple(conn, shape.format(i))
            assert rows and "***@" in rows[0][0], rows
        assert planned_queries(gateway) >= before + 2
        simple(conn, move_path)
        for i in (1, 2, 1):
            assert simple(conn, shape.format(i)) == [(f"{'one' if i == 1 else 'two'}@shadow",)]
        simple(conn, "SET search_path = public")
        for i in (1, 2):
            rows = simple(conn, shape.format(i))
            assert rows, "no rows"
            assert_no_customer_secret(rows)


def test_texts_whose_cost_estimates_the_policy_reads_are_each_decided(
    gateway: RunningGateway,
) -> None:
    """The session rule has ai-agents' reads explained and the policy reads the estimate:
    it depends on the literals (WHERE id < 10 against WHERE id < 10000000), so no text is
    served the plan of another of its shape; each is explained and decided on its own."""
    table = fresh_table(gateway, "qest", rows=3)
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        before = planned_queries(gateway)
        for i in range(1, 4):
            assert simple(conn, f"SELECT v FROM {table} WHERE id = {i}") == [(f"v{i}",)]
        assert planned_queries(gateway) == before
