# ruff: noqa: S608 - schema names are the test's own
"""Names are resolved under the search_path the server uses, however it moved.

A schema `rt_shadow` holds an unclassified table called customers. If pgwarden believed the
session's path led there while the server's led to public.customers, an ai-agents client
would read real e-mail addresses unmasked. Through the real gateway, OPA and PostgreSQL:
prepared statements re-planned under a new path, ROLLBACK and SET LOCAL undoing a SET,
set_config(), startup options, and a SET followed by statements in the same message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.harness import RunningGateway

from . import connect, direct, refusal_of, simple, token_for

pytestmark = pytest.mark.server

SECRETS = ("ada@example.com", "grace@example.org")
SHADOW = "shadow@example.net"
QUERY = "SELECT email FROM customers"


@pytest.fixture(scope="module")
def shadow(gateway: RunningGateway) -> Iterator[None]:
    direct(gateway, "DROP SCHEMA IF EXISTS rt_shadow CASCADE")
    direct(gateway, "CREATE SCHEMA rt_shadow")
    direct(gateway, "CREATE TABLE rt_shadow.customers (id int, email text)")
    direct(gateway, f"INSERT INTO rt_shadow.customers VALUES (1, '{SHADOW}')")
    try:
        yield
    finally:
        direct(gateway, "DROP SCHEMA rt_shadow CASCADE")


@pytest.fixture
def agent(gateway: RunningGateway, shadow: None) -> Iterator[psycopg.Connection[TupleRow]]:
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        yield conn


def assert_masked(rows: Any) -> None:
    text = repr(rows)
    assert rows, "no rows"
    for secret in SECRETS:
        assert secret not in text, text


def test_prepared_statement_replanned_under_a_new_path_is_judged_again(
    agent: psycopg.Connection[TupleRow],
) -> None:
    simple(agent, "SET search_path = rt_shadow")
    # Parsed (and decided) under rt_shadow: the unclassified table, nothing to mask.
    assert agent.execute(QUERY, prepare=True).fetchall() == [(SHADOW,)]
    simple(agent, "SET search_path = public")
    # Its estimate under public, from a run of its own: inside the client's pipeline (Bind
    # sent, no Sync yet) pgwarden cannot explain it, and an ai-agent's read without an
    # estimate asks approval (gateway/guards/estimate.py).
    assert_masked(agent.execute(QUERY, prepare=False).fetchall())
    # The server plans the same prepared statement under public now.
    for _ in range(2):
        assert_masked(agent.execute(QUERY, prepare=True).fetchall())


def test_rollback_undoes_a_set_and_pgwarden_follows(agent: psycopg.Connection[TupleRow]) -> None:
    simple(agent, "BEGIN")
    simple(agent, "SET search_path = rt_shadow")
    assert simple(agent, QUERY) == [(SHADOW,)]
    simple(agent, "ROLLBACK")
    # The server is back on public.customers.
    assert_masked(simple(agent, QUERY))
    assert_masked(agent.execute(QUERY).fetchall())


def test_set_local_ends_with_its_transaction(agent: psycopg.Connection[TupleRow]) -> None:
    simple(agent, "SET search_path = public")
    simple(agent, "BEGIN")
    simple(agent, "SET LOCAL search_path = rt_shadow")
    assert simple(agent, QUERY) == [(SHADOW,)]
    simple(agent, "COMMIT")
    assert_masked(simple(agent, QUERY))


def test_rollback_to_savepoint_undoes_a_set(agent: psycopg.Connection[TupleRow]) -> None:
    simple(agent, "BEGIN")
    simple(agent, "SAVEPOINT s")
    simple(agent, "SET search_path = rt_shadow")
    assert simple(agent, QUERY) == [(SHADOW,)]
    simple(agent, "ROLLBACK TO SAVEPOINT s")
    assert_masked(simple(agent, QUERY))
    simple(agent, "COMMIT")


def test_set_config_is_followed(agent: psycopg.Connection[TupleRow]) -> None:
    simple(agent, "SET search_path = rt_shadow")
    simple(agent, "SELECT set_config('search_path', 'public', false)")
    assert_masked(simple(agent, QUERY))
    simple(agent, "SELECT set_config('search_path', 'rt_shadow', false)")
    assert simple(agent, QUERY) == [(SHADOW,)]


def test_a_failed_implicit_transaction_undoes_its_set(agent: psycopg.Connection[TupleRow]) -> None:
    simple(agent, "SET search_path = public")
    with pytest.raises(psycopg.Error) as info:
        # The SET comes last (allowed) but the division fails first: the SET never runs,
        # and pgwarden must not take it as done.
        simple(agent, "SELECT 1/0; SET search_path = rt_shadow")
    assert refusal_of(info.value).sqlstate == "22012"
    assert_masked(simple(agent, QUERY))


def test_statements_after_a_set_in_the_same_message_are_refused(
    gateway: RunningGateway, agent: psycopg.Connection[TupleRow]
) -> None:
    simple(agent, "SET search_path = rt_shadow")
    with pytest.raises(psycopg.Error) as info:
        simple(agent, f"SET search_path = public; {QUERY}")
    refusal = refusal_of(info.value)
    assert refusal.sqlstate == "42501", refusal
    assert "must be the last of its Query message" in refusal.message, refusal
    # Nothing of it ran: the session is still on rt_shadow, and still usable.
    assert simple(agent, QUERY) == [(SHADOW,)]
    assert simple(agent, "SHOW search_path") == [("rt_shadow",)]


def test_startup_option_sets_the_path_pgwarden_starts_from(
    gateway: RunningGateway, shadow: None
) -> None:
    dsn = gateway.dsn(token_for(gateway, "ai-agents"), options="-c search_path=rt_shadow")
    with connect(dsn) as conn:
        assert simple(conn, QUERY) == [(SHADOW,)]
        simple(conn, "RESET search_path")
        # RESET goes to the configured default, not the startup option: public again.
        assert simple(conn, "SHOW search_path") == [('"$user", public',)]
        assert_masked(simple(conn, QUERY))


def test_the_path_check_stays_out_of_the_clients_way(agent: psycopg.Connection[TupleRow]) -> None:
    """pgwarden's own SHOW search_path is never seen by the client: results line up."""
    simple(agent, "SET search_path = public")
    for i in range(5):
        assert simple(agent, f"SELECT {i}") == [(i,)]
        simple(agent, "SET search_path = public")
    cur = agent.execute("SELECT %s::int", (7,))
    assert cur.fetchall() == [(7,)]


def test_an_aborted_transaction_then_rollback(agent: psycopg.Connection[TupleRow]) -> None:
    simple(agent, "SET search_path = public")
    simple(agent, "BEGIN")
    simple(agent, "SET search_path = rt_shadow")
    with pytest.raises(psycopg.Error):
        simple(agent, "SELECT 1/0")
    # Aborted: nothing runs (pgwarden cannot read the path; the server would refuse anyway).
    with pytest.raises(psycopg.Error) as info:
        simple(agent, QUERY)
    assert refusal_of(info.value).sqlstate in ("25P02", "42501")
    simple(agent, "ROLLBACK")
    assert_masked(simple(agent, QUERY))
    assert simple(agent, "SHOW search_path") == [("public",)]
