"""LISTEN/NOTIFY through the gateway: channel, payload and the sender's real backend pid arrive."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.harness import RunningGateway

pytestmark = pytest.mark.server

CHANNEL = "orders changed ✓"
PAYLOAD = "id=42 — ünïcode payload"


def _one_notify(conn: psycopg.Connection[TupleRow]) -> psycopg.Notify:
    got = list(conn.notifies(timeout=5, stop_after=1))
    assert got, "no notification within 5 s"
    return got[0]


def test_backend_pid_matches_backend_key_data(via: psycopg.Connection[TupleRow]) -> None:
    row = via.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    assert row[0] == via.info.backend_pid != 0


@pytest.mark.parametrize("sender_path", ["direct", "gateway"])
def test_notification_reaches_listener_through_gateway(
    gateway: RunningGateway, admin_token: str, via: psycopg.Connection[TupleRow], sender_path: str
) -> None:
    via.execute(f'LISTEN "{CHANNEL}"')
    dsn = gateway.direct_dsn() if sender_path == "direct" else gateway.dsn(admin_token)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as sender:
        row = sender.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        sender_pid = row[0]
        assert sender_pid == sender.info.backend_pid
        sender.execute("SELECT pg_notify(%s, %s)", (CHANNEL, PAYLOAD))
    note = _one_notify(via)
    assert (note.channel, note.payload, note.pid) == (CHANNEL, PAYLOAD, sender_pid)
    # The session still answers queries after the asynchronous message.
    assert via.execute("SELECT 'after'").fetchone() == ("after",)


def test_notify_inside_transaction_arrives_at_commit(
    gateway: RunningGateway, via: psycopg.Connection[TupleRow]
) -> None:
    via.execute("LISTEN tx_chan")
    with psycopg.connect(gateway.direct_dsn()) as sender:
        sender.execute("NOTIFY tx_chan, 'first'")
        sender.execute("NOTIFY tx_chan, 'second'")
        assert list(via.notifies(timeout=0.3)) == []
        sender.commit()
    got = list(via.notifies(timeout=5, stop_after=2))
    assert [n.payload for n in got] == ["first", "second"]


def test_notification_to_self_arrives_with_command_results(
    via: psycopg.Connection[TupleRow],
) -> None:
    """A notification PostgreSQL sends just before ReadyForQuery must reach the client too."""
    via.execute("LISTEN self_chan")
    seen: list[psycopg.Notify] = []
    via.add_notify_handler(seen.append)
    via.execute("NOTIFY self_chan, 'to me'")
    assert [(n.channel, n.payload, n.pid) for n in seen] == [
        ("self_chan", "to me", via.info.backend_pid)
    ]


async def test_asyncpg_listener(gateway: RunningGateway, admin_token: str) -> None:
    listener = await asyncpg.connect(gateway.url(admin_token), timeout=10)
    sender = await asyncpg.connect(gateway.url(admin_token), timeout=10)
    try:
        got: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
        await listener.add_listener(
            CHANNEL, lambda _c, pid, ch, payload: got.put_nowait((pid, ch, payload))
        )
        sender_pid = await sender.fetchval("SELECT pg_backend_pid()")
        assert sender_pid == sender.get_server_pid()
        await sender.execute(f"NOTIFY \"{CHANNEL}\", '{PAYLOAD}'")
        assert await asyncio.wait_for(got.get(), 5) == (sender_pid, CHANNEL, PAYLOAD)
    finally:
        await listener.close()
        await sender.close()
