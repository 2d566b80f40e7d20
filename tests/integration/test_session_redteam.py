# ruff: noqa: S608 - schema names are the test's own
"""Red-team of the session layer: portals and prepared statements whose server-side identity
differs from what pgwarden believes, through the real gateway, OPA and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from gateway.protocol import Bind, Close, DataRow, Describe, Execute, Flush, Parse, Query, Sync
from tests.harness import RunningGateway

from . import RawClient, direct, errors_in, run_sql, token_for

pytestmark = pytest.mark.server

SECRETS = (b"ada@example.com", b"grace@example.org")


def rows_of(reply: list[tuple[str, bytes]]) -> list[tuple[bytes | None, ...]]:
    return [DataRow.decode(body).values for code, body in reply if code == "D"]


def assert_clean(reply: list[tuple[str, bytes]]) -> None:
    text = repr(rows_of(reply))
    for secret in SECRETS:
        assert secret.decode() not in text, reply


def test_portal_of_a_replaced_unnamed_statement(gateway: RunningGateway) -> None:
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        client.send(
            Parse("", b"SELECT email FROM customers"),
            Bind("", ""),
            Parse("", b"SELECT 'x'::text"),
            Execute(""),
            Sync(),
        )
        reply = client.until_ready()
    finally:
        client.close()
    assert_clean(reply)


def test_portal_of_a_closed_and_reparsed_statement(gateway: RunningGateway) -> None:
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        client.send(
            Parse("s1", b"SELECT email FROM customers"),
            Bind("p1", "s1"),
            Close("S", "s1"),
            Parse("s1", b"SELECT 'x'::text"),
            Execute("p1"),
            Sync(),
        )
        reply = client.until_ready()
    finally:
        client.close()
    assert_clean(reply)


def test_a_parse_the_server_skipped_does_not_replace_the_statement(gateway: RunningGateway) -> None:
    """After an error the server skips to Sync: a Parse in between never replaced anything."""
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        client.send(Parse("", b"SELECT email FROM customers"), Sync())
        client.until_ready()
        client.send(Bind("", "no_such_statement"), Parse("", b"SELECT 'x'::text"), Sync())
        assert errors_in(client.until_ready())
        client.send(Bind("", ""), Execute(""), Sync())
        reply = client.until_ready()
    finally:
        client.close()
    assert_clean(reply)


def test_a_description_of_the_replacement_does_not_plan_the_old_portal(
    gateway: RunningGateway,
) -> None:
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        client.send(
            Parse("", b"SELECT email, name FROM customers"),
            Bind("", ""),
            Parse("", b"SELECT name, email FROM customers"),
            Describe("S", ""),
            Execute(""),
            Sync(),
        )
        reply = client.until_ready()
    finally:
        client.close()
    assert rows_of(reply), reply
    assert_clean(reply)


@pytest.fixture
def shadow(gateway: RunningGateway) -> Iterator[str]:
    schema = f"rt_red_{uuid.uuid4().hex[:8]}"
    direct(gateway, f"CREATE SCHEMA {schema}")
    # Through the gateway, so that its catalog learns the table (DDL invalidates it).
    run_sql(
        gateway.dsn(token_for(gateway, "admins")),
        f"CREATE TABLE {schema}.customers (id int, email text)",
    )
    direct(gateway, f"INSERT INTO {schema}.customers VALUES (1, 'shadow@example.net')")
    try:
        yield schema
    finally:
        direct(gateway, f"DROP SCHEMA {schema} CASCADE")


def test_a_portal_runs_the_plan_made_at_bind(gateway: RunningGateway, shadow: str) -> None:
    """The server plans at Bind: a named portal bound under public and executed after the
    path moved (same transaction) returns public.customers' rows, masked as decided at its
    Parse under public (as direct, it runs)."""
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        client.send(Query(b"BEGIN"))
        client.until_ready()
        client.send(Parse("s", b"SELECT email FROM customers"), Bind("p", "s"), Sync())
        client.until_ready()
        client.send(Query(f"SET search_path = {shadow}".encode()))
        client.until_ready()
        client.send(Execute("p"), Sync())
        reply = client.until_ready()
    finally:
        client.close()
    assert not errors_in(reply), reply
    assert len(rows_of(reply)) == 2, reply
    assert_clean(reply)


def test_a_portal_bound_while_the_path_was_unknown_is_not_run_under_a_guess(
    gateway: RunningGateway, shadow: str
) -> None:
    """Bound right after set_config() (the path unknown then) and executed after the path
    moved again: pgwarden cannot tell what the server planned it under, so it refuses."""
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        client.send(Query(b"BEGIN"))
        client.until_ready()
        client.send(Parse("s", b"SELECT email FROM customers"), Sync())
        client.until_ready()
        client.send(
            Parse("", b"SELECT set_config('search_path', 'public', false)"),
            Bind("", ""),
            Execute(""),
            Bind("p", "s"),
            Sync(),
        )
        client.until_ready()
        client.send(Query(f"SET search_path = {shadow}".encode()))
        client.until_ready()
        client.send(Execute("p"), Sync())
        reply = client.until_ready()
    finally:
        client.close()
    assert_clean(reply)
    assert "bind it again" in (errors_in(reply)[0].message or ""), reply


def test_a_portal_of_a_sql_prepared_statement_deallocated_since(gateway: RunningGateway) -> None:
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        client.send(Query(b"BEGIN"))
        client.until_ready()
        client.send(Query(b"PREPARE q AS SELECT email FROM customers"))
        client.until_ready()
        client.send(Bind("p", "q"), Sync())
        client.until_ready()
        client.send(Query(b"DEALLOCATE q"))
        client.until_ready()
        client.send(Query(b"PREPARE q AS SELECT 'x'::text"))
        client.until_ready()
        client.send(Execute("p"), Sync())
        reply = client.until_ready()
    finally:
        client.close()
    assert_clean(reply)


def test_a_set_query_pipelined_before_a_parse_is_applied_first(
    gateway: RunningGateway, shadow: str
) -> None:
    """pgwarden's SHOW search_path must not overtake the buffered SET it is asking about."""
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        client.send(Query(f"SET search_path = {shadow}".encode()))
        client.until_ready()
        client.send(
            Query(b"SET search_path = public"),
            Parse("", b"SELECT email FROM customers"),
            Bind("", ""),
            Execute(""),
            Sync(),
        )
        client.until_ready()
        reply = client.until_ready()
    finally:
        client.close()
    assert len(rows_of(reply)) == 2, reply
    assert_clean(reply)


def test_an_extended_set_pipelined_before_a_parse_without_sync_is_followed(
    gateway: RunningGateway, shadow: str
) -> None:
    """The path is read inside the pipeline (no Sync of pgwarden's): the SELECT is judged
    under public, where the server runs it."""
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        # The SELECT's estimate under public, known first: inside the client's pipeline
        # (no Sync yet) pgwarden explains nothing, and an ai-agent's read without an
        # estimate asks approval (gateway/guards/estimate.py).
        client.send(Query(b"SET search_path = public"))
        client.until_ready()
        client.send(Query(b"SELECT email FROM customers"))
        client.until_ready()
        client.send(Query(f"SET search_path = {shadow}".encode()))
        client.until_ready()
        client.send(
            Parse("", b"SET search_path = public"),
            Bind("", ""),
            Execute(""),
            Parse("", b"SELECT email FROM customers"),
            Bind("", ""),
            Execute(""),
            Sync(),
        )
        reply = client.until_ready()
    finally:
        client.close()
    assert not errors_in(reply), reply
    assert len(rows_of(reply)) == 2, reply
    assert_clean(reply)


def read_through(client: RawClient, code: str, count: int = 1) -> str:
    seen = ""
    while seen.count(code) < count:
        seen += chr(client.read()[0])
    return seen


def test_the_path_check_does_not_commit_a_pipeline_half_way(gateway: RunningGateway) -> None:
    """Answers read after a Flush, no Sync yet: a SHOW search_path (a Query) now would commit
    the pipeline's implicit transaction, and its later error would not undo the INSERT."""
    table = f"rt_flush_{uuid.uuid4().hex[:8]}"
    direct(gateway, f"CREATE TABLE {table} (x int)")
    client = RawClient(gateway, token_for(gateway, "admins"))
    try:
        client.send(
            Parse("i", f"INSERT INTO {table} VALUES (1)".encode()),
            Bind("", "i"),
            Execute(""),
            Parse("", b"SELECT set_config('search_path', 'public', false)"),
            Bind("", ""),
            Execute(""),
            Flush(),
        )
        read_through(client, "C", 2)
        client.send(Parse("", b"SELECT 1/0"), Bind("", ""), Execute(""), Sync())
        assert errors_in(client.until_ready())
    finally:
        client.close()
    try:
        assert direct(gateway, f"SELECT count(*) FROM {table}") == [(0,)]
    finally:
        direct(gateway, f"DROP TABLE {table}")


def test_the_path_check_is_not_sent_to_a_server_skipping_to_sync(gateway: RunningGateway) -> None:
    """After an error (no Sync yet) the server ignores a Query: waiting for its answer held
    the client's Sync back for ever."""
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        client.send(
            Parse("", b"SELECT set_config('search_path', 'public', false)"),
            Bind("", ""),
            Execute(""),
            Bind("", "no_such_statement"),
            Flush(),
        )
        read_through(client, "E")
        client.send(Parse("", b"SELECT 1"), Sync())
        assert client.until_ready()[-1] == ("Z", b"I")
        client.send(Query(b"SELECT 2"))
        assert rows_of(client.until_ready()) == [(b"2",)]
    finally:
        client.close()


def test_a_query_the_server_skips_after_an_error_answers_nothing(gateway: RunningGateway) -> None:
    """After an extended-protocol error (no Sync yet) the server ignores a Query: pgwarden
    expecting its answer took the next Query's rows for it, unmasked."""
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        client.send(Bind("", "no_such_statement"), Flush())
        read_through(client, "E")
        client.send(Query(b"SELECT 1"), Sync())
        assert client.until_ready() == [("Z", b"I")]
        client.send(Query(b"SELECT email FROM customers"))
        reply = client.until_ready()
    finally:
        client.close()
    assert len(rows_of(reply)) == 2, reply
    assert_clean(reply)
