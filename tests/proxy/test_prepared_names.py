"""A prepared statement's name must always lead to what the server will run: a name reused
after DEALLOCATE, or a Parse the server rejects, never leaves pgwarden judging (and masking)
an Execute by an older statement's decision."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.protocol import Bind, DataRow, Describe, Execute, Parse, Sync
from tests.harness import RunningGateway
from tests.proxy.wire import RawClient, errors

pytestmark = pytest.mark.server


def _rows(frames: list[tuple[int, bytes]]) -> list[tuple[bytes | None, ...]]:
    return [DataRow.decode(body).values for code, body in frames if code == ord("D")]


def _run_named(client: RawClient, name: str, sql: str | None) -> list[tuple[int, bytes]]:
    parse = Parse(name, sql.encode()).encode() if sql is not None else b""
    client.send(
        parse
        + Bind("", name).encode()
        + Describe("P", "").encode()
        + Execute("").encode()
        + Sync().encode()
    )
    return client.until_ready()


@pytest.fixture
def agent(gateway: RunningGateway) -> Iterator[RawClient]:
    client = RawClient.connect(gateway.host, gateway.port)
    client.login("app", gateway.token("agent:names", groups=("ai-agents",)))
    yield client
    client.close()


def test_name_reused_after_deallocate_is_judged_by_its_new_text(agent: RawClient) -> None:
    first = _run_named(agent, "s1", "SELECT id FROM orders WHERE id = 1")
    assert _rows(first) == [(b"1",)] and not errors(first)
    agent.query("DEALLOCATE s1")
    second = _run_named(agent, "s1", "SELECT email FROM customers WHERE id = 1")
    assert not errors(second)
    assert _rows(second) == [(b"a***@example.com",)]


def test_a_rejected_parse_of_a_held_name_keeps_the_held_statement(agent: RawClient) -> None:
    held = _run_named(agent, "s2", "SELECT email FROM customers WHERE id = 2")
    assert _rows(held) == [(b"g***@example.org",)]
    # The server refuses a second Parse of s2 (it still holds s2): nothing in that pipeline runs.
    dup = _run_named(agent, "s2", "SELECT id FROM orders WHERE id = 2")
    assert [e.sqlstate for e in errors(dup)] == ["42P05"]
    again = _run_named(agent, "s2", None)
    assert _rows(again) == [(b"g***@example.org",)]
