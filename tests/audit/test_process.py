"""The audit writer's own process, driven through AuditProcess as the gateway drives it: a
real child (`python -m gateway.audit`), a real SQLite store, the chain verified after."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.audit import AuditProcess, audit_keyring, audit_store, head_witness, verify
from gateway.proxy.ports import AuditUnavailable
from gateway.settings import Settings, load_settings

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


async def _wait_up(sink: AuditProcess) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            await sink.request(statement_request("SELECT 'up?'"))
            return
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
