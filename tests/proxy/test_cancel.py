"""Query cancel via the gateway stops a running query (psycopg, asyncpg); a wrong key does not."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerr
from psycopg.rows import TupleRow

from gateway.protocol import BackendKeyData, CancelRequest, ErrorResponse, Query
from tests.harness import RunningGateway, TcpRelay, target_through

from .wire import RawClient

pytestmark = pytest.mark.server


def _active_sleeps(gateway: RunningGateway, pid: int) -> int:
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as d:
        row = d.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active'"
            " AND query LIKE %s",
            (pid, "%pg_sleep%"),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _wait_until_running(gateway: RunningGateway, pid: int) -> None:
    deadline = time.monotonic() + 5
    while _active_sleeps(gateway, pid) == 0:
        assert time.monotonic() < deadline, "the query never started"
        time.sleep(0.02)


def test_psycopg_cancel(gateway: RunningGateway, via: psycopg.Connection[TupleRow]) -> None:
    # cancel_safe, not cancel: the blocking PQcancel holds the GIL while it waits for the
    # gateway to close the cancel connection, and this gateway runs in the test's process.
    pid = via.info.backend_pid

    def cancel() -> None:
        _wait_until_running(gateway, pid)
        via.cancel_safe(timeout=5)

    t = threading.Thread(target=cancel)
    start = time.monotonic()
    t.start()
    try:
        with pytest.raises(pgerr.QueryCanceled) as info:
            via.execute("SELECT pg_sleep(10)")
    finally:
        t.join(10)
    assert time.monotonic() - start < 5
    assert info.value.sqlstate == "57014"
    assert via.execute("SELECT 'usable'").fetchone() == ("usable",)


def test_psycopg_cancel_in_transaction_then_rollback(
    gateway: RunningGateway, via: psycopg.Connection[TupleRow]
) -> None:
    via.autocommit = False
    pid = via.info.backend_pid
    via.execute("SELECT 1")

    def cancel_once_running() -> None:
        _wait_until_running(gateway, pid)
        via.cancel_safe()

    t = threading.Thread(target=cancel_once_running)
    t.start()
    with pytest.raises(pgerr.QueryCanceled):
        via.execute("SELECT pg_sleep(10)")
    t.join(10)
    with pytest.raises(pgerr.InFailedSqlTransaction):
        via.execute("SELECT 1")
    via.rollback()
    assert via.execute("SELECT 2").fetchone() == (2,)


async def test_asyncpg_timeout_cancels(gateway: RunningGateway, admin_token: str) -> None:
    conn = await asyncpg.connect(gateway.url(admin_token), timeout=10)
    try:
        pid = conn.get_server_pid()
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(conn.fetch("SELECT pg_sleep(10)"), 0.5)
        assert await conn.fetchval("SELECT 'usable'") == "usable"
        assert time.monotonic() - start < 5
        assert await asyncio.to_thread(_active_sleeps, gateway, pid) == 0
    finally:
        await conn.close()


def test_cancel_with_wrong_secret_does_nothing(
    gateway: RunningGateway, via: psycopg.Connection[TupleRow]
) -> None:
    pid = via.info.backend_pid
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(via.execute("SELECT pg_sleep(1.5), 'finished'").fetchone())
        except psycopg.Error as exc:
            outcome.append(exc)

    t = threading.Thread(target=run)
    start = time.monotonic()
    t.start()
    _wait_until_running(gateway, pid)
    for key_pid, secret in (
        (pid, b"\x00\x00\x00\x00"),
        (pid, b"\xde\xad\xbe\xef"),
        (pid + 1, b"abcd"),
    ):
        raw = RawClient.connect(gateway.host, gateway.port, timeout=5)
        try:
            raw.send(CancelRequest(key_pid, secret).encode())
            assert raw.answers_or_closes(5) == "closed"
        finally:
            raw.close()
    t.join(10)
    assert outcome == [("", "finished")]
    assert time.monotonic() - start >= 1.5


def test_psql_sigint_cancels(gateway: RunningGateway, admin_token: str) -> None:
    """psql sends the classic blocking PQcancel from its SIGINT handler, from its own process."""
    proc = subprocess.Popen(
        [
            "psql",
            "-X",
            "-At",
            gateway.dsn(admin_token),
            "-c",
            "SELECT 'pid', pg_backend_pid()",
            "-c",
            "SELECT pg_sleep(10)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    )
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline().strip().split("|")[1])
        _wait_until_running(gateway, pid)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
        proc.wait()
    assert time.monotonic() - start < 5
    assert "canceling statement due to user request" in err
    assert _active_sleeps(gateway, pid) == 0


def test_cancel_when_idle_does_not_hit_the_next_query(via: psycopg.Connection[TupleRow]) -> None:
    via.cancel_safe()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert via.execute("SELECT 1").fetchone() == (1,)


# -- the cancel reaches the target before the client's cancel connection closes ---------------


class CancelObserver(TcpRelay):
    """Pipes ordinary connections through; for a cancel connection it notes when the server
    closed it, and passes that close on to the gateway only `hold` seconds later, so an
    early close by the gateway shows."""

    def __init__(self, upstream_port: int, hold: float) -> None:
        self.hold = hold
        self.cancels_closed: list[float] = []  # when the gateway saw the server's close
        super().__init__(upstream_port)

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        first = client.recv(16, socket.MSG_PEEK)
        if len(first) >= 8 and struct.unpack("!II", first[:8]) == (16, 80877102):
            upstream.sendall(client.recv(16))
            while upstream.recv(64):
                pass
            time.sleep(self.hold)
            self.cancels_closed.append(time.monotonic())
            return
        super().relay(client, upstream)


@pytest.fixture
def observed_target(gateway: RunningGateway) -> Iterator[tuple[str, CancelObserver]]:
    observer = CancelObserver(gateway.cluster.port, hold=0.3)
    try:
        with target_through(gateway, f"app_cancel_{observer.port}", observer.port) as name:
            yield name, observer
    finally:
        observer.close()


def _send_cancel(gateway: RunningGateway, key: BackendKeyData) -> float:
    """A raw CancelRequest to the gateway; when the gateway closed that connection."""
    raw = RawClient.connect(gateway.host, gateway.port, timeout=10)
    try:
        raw.send(CancelRequest(key.process_id, key.secret_key).encode())
        assert raw.answers_or_closes(10) == "closed"
        return time.monotonic()
    finally:
        raw.close()


def _until_error(client: RawClient) -> tuple[ErrorResponse, int]:
    """Frames up to the ErrorResponse and ReadyForQuery; the error and the CopyData seen."""
    copied = 0
    error = None
    while True:
        code, body = client.frame()
        if code == ord("d"):
            copied += 1
        elif code == ord("E"):
            error = ErrorResponse.decode(body)
        elif code == ord("Z"):
            assert error is not None
            return error, copied


@pytest.mark.parametrize("statement", ["sleep", "copy out"])
def test_cancel_is_forwarded_before_the_cancel_connection_closes(
    gateway: RunningGateway,
    admin_token: str,
    observed_target: tuple[str, CancelObserver],
    statement: str,
) -> None:
    target, observer = observed_target
    client = RawClient.connect(gateway.host, gateway.port, timeout=15)
    try:
        client.login(target, admin_token)
        assert client.key is not None
        if statement == "sleep":
            client.send(Query(b"SELECT pg_sleep(5)").encode())
            _wait_until_running(gateway, client.key.process_id)
        else:
            # Streams as fast as the client reads: the relay is busy when the cancel comes.
            client.send(
                Query(
                    b"COPY (SELECT repeat('x', 200) FROM generate_series(1, 5000000)) TO STDOUT"
                ).encode()
            )
            assert client.frame()[0] == ord("H")  # CopyOutResponse
        result: dict[str, float] = {}

        key = client.key
        assert key is not None

        def cancel() -> None:
            result["sent"] = time.monotonic()
            result["closed"] = _send_cancel(gateway, key)

        canceller = threading.Thread(target=cancel)
        canceller.start()
        error, copied = _until_error(client)
        errored = time.monotonic()
        canceller.join(10)
        assert error.sqlstate == "57014", error
        assert statement == "sleep" or copied > 0
        # The client's cancel connection closed only once the target's had (held 0.3 s).
        assert len(observer.cancels_closed) == 1
        assert result["closed"] >= observer.cancels_closed[0]
        # The statement was cancelled, well before it would have ended by itself.
        assert errored - result["sent"] < 4
        print(
            f"{statement}: 57014 after {1000 * (errored - result['sent']):.0f} ms; cancel"
            f" connection closed {1000 * (result['closed'] - observer.cancels_closed[0]):.1f} ms"
            " after the target's"
        )
        assert client.query("SELECT 1")[-1][0] == ord("Z")
    finally:
        client.close()
