# ruff: noqa: S608 - table and schema names are the test's own; literals are what is tested
"""Statements shared by shape through the real gateway: simple-protocol texts that differ only
in literals share one analysis and one decision across sessions, the trail keeps each exact
text, and a statement whose literals matter is decided on its own."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.harness import RunningGateway

from . import connect, direct, fresh_table, simple, token_for
from .test_audit_support import last_pos, records_after, wait_for

pytestmark = pytest.mark.server


def _requests(gateway: RunningGateway, pos: int, count: int, naming: str) -> list[dict[str, Any]]:
    """The first `count` request records after `pos` whose text names `naming`, once the
    index holds them (other sessions' records, e.g. a driver's own statements, do not count)."""

    def ready() -> list[dict[str, Any]] | None:
        found = [
            rec
            for r in records_after(gateway.settings, pos)
            if r.kind == "request" and naming in (rec := r.record())["text"]
        ]
        return found if len(found) >= count else None

    return wait_for(ready)


def test_texts_differing_in_literals_share_a_decision_across_sessions(
    gateway: RunningGateway,
) -> None:
    table = fresh_table(gateway, "shape", rows=5)
    dsn = gateway.dsn(token_for(gateway, "engineers"))
    pos = last_pos(gateway.settings)
    texts = [f"SELECT v FROM {table} WHERE id = {i}" for i in (1, 2, 3)]
    with connect(dsn) as first:
        assert simple(first, texts[0]) == [("v1",)]
    with connect(dsn) as second:
        assert simple(second, texts[1]) == [("v2",)]
        assert simple(second, texts[2]) == [("v3",)]
    records = _requests(gateway, pos, 3, table)
    # Each record holds its own exact text; the decision of the first serves the others.
    assert [r["text"] for r in records] == texts
    assert [r["decision"]["cache_hit"] for r in records] == [False, True, True]
    assert len({r["decision"]["decision_id"] for r in records}) == 1
    assert len({r["session_id"] for r in records}) == 2


@pytest.mark.parametrize(
    ("allowed", "refused", "why"),
    [
        # has_where: a constant-true WHERE is no WHERE (engineers need approval).
        ("DELETE FROM {t} WHERE 1 = 2", "DELETE FROM {t} WHERE 1 = 1", "approval required"),
        ("DELETE FROM {t} WHERE id = 9 AND 'f'", "DELETE FROM {t} WHERE id = 9 OR 't'",
         "approval required"),
        # Changing identity through set_config: the setting's name is a literal.
        ("SELECT set_config('application_name', 'x', false)",
         "SELECT set_config('role', 'postgres', false)", "statement denied"),
        # The same inside a query whose other literals do not matter: no shape plan either.
        ("SELECT v FROM {t} WHERE id = 1 AND set_config('application_name', 'x', false) <> ''",
         "SELECT v FROM {t} WHERE id = 1 AND set_config('role', 'postgres', false) <> ''",
         "statement denied"),
    ],
)  # fmt: skip
def test_a_statement_whose_literals_matter_is_never_served_another_ones_decision(
    gateway: RunningGateway, allowed: str, refused: str, why: str
) -> None:
    table = fresh_table(gateway, "lit", rows=3)
    dsn = gateway.dsn(token_for(gateway, "engineers"))
    with connect(dsn) as conn:
        for _ in range(3):  # then from the caches, or on the plan of its shape (a Query)
            simple(conn, allowed.format(t=table))
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
            simple(conn, refused.format(t=table))
        assert why in str(exc.value)
        assert simple(conn, "SELECT 1") == [(1,)]


def test_a_shared_shape_is_resolved_and_decided_under_each_sessions_search_path(
    gateway: RunningGateway,
) -> None:
    """One shape, two search_paths: `customers` is public.customers (email masked for
    ai-agents) in one session and an unclassified table in the other; whichever session's
    decision came first, the other's rows follow its own path."""
    schema = "plans_shadow"
    direct(gateway, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    direct(gateway, f"CREATE SCHEMA {schema}")
    direct(gateway, f"CREATE TABLE {schema}.customers (id int, email text)")
    direct(gateway, f"INSERT INTO {schema}.customers VALUES (1, 'one@shadow'), (2, 'two@shadow')")
    dsn = gateway.dsn(token_for(gateway, "ai-agents"))
    try:
        with connect(dsn) as shadowed, connect(dsn) as plain:
            simple(shadowed, f"SET search_path = {schema}")
            for i in (1, 2):
                assert simple(shadowed, f"SELECT email FROM customers WHERE id = {i}") == [
                    (f"{'one' if i == 1 else 'two'}@shadow",)
                ]
                rows = simple(plain, f"SELECT email FROM customers WHERE id = {i}")
                assert rows and all(
                    secret not in repr(rows) for secret in ("ada@example.com", "grace@example.org")
                ), rows
    finally:
        direct(gateway, f"DROP SCHEMA {schema} CASCADE")
