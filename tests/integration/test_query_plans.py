# ruff: noqa: S608 - table and schema names are the test's own; literals are what is tested
"""Simple-protocol Queries relayed on the plan of their shape (no analysis, no decision of
their own) through the real gateway, OPA and PostgreSQL: texts that differ only in literals,
where no fact or decision depends on a literal's value. Each record keeps its exact text; a
statement whose literals matter, or whose plan's conditions moved (search_path, masks), is
decided on its own. Where the session's inputs carry a cost estimate (ai-agents), a text
is served the plan its shape was decided with under exactly its own estimate, and no other.
The literal kinds of the analysis (constant WHERE, set_config's setting) are in
test_statement_plans.py, the policy reading the text and a policy change in
test_policy_reload.py, DDL in test_policy_ddl_masks.py, a revoked token in
test_execute_plans.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.harness import RunningGateway

from . import assert_no_customer_secret, connect, direct, fresh_table, simple, token_for
from .test_audit_support import last_pos, records_after, wait_for

pytestmark = pytest.mark.server

SHADOW = "plans_query_shadow"
BIG = "plans_query_big"
OVER = "ai-agents may not run reads estimated at more than 100000 rows without approval"


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


@pytest.mark.parametrize("group", ["engineers", "ai-agents"])
def test_texts_of_one_shape_run_on_its_plan_and_keep_their_own_text(
    gateway: RunningGateway, group: str
) -> None:
    """For ai-agents each text is explained (its estimate: one row by the primary key, the
    same for every literal here) and served the plan made with that estimate."""
    table = fresh_table(gateway, "qplan", rows=6)
    pos = last_pos(gateway.settings)
    texts = [f"SELECT v FROM {table} WHERE id = {i}" for i in range(1, 7)]
    with connect(gateway.dsn(token_for(gateway, group))) as conn:
        before = planned_queries(gateway)
        for i, text in enumerate(texts, start=1):
            assert simple(conn, text) == [(f"v{i}",)]
        # The first is decided on the task path; the others of its shape on its plan.
        assert planned_queries(gateway) >= before + 4
    records = _requests(gateway, pos, table, len(texts))
    assert [r["text"] for r in records] == texts
    assert len({r["decision"]["decision_id"] for r in records}) == 1
    assert [r["decision"]["cache_hit"] for r in records][1:] == [True] * (len(texts) - 1)


@pytest.mark.parametrize("group", ["engineers", "ai-agents"])
def test_masked_texts_of_one_shape_run_on_its_plan_and_stay_masked(
    gateway: RunningGateway, group: str
) -> None:
    """Neither engineers nor ai-agents are pii-readers: customers' classified columns are
    masked for them, on the plan as on the full path."""
    with connect(gateway.dsn(token_for(gateway, group))) as conn:
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


@pytest.mark.parametrize("group", ["engineers", "ai-agents"])
@pytest.mark.parametrize(
    "move_path",
    [
        f"SET search_path = {SHADOW}",
        # A literal that names an object (the schema) in a statement of a shape of its own.
        f"SELECT set_config('search_path', '{SHADOW}', false)",
    ],
)
def test_a_plan_made_under_one_search_path_never_serves_another(
    gateway: RunningGateway, shadow: None, move_path: str, group: str
) -> None:
    """The plan made for public.customers (email masked) must not serve the texts of its
    shape once the search_path names an unclassified table of that name, nor the other way
    round."""
    shape = "SELECT email FROM customers WHERE id = {}"
    with connect(gateway.dsn(token_for(gateway, group))) as conn:
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


@pytest.fixture(scope="module")
def big(gateway: RunningGateway) -> Iterator[None]:
    """BIG: 200 000 rows, no index, analysed: a read of most of it is estimated over the
    reference threshold (100 000 rows); one below its smallest value, at one row."""
    direct(gateway, f"DROP TABLE IF EXISTS {BIG}")
    direct(gateway, f"CREATE TABLE {BIG} AS SELECT generate_series(1, 200000) g")
    direct(gateway, f"ANALYZE {BIG}")
    try:
        yield
    finally:
        direct(gateway, f"DROP TABLE {BIG}")


def test_texts_of_one_shape_are_each_decided_with_their_own_estimate(
    gateway: RunningGateway, big: None
) -> None:
    """The policy reads the estimate, and the literals move it: texts of one shape whose
    estimates are equal share the plan decided with it; one estimated over the threshold
    is not served that plan (it asks approval), nor one with a small estimate of its own
    (decided on its own, then kept too)."""
    shape = f"SELECT g FROM {BIG} WHERE g < {{}}"
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        before = planned_queries(gateway)
        for bound in (-5, -6, -7):  # below every value: one row estimated, none returned
            assert simple(conn, shape.format(bound)) == []
        assert planned_queries(gateway) >= before + 2
        planned = planned_queries(gateway)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            simple(conn, shape.format(10_000_000))
        assert info.value.diag.message_primary == f"pgwarden: approval required: {OVER}"
        assert planned_queries(gateway) == planned
        assert simple(conn, shape.format(10)) == [(g,) for g in range(1, 10)]
        assert planned_queries(gateway) == planned
        # Both plans are kept: each serves the texts of its own estimate.
        assert simple(conn, shape.format(-8)) == []
        assert simple(conn, shape.format(10)) == [(g,) for g in range(1, 10)]
        assert planned_queries(gateway) >= planned + 2
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            simple(conn, shape.format(20_000_000))


@pytest.mark.parametrize(
    ("allowed", "refused"),
    [
        ("SELECT set_config('application_name', 'x', false)",
         "SELECT set_config('role', 'postgres', false)"),
        ("SELECT v FROM {t} WHERE id = 1 AND set_config('application_name', 'x', false) <> ''",
         "SELECT v FROM {t} WHERE id = 1 AND set_config('role', 'postgres', false) <> ''"),
    ],
)  # fmt: skip
def test_an_agents_text_whose_literals_matter_is_never_served_another_ones_plan(
    gateway: RunningGateway, allowed: str, refused: str
) -> None:
    """The estimate of both texts is the same (set_config is not run by EXPLAIN): only the
    facts tell them apart, and the literal that changes them keeps the shape off any plan."""
    table = fresh_table(gateway, "qlit", rows=3)
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        for _ in range(3):
            simple(conn, allowed.format(t=table))
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            simple(conn, refused.format(t=table))
        assert "statement denied" in str(info.value)
        assert simple(conn, "SELECT 1") == [(1,)]
