"""The audit writer's own process, driven through AuditProcess as the gateway drives it: a
real child (`python -m gateway.audit`), a real SQLite store, the chain verified after."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner

from cli.localpg import LocalCluster
from cli.main import app
from gateway.audit import (
    AuditProcess,
    AuditStartRefused,
    audit_keyring,
    audit_store,
    head_witness,
    verify,
)
from gateway.proxy.ports import AuditUnavailable
from gateway.settings import Settings, load_settings
from tests.harness import PATIENCE

from .conftest import session_event, statement_outcome, statement_request


def _settings(state: Path, **audit: object) -> Settings:
    return load_settings(state_dir=state, instance="gw-proc", audit={"timeout_seconds": 2, **audit})


async def _stored(settings: Settings) -> list[tuple[str, int, str | None]]:
    store = audit_store(settings)
    await store.open()
    try:
        return [(r.kind, r.seq, r.request_id) async for r in store.scan(settings.instance)]
    finally:
        await store.close()


async def _verified(settings: Settings) -> bool:
    store = audit_store(settings)
    await store.open()
    try:
        report = await verify(store, audit_keyring(settings), head_witness(settings))
        return report.ok
    finally:
        await store.close()


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after PATIENCE seconds."""
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"{what} (after {PATIENCE:g}s)"
        await asyncio.sleep(0.05)


async def _wait_up(sink: AuditProcess, text: str = "SELECT 'up?'") -> str:
    """A request record committed, sent again until the child confirms one in time (it may
    be restarting, or slower than the audit timeout on a loaded machine); its id."""
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            return await sink.request(statement_request(text))
        except AuditUnavailable:
            assert time.monotonic() < deadline, "the audit process did not come back"
            await asyncio.sleep(0.05)


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[AuditProcess]:
    process = AuditProcess(_settings(tmp_path), restart_delay=0.1)
    await process.start()
    try:
        yield process
    finally:
        await process.close()


async def test_records_are_committed_in_order_and_verify(sink: AuditProcess) -> None:
    await sink.session(session_event("session_start"))
    ids = await asyncio.gather(*(sink.request(statement_request(f"SELECT {i}")) for i in range(50)))
    assert len(set(ids)) == 50 and all(i.startswith("gw-proc:") for i in ids)
    for rid in ids:
        sink.outcome_nowait(statement_outcome(rid))
    await sink.session(session_event("session_end", "client quit"))
    await sink.close()
    stored = await _stored(sink.settings)
    assert [k for k, _, _ in stored].count("request") == 50
    outcomes = {rid for k, _, rid in stored if k == "outcome"}
    assert outcomes == set(ids)
    assert [seq for _, seq, _ in stored] == list(range(1, len(stored) + 1))
    assert stored[0][0] == "session_start" and stored[-1][0] == "session_end"
    assert await _verified(sink.settings)


async def test_a_request_waits_for_the_commit(sink: AuditProcess) -> None:
    rid = await sink.request(statement_request("SELECT 'durable'"))
    # Already in the store when request() returns, read by another connection.
    assert any(f"gw-proc:{seq}" == rid for _, seq, _ in await _stored(sink.settings))


async def test_a_stalled_child_fails_requests_within_the_timeout(tmp_path: Path) -> None:
    sink = AuditProcess(_settings(tmp_path, timeout_seconds=0.5))
    await sink.start()
    try:
        assert sink._proc is not None
        os.kill(sink._proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(AuditUnavailable, match="did not confirm"):
            await sink.request(statement_request("SELECT 'stalled'"))
        assert time.monotonic() - t0 < 2
        os.kill(sink._proc.pid, signal.SIGCONT)
        await sink.request(statement_request("SELECT 'after'"))
    finally:
        await sink.close()


async def test_a_killed_child_fails_its_requests_and_is_restarted(sink: AuditProcess) -> None:
    await sink.request(statement_request("SELECT 'before'"))
    assert sink._proc is not None
    first = sink._proc.pid
    os.kill(first, signal.SIGKILL)
    with pytest.raises(AuditUnavailable):
        # Whatever the child had not acknowledged fails; so do requests until it is back.
        for _ in range(200):
            await sink.request(statement_request("SELECT 'during'"))
            await asyncio.sleep(0.01)
    await _wait_up(sink)
    assert sink._proc is not None and sink._proc.pid != first
    await sink.close()
    assert await _verified(sink.settings)


async def test_garbage_on_the_socket_stops_the_child_and_a_new_one_takes_over(
    sink: AuditProcess,
) -> None:
    await sink.request(statement_request("SELECT 'before'"))
    assert sink._proc is not None and sink._transport is not None
    first = sink._proc.pid
    # A frame whose record kind does not exist: the child must not store or guess.
    sink._transport.write(b"\x05\x00\x00\x00\xff" + bytes(8) + b"hello")
    await _wait_up(sink)
    assert sink._proc.pid != first
    await sink.close()
    kinds = [k for k, _, _ in await _stored(sink.settings)]
    assert kinds.count("request") >= 2
    assert await _verified(sink.settings)


async def test_closing_the_gateway_side_ends_the_child(tmp_path: Path) -> None:
    sink = AuditProcess(_settings(tmp_path))
    await sink.start()
    assert sink._proc is not None
    proc = sink._proc
    rid = await sink.request(statement_request("SELECT 'last'"))
    sink.outcome_nowait(statement_outcome(rid))
    await sink.close()
    assert proc.returncode == 0
    # The outcome sent just before closing was committed, not dropped.
    assert ("outcome", 2, rid) in await _stored(sink.settings)


async def test_the_supervisor_survives_every_kind_of_child_failure(
    sink: AuditProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that cannot be spawned, one that exits before reading its settings or before
    its handshake, and one killed while serving: each is logged and retried, and a healthy
    child takes over once one can start."""
    await sink.request(statement_request("SELECT 'before'"))
    assert sink.ready and sink.state == "ready"
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # spawn fails (OSError)
    assert sink._proc is not None
    os.kill(sink._proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while sink.ready:
        assert time.monotonic() < deadline, "the killed child was not noticed"
        await asyncio.sleep(0.02)
    while sink.restarts < 3:
        assert time.monotonic() < deadline, "the supervisor stopped retrying"
        assert not sink.ready
        with pytest.raises(AuditUnavailable, match="not running"):
            await sink.request(statement_request("SELECT 'refused'"))
        await asyncio.sleep(0.05)
    assert "could not be started" in (sink.last_error or "")
    # Starts, then exits before its settings are written or before its handshake.
    monkeypatch.setattr(sys, "executable", "/bin/true")
    seen = sink.restarts
    while sink.restarts < seen + 2:
        assert time.monotonic() < deadline, "the supervisor stopped retrying"
        await asyncio.sleep(0.05)
    # Seen as gone before its handshake, by its exit or by its socket's end, whichever first.
    assert "exited" in (sink.last_error or "") or "ready" in (sink.last_error or "")
    assert sink._supervisor is not None and not sink._supervisor.done()
    monkeypatch.undo()
    await _wait_up(sink)
    assert sink.ready and sink.state == "ready"
    await sink.close()
    assert sink.state == "stopped"
    assert await _verified(sink.settings)


async def test_outcomes_wait_in_the_spool_through_a_store_outage_and_a_new_child(
    tmp_path: Path,
) -> None:
    # A short audit timeout is a short busy timeout: each commit tried while the store is
    # locked fails fast. The failed records then wait a whole second in the spool before the
    # next try (a try takes them out of it), so that the poll below sees them there however
    # late a loaded machine wakes it.
    settings = _settings(tmp_path, timeout_seconds=0.3)
    sink = AuditProcess(settings, restart_delay=0.05, spool_retry=1.0)
    await sink.start()
    lock = None
    try:
        rid = await _wait_up(sink, "SELECT 'ran'")
        # The store cannot take a commit (another connection holds its write lock).
        lock = sqlite3.connect(settings.state_path(settings.audit.sqlite_path))
        lock.isolation_level = None
        lock.execute("BEGIN EXCLUSIVE")
        sink.outcome_nowait(statement_outcome(rid))
        await sink.session(session_event("session_end", "client quit"))
        await _until(lambda: sink.spooled >= 2, "the failed records were not spooled")
        # The spool lives in the gateway: a new child inherits it.
        assert sink._proc is not None
        first = sink._proc.pid
        os.kill(first, signal.SIGKILL)
        await _until(
            lambda: sink.ready and sink._proc is not None and sink._proc.pid != first,
            "no new child",
        )
        lock.execute("ROLLBACK")
        await _until(lambda: not (sink.spooled or sink.unacknowledged), "the spool was not emptied")
    finally:
        if lock is not None:
            lock.close()
        await sink.close()
    assert sink.records_lost == 0
    stored = await _stored(settings)
    assert ("outcome", rid) in {(k, r) for k, _, r in stored}
    assert [k for k, _, _ in stored].count("session_end") == 1
    assert await _verified(settings)


async def test_what_overflows_the_spool_is_counted(tmp_path: Path) -> None:
    settings = _settings(tmp_path, timeout_seconds=0.3)
    sink = AuditProcess(settings, spool_limit=2, spool_retry=60)
    await sink.start()
    try:
        rid = await _wait_up(sink, "SELECT 1")
        assert sink._proc is not None
        os.kill(sink._proc.pid, signal.SIGSTOP)
        try:
            # Nothing acknowledges these; when the child is killed they are spooled, and
            # three of five do not fit.
            for _ in range(5):
                sink.outcome_nowait(statement_outcome(rid))
            await asyncio.sleep(0.05)
        finally:
            os.kill(sink._proc.pid, signal.SIGKILL)
        await _until(lambda: sink.records_lost >= 3, "the overflow was not counted")
        assert sink.spooled <= 2
        await _wait_up(sink)
    finally:
        await sink.close()
    assert sink.records_lost == 3
    outcomes = [k for k, _, _ in await _stored(settings)].count("outcome")
    assert outcomes == 2


def _wipe(path: Path) -> None:
    """The whole SQLite store deleted, as an operator's mistake or an attacker would."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def test_gap_consent_holds_for_a_new_child_until_the_gap_is_bridged(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    first = AuditProcess(settings)
    await first.start()
    for i in range(3):
        await first.request(statement_request(f"SELECT {i}"))
    await first.close()
    _wipe(settings.state_path(settings.audit.sqlite_path))

    refused = AuditProcess(settings)
    with pytest.raises(AuditStartRefused, match="behind its head witness"):
        await refused.start()

    consent = _settings(tmp_path, accept_chain_gap=True)
    sink = AuditProcess(consent, restart_delay=0.05)
    await sink.start()
    try:
        # Its child dies before anything was committed: the next one still has the consent.
        assert sink._proc is not None
        os.kill(sink._proc.pid, signal.SIGKILL)
        await _wait_up(sink)
    finally:
        await sink.close()
    stored = await _stored(settings)
    assert stored[0][:2] == ("chain_gap", 4), stored
    assert [k for k, _, _ in stored[1:]] == ["request"] * (len(stored) - 1)


async def test_an_acknowledgement_read_from_a_replaced_child_commits_nothing(
    sink: AuditProcess,
) -> None:
    """Acknowledgements still read from a child already accounted for as gone (written just
    before it exited) are not credited to the records of the child that replaced it: a
    request the new child has not committed must not be let through as durable."""
    await _wait_up(sink)
    old = sink._protocol
    assert old is not None and sink._proc is not None
    first = sink._proc.pid
    os.kill(first, signal.SIGKILL)
    await _until(
        lambda: sink.ready and sink._proc is not None and sink._proc.pid != first, "no new child"
    )
    await _wait_up(sink)
    assert sink._proc is not None
    os.kill(sink._proc.pid, signal.SIGSTOP)  # the new child commits nothing from here
    try:
        pending = asyncio.ensure_future(sink.request(statement_request("SELECT 'stale?'")))
        await _until(lambda: sink.unacknowledged == 1, "the request was not sent")
        # What a stale socket would deliver: "committed, one record, from seq 999".
        old.data_received(struct.pack("<BIQ", 0, 1, 999))
        with pytest.raises(AuditUnavailable):
            await pending
    finally:
        os.kill(sink._proc.pid, signal.SIGCONT)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.server)])
async def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Settings]:
    """Settings of a gateway whose audit store is the point of durability, on either store
    (with room for a loaded machine: these tests are about what is stored, not when)."""
    if request.param == "sqlite":
        yield _settings(tmp_path, durability="store", timeout_seconds=10)
        return
    cluster: LocalCluster = request.getfixturevalue("pg_cluster")
    dbname = "audit_proc_" + uuid.uuid4().hex[:10]
    admin = await asyncpg.connect(cluster.dsn())
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    try:
        dsn = cluster.dsn(dbname=dbname)
        yield _settings(
            tmp_path, durability="store", timeout_seconds=10, store="postgres", postgres_dsn=dsn
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()


def _audit_verify(settings: Settings) -> tuple[int, str]:
    """`pgwarden audit verify` on these settings: its exit code and output."""
    env = {
        "PGWARDEN_STATE_DIR": str(settings.state_dir),
        "PGWARDEN_INSTANCE": settings.instance,
        "PGWARDEN_AUDIT__DURABILITY": settings.audit.durability,
        "PGWARDEN_AUDIT__STORE": settings.audit.store,
        "PGWARDEN_AUDIT__POSTGRES_DSN": settings.audit.postgres_dsn,
    }
    result = CliRunner().invoke(app, ["audit", "verify"], env=env)
    return result.exit_code, result.output


async def test_records_committed_but_unacknowledged_by_a_dead_child_are_stored_once(
    store_settings: Settings,
) -> None:
    """The child commits, then is killed before the gateway reads its acknowledgement
    (SIGKILL between the commit and the ack, as far as the gateway can tell): the gateway
    sends those records again to the next child, which must not store them twice."""
    settings = store_settings
    sink = AuditProcess(settings, restart_delay=0.05)
    await sink.start()
    try:
        rid = await _wait_up(sink, "SELECT 'ran'")
        assert sink._proc is not None and sink._transport is not None
        first = sink._proc.pid
        # The child's acknowledgements stay in the socket from here: never read.
        sink._transport.pause_reading()
        sink.outcome_nowait(statement_outcome(rid))
        await sink.session(session_event("session_end", "client quit"))
        deadline = time.monotonic() + PATIENCE
        while [k for k, _, _ in await _stored(settings)] != ["request", "outcome", "session_end"]:
            assert time.monotonic() < deadline, "the child did not commit"
            await asyncio.sleep(0.05)
        os.kill(first, signal.SIGKILL)
        await _until(
            lambda: sink.ready and sink._proc is not None and sink._proc.pid != first,
            "no new child",
        )
        # Sent with the records sent again (one write, as a rule): its id is its own seq.
        after = await sink.request(statement_request("SELECT 'after'"))
        await _until(lambda: not (sink.spooled or sink.unacknowledged), "the spool was not emptied")
    finally:
        await sink.close()
    assert sink.records_lost == 0
    stored = await _stored(settings)
    assert stored == [
        ("request", 1, None),
        ("outcome", 2, rid),
        ("session_end", 3, None),
        ("request", 4, None),
    ]
    assert after == "gw-proc:4"
    code, output = await asyncio.to_thread(_audit_verify, settings)
    assert code == 0, output


async def test_acknowledgements_read_after_the_child_exited_still_count(tmp_path: Path) -> None:
    """The child's exit is seen before the acknowledgements it wrote just before it: the
    gateway reads its socket to the end first, so a request it committed is not refused
    (its statement runs) and its outcome is not sent again."""
    # Room for a loaded machine: the request below waits through the child's death.
    settings = _settings(tmp_path, durability="store", timeout_seconds=10)
    sink = AuditProcess(settings, restart_delay=0.05)
    await sink.start()
    try:
        rid = await _wait_up(sink, "SELECT 'ran'")
        assert sink._proc is not None and sink._transport is not None
        proc, transport = sink._proc, sink._transport
        transport.pause_reading()
        sink.outcome_nowait(statement_outcome(rid))
        last = asyncio.ensure_future(sink.request(statement_request("SELECT 'last'")))
        deadline = time.monotonic() + PATIENCE
        while len(await _stored(settings)) < 3:
            assert time.monotonic() < deadline, "the child did not commit"
            await asyncio.sleep(0.05)
        proc.kill()
        await _until(lambda: proc.returncode is not None, "the child's exit was not seen")
        transport.resume_reading()
        assert await last == "gw-proc:3"
        await _wait_up(sink)
    finally:
        await sink.close()
    assert sink.records_lost == 0
    kinds = [k for k, _, _ in await _stored(settings)]
    assert kinds[:3] == ["request", "outcome", "request"] and kinds.count("outcome") == 1
