"""Fail closed: when a store cannot take a record, request() raises within the timeout."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Literal

import asyncpg
import pytest

from cli.localpg import LocalCluster, free_port
from gateway.audit import (
    AuditChain,
    AuditKeyring,
    AuditWriter,
    PostgresAuditStore,
    SqliteAuditStore,
    verify,
)
from gateway.proxy.ports import AuditUnavailable
from tests.harness import TcpRelay

from .conftest import CHAIN, statement_outcome, statement_request

TIMEOUT = 0.5
# Where a test is about a connection being replaced, not about time: room for a new
# connection (and its login) on a loaded machine.
PATIENT = 5.0
# Where StoreLink breaks the link: see StoreLink.cut.
Cue = Literal["before", "after", "silent"]


def _writer(
    store: SqliteAuditStore | PostgresAuditStore,
    tmp: Path,
    fail_open: bool = False,
    timeout: float = TIMEOUT,
) -> AuditWriter:
    keys = AuditKeyring(tmp / "keys")
    epoch, key = keys.current(CHAIN)
    chain = AuditChain(CHAIN, epoch, key)
    return AuditWriter(store, chain, keyring=keys, timeout=timeout, fail_open=fail_open)


async def _refused_in_time(writer: AuditWriter) -> None:
    start = time.monotonic()
    with pytest.raises(AuditUnavailable):
        await writer.request(statement_request())
    assert time.monotonic() - start < TIMEOUT + 0.4


async def test_sqlite_file_removed_refuses(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    async with _writer(SqliteAuditStore(folder / "audit.sqlite3"), tmp_path) as writer:
        await writer.request(statement_request())
        shutil.rmtree(folder)
        await _refused_in_time(writer)


async def test_sqlite_locked_by_another_writer_refuses_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    async with _writer(SqliteAuditStore(path, busy_timeout=TIMEOUT), tmp_path) as writer:
        await writer.request(statement_request())
        intruder = sqlite3.connect(path, isolation_level=None)
        intruder.execute("BEGIN EXCLUSIVE")
        try:
            await _refused_in_time(writer)
        finally:
            intruder.execute("ROLLBACK")
            intruder.close()
        # The refused record may still land once the lock is gone (the caller was told no,
        # so the trail over-reports, never under-reports); either way the writer recovers.
        rid = await writer.request(statement_request())
        assert rid in (f"{CHAIN}:2", f"{CHAIN}:3")


async def test_sqlite_fail_open_lets_the_statement_through_unaudited(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    async with _writer(SqliteAuditStore(folder / "a.sqlite3"), tmp_path, fail_open=True) as writer:
        shutil.rmtree(folder)
        assert await writer.request(statement_request()) == ""


@pytest.fixture
async def pg_dsn(pg_cluster: LocalCluster) -> AsyncIterator[str]:
    dbname = "audit_fault_" + uuid.uuid4().hex[:10]
    admin = await asyncpg.connect(pg_cluster.dsn())
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    yield pg_cluster.dsn(dbname=dbname)
    await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    await admin.close()


@pytest.mark.server
async def test_postgres_unreachable_refuses(tmp_path: Path) -> None:
    dsn = f"postgresql://postgres:x@127.0.0.1:{free_port()}/postgres"
    async with _writer(PostgresAuditStore(dsn, timeout=TIMEOUT), tmp_path) as writer:
        await _refused_in_time(writer)


@pytest.mark.server
async def test_postgres_database_dropped_refuses(
    tmp_path: Path, pg_cluster: LocalCluster, pg_dsn: str
) -> None:
    async with _writer(PostgresAuditStore(pg_dsn, timeout=TIMEOUT), tmp_path) as writer:
        await writer.request(statement_request())
        dbname = pg_dsn.rsplit("/", 1)[1]
        pg_cluster.psql(f'DROP DATABASE "{dbname}" WITH (FORCE)')
        await _refused_in_time(writer)


@pytest.mark.server
async def test_postgres_terminated_connection_is_replaced(tmp_path: Path, pg_dsn: str) -> None:
    store = PostgresAuditStore(pg_dsn, timeout=PATIENT / 2)
    async with _writer(store, tmp_path, timeout=PATIENT) as writer:
        await writer.request(statement_request())
        admin = await asyncpg.connect(pg_dsn)
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await admin.close()
        assert killed >= 1
        # A dead idle connection fails before COMMIT is sent, so one retry is safe.
        assert await writer.request(statement_request()) == f"{CHAIN}:2"


@pytest.mark.server
async def test_postgres_locked_table_refuses_then_recovers(tmp_path: Path, pg_dsn: str) -> None:
    async with _writer(PostgresAuditStore(pg_dsn, timeout=TIMEOUT), tmp_path) as writer:
        await writer.request(statement_request())
        intruder = await asyncpg.connect(pg_dsn)
        tr = intruder.transaction()
        await tr.start()
        await intruder.execute("LOCK TABLE audit_record IN ACCESS EXCLUSIVE MODE")
        try:
            await _refused_in_time(writer)
        finally:
            await tr.rollback()
            await intruder.close()
        rid = await writer.request(statement_request())
        assert rid in (f"{CHAIN}:2", f"{CHAIN}:3")


class StoreLink(TcpRelay):
    """The audit store's link to PostgreSQL, broken on cue.

    `cut(marker, when)` (cues are taken in turn): the store's next message holding `marker`
    is cut off before the
    server sees it ("before"), or reaches the server and its answer is withheld ("after":
    the server did it, the store never hears); either way both ends then see the connection
    end. "silent": it reaches the server, and the server is never heard from again on that
    connection, which stays open (a peer half gone) until the store closes it.
    `hold_eof`: when the server ends a connection, the store gets the server's last words
    (its FATAL) but not the end of the stream, as when it reads them a moment before the
    close, or a peer half gone. `refusing`: new connections are hung up on at once."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.hold_eof = False
        self.refusing = False
        self.fired = threading.Event()
        self._cues: list[tuple[bytes, str]] = []
        self._ended = 0
        self._state = threading.Condition()

    def cut(self, marker: bytes, when: Cue) -> None:
        with self._state:
            self._cues.append((marker, when))
            self.fired.clear()

    def wait_ended(self, count: int, timeout: float = 10.0) -> bool:
        """Whether the server ended `count` connections within `timeout`."""
        with self._state:
            return self._state.wait_for(lambda: self._ended >= count, timeout)

    def _take_cue(self, data: bytes) -> str | None:
        with self._state:
            if not self._cues or self._cues[0][0] not in data:
                return None
            when = self._cues.pop(0)[1]
            if not self._cues:
                self.fired.set()
        return when

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        if self.refusing:
            return
        withhold = threading.Event()
        silent = threading.Event()

        def hang_up() -> None:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        def to_store() -> None:
            with contextlib.suppress(OSError):
                while data := upstream.recv(65536):
                    if withhold.is_set():
                        hang_up()
                        return
                    if not silent.is_set():
                        client.sendall(data)
                with self._state:
                    self._ended += 1
                    self._state.notify_all()
                if not self.hold_eof:
                    client.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=to_store, daemon=True)
        back.start()
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                when = self._take_cue(data)
                if when == "before":
                    hang_up()
                    break
                upstream.sendall(data)
                if when == "after":
                    withhold.set()
                elif when == "silent":
                    silent.set()
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)
        back.join(10)


@pytest.fixture
def store_link(pg_cluster: LocalCluster) -> Iterator[StoreLink]:
    link = StoreLink(pg_cluster.port)
    yield link
    link.close()


def _through(link: StoreLink, dsn: str) -> str:
    """`dsn` by way of the link, in plain text (the link watches what the store sends)."""
    port = dsn.rsplit(":", 1)[1].split("/")[0]
    return dsn.replace(f":{port}/", f":{link.port}/") + "?sslmode=disable"


async def _stored(dsn: str, text: str) -> list[tuple[str, int]]:
    """(kind, seq) of the records of `text`'s requests and of their outcomes."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT kind, seq FROM audit_record WHERE text = $1 OR request_id IN"
            " (SELECT chain || ':' || seq FROM audit_record WHERE text = $1) ORDER BY seq",
            text,
        )
    finally:
        await conn.close()
    return [(r[0], r[1]) for r in rows]


async def _chain_verifies(dsn: str, tmp: Path) -> None:
    store = PostgresAuditStore(dsn)
    try:
        report = await verify(store, AuditKeyring(tmp / "keys"))
    finally:
        await store.close()
    assert report.ok, report.problems


@pytest.mark.server
@pytest.mark.parametrize("eof", ["seen", "held"])
async def test_postgres_terminated_connection_is_replaced_whatever_it_read(
    tmp_path: Path, pg_dsn: str, store_link: StoreLink, eof: str
) -> None:
    """pg_terminate_backend of the store's connections. "held": the store has read the
    server's FATAL but not yet the end of the stream (the race a CI run hit: asyncpg's
    protocol then refuses the next statement with InternalClientError "cannot switch to
    state 15; another operation (2) is in progress" on a connection not yet closed)."""
    store = PostgresAuditStore(_through(store_link, pg_dsn), timeout=PATIENT / 2)
    async with _writer(store, tmp_path, timeout=PATIENT) as writer:
        assert await writer.request(statement_request()) == f"{CHAIN}:1"
        store_link.hold_eof = eof == "held"
        admin = await asyncpg.connect(pg_dsn)
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await admin.close()
        assert killed >= 2  # the pool's and the writer's
        assert store_link.wait_ended(killed)
        await asyncio.sleep(0.1)  # the store's event loop reads what the server sent
        # A read, on the pool's connection; a write, on the writer's.
        first = await store.get(CHAIN, 1)
        assert first is not None and first.kind == "request"
        assert await writer.request(statement_request()) == f"{CHAIN}:2"
    await _chain_verifies(pg_dsn, tmp_path)


# Each point of a write where the store's connection can be lost: before anything of it
# reaches the server, in the middle of the insert, with the insert done but not committed,
# and committed but the store never told (it must find its records there, not store them
# again nor refuse the statement), even if the look's own connection is lost after it.
_CUTS: dict[str, list[tuple[bytes, Cue]]] = {
    "before-begin": [(b"BEGIN", "before")],
    "mid-insert": [(b"INSERT INTO audit_record", "after")],
    "before-commit": [(b"COMMIT", "before")],
    "commit-unanswered": [(b"COMMIT", "after")],
    "commit-unanswered-look-lost": [(b"COMMIT", "after"), (b"ROLLBACK", "before")],
}


@pytest.mark.server
@pytest.mark.parametrize("where", list(_CUTS))
async def test_postgres_connection_lost_mid_write_stores_each_record_once(
    tmp_path: Path, pg_dsn: str, store_link: StoreLink, where: str
) -> None:
    store = PostgresAuditStore(_through(store_link, pg_dsn), timeout=PATIENT / 2)
    text = f"SELECT 'lost {where}'"
    async with _writer(store, tmp_path, timeout=PATIENT) as writer:
        rid = await writer.request(statement_request(text))
        for marker, when in _CUTS[where]:
            store_link.cut(marker, when)
        # The outcome of the first statement and the request of the next, in one commit.
        await writer.outcome(statement_outcome(rid))
        next_rid = await writer.request(statement_request(text))
        assert store_link.fired.is_set()
        await writer.outcome(statement_outcome(next_rid))
    stored = await _stored(pg_dsn, text)
    assert stored == [("request", 1), ("outcome", 2), ("request", 3), ("outcome", 4)]
    assert next_rid == f"{CHAIN}:3"
    await _chain_verifies(pg_dsn, tmp_path)


@pytest.mark.server
async def test_postgres_unanswering_connection_is_replaced(
    tmp_path: Path, pg_dsn: str, store_link: StoreLink
) -> None:
    """A connection that takes the insert and never answers (half dead): after the store's
    timeout it is dropped and the write goes again on a new one."""
    # The store's timeout is how long its silence takes to be noticed.
    store = PostgresAuditStore(_through(store_link, pg_dsn), timeout=1.0)
    async with _writer(store, tmp_path, timeout=PATIENT) as writer:
        store_link.cut(b"INSERT INTO audit_record", "silent")
        assert await writer.request(statement_request()) == f"{CHAIN}:1"
        assert store_link.fired.is_set()
    await _chain_verifies(pg_dsn, tmp_path)


@pytest.mark.server
async def test_postgres_outcome_sent_again_after_an_unconfirmed_commit_is_stored_once(
    tmp_path: Path, pg_dsn: str, store_link: StoreLink
) -> None:
    """The COMMIT's answer is lost and the store cannot be asked at once whether it took
    effect: the request waiting on it is refused (its statement does not run), the outcome
    in the same commit is kept and sent again, and the store, which has it, keeps one."""
    store = PostgresAuditStore(_through(store_link, pg_dsn), timeout=PATIENT / 2)
    text = "SELECT 'unconfirmed'"
    async with _writer(store, tmp_path, timeout=PATIENT) as writer:
        rid = await writer.request(statement_request(text))
        store_link.cut(b"COMMIT", "after")
        store_link.refusing = True
        await writer.outcome(statement_outcome(rid))
        with pytest.raises(AuditUnavailable, match="whether it took effect"):
            await writer.request(statement_request(text))
        assert len(writer.spool) == 1
        store_link.refusing = False
        deadline = time.monotonic() + PATIENT
        while writer.spool:
            assert time.monotonic() < deadline, "the outcome was not sent again"
            await asyncio.sleep(0.01)
        last = await writer.request(statement_request(text))
    stored = await _stored(pg_dsn, text)
    # The refused request is there (the trail over-reports, never under-reports).
    assert stored == [("request", 1), ("outcome", 2), ("request", 3), ("request", 4)]
    assert last == f"{CHAIN}:4"
    await _chain_verifies(pg_dsn, tmp_path)


@pytest.mark.server
async def test_postgres_terminated_at_any_point_of_a_write_stores_each_record_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    """pg_terminate_backend of the store's connections at varied moments of a write (before
    it, during the insert, at COMMIT, after): every request is confirmed with its own id,
    every outcome is stored once, the chain verifies."""
    text = "SELECT 'terminated'"
    store = PostgresAuditStore(pg_dsn, timeout=PATIENT / 2)
    admin = await asyncpg.connect(pg_dsn)
    ids: list[str] = []
    try:
        async with _writer(store, tmp_path, timeout=PATIENT) as writer:
            ids.append(await writer.request(statement_request(text)))
            for i in range(40):
                await writer.outcome(statement_outcome(ids[-1]))
                pending = asyncio.ensure_future(writer.request(statement_request(text)))
                await asyncio.sleep((i % 10) * 0.0005)
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                ids.append(await pending)
            await writer.outcome(statement_outcome(ids[-1]))
    finally:
        await admin.close()
    stored = await _stored(pg_dsn, text)
    assert [kind for kind, _ in stored] == ["request", "outcome"] * len(ids)
    assert [seq for _, seq in stored] == list(range(1, 2 * len(ids) + 1))
    assert ids == [f"{CHAIN}:{seq}" for kind, seq in stored if kind == "request"]
    await _chain_verifies(pg_dsn, tmp_path)
