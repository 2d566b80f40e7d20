"""The write-ahead audit log: durability modes, group fdatasync, torn tails, the index fed
from the log, rotation and pruning, all verified."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import (
    AuditChain,
    AuditLog,
    AuditLogBusy,
    ChainGap,
    SqliteAuditStore,
    WriteAheadAudit,
    index_from_log,
    verify,
)
from gateway.audit import log as log_module
from gateway.audit.index_process import _Follow
from gateway.audit.log import LogEntry, LogFollower, PendingSync
from gateway.audit.store import AuditStore
from gateway.audit.syncer import MAX_FDS as SYNC_MAX_FDS
from gateway.audit.syncer import SyncProcess
from gateway.audit.verify import compare_index, index_lag, verify_log
from gateway.proxy.ports import AuditUnavailable

from .conftest import CHAIN, AuditRig, statement_outcome, statement_request


def _wal(
    rig: AuditRig, durability: str, store: AuditStore | None = None, **options: Any
) -> WriteAheadAudit:
    epoch, key = rig.keyring.current(CHAIN)
    segment_bytes = options.pop("segment_bytes", 64 * 1024 * 1024)
    return WriteAheadAudit(
        AuditLog(rig.tmp / "log", segment_bytes=segment_bytes),
        AuditChain(CHAIN, epoch, key),
        store or rig.store(),
        durability=durability,
        keyring=rig.keyring,
        head=rig.heads,
        **options,
    )


async def _all_verified(rig: AuditRig) -> None:
    """The log verifies, the index verifies and holds what the log holds."""
    trail = AuditLog(rig.tmp / "log")
    store = rig.store()
    log_report = await verify_log(trail, CHAIN, rig.keyring, rig.heads, store)
    assert log_report.problem is None, log_report
    index_report = await verify(store, rig.keyring, None)
    assert index_report.ok, index_report.problems
    assert await compare_index(store, trail, CHAIN) is None
    assert await index_lag(store, trail, CHAIN) == 0


@pytest.mark.parametrize("durability", ["disk", "os"])
async def test_records_go_to_the_log_then_the_index(rig: AuditRig, durability: str) -> None:
    async with _wal(rig, durability) as wal:
        ids = await asyncio.gather(
            *(wal.request(statement_request(f"SELECT {i}")) for i in range(20))
        )
        for rid in ids:
            await wal.outcome(statement_outcome(rid))
        assert sorted(int(i.split(":")[1]) for i in ids) == list(range(1, 21))
    entries = list(AuditLog(rig.tmp / "log").entries())
    assert [e.seq for e in entries] == list(range(1, 41))
    await _all_verified(rig)


def _count_passes(wal: WriteAheadAudit) -> list[int]:
    """A list that grows by one per fdatasync pass, by whichever syncer the log has: the
    thread calls log.sync() per pass; the process's passes begin with log.sync_begin()."""
    passes: list[int] = []
    name = "sync" if wal.fdatasync_in == "thread" else "sync_begin"
    real = getattr(wal.log, name)

    def counted() -> Any:
        passes.append(1)
        return real()

    setattr(wal.log, name, counted)  # counting passes
    return passes


@pytest.mark.parametrize("fdatasync_in", ["process", "thread"])
async def test_disk_waits_for_one_fdatasync_shared_by_concurrent_records(
    rig: AuditRig, fdatasync_in: str
) -> None:
    wal = _wal(rig, "disk", fdatasync_in=fdatasync_in)
    passes = _count_passes(wal)
    async with wal:
        await asyncio.gather(*(wal.request(statement_request(f"SELECT {i}")) for i in range(100)))
        assert 1 <= len(passes) < 100
    await _all_verified(rig)


async def test_disk_fdatasyncs_in_a_process_of_its_own(
    rig: AuditRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default syncer is a child process: no thread of the gateway's syncs (AuditLog.sync
    is not called here, no sync thread starts), the child is not this process, and it ends
    with the writer."""
    wal = _wal(rig, "disk")

    def not_here(*_args: object) -> None:
        raise AssertionError("fdatasync ran in the gateway's process")

    monkeypatch.setattr(AuditLog, "sync", not_here)
    async with wal:
        for burst in range(3):
            await asyncio.gather(
                *(wal.request(statement_request(f"SELECT {burst}, {i}")) for i in range(20))
            )
        assert wal._sync_thread is None
        syncer = wal._syncer
        assert isinstance(syncer, SyncProcess)
        pid = syncer.pid
        assert pid is not None and pid != os.getpid()
        os.kill(pid, 0)  # alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # ended and reaped with the writer
    await _all_verified(rig)


async def test_disk_fails_closed_when_the_sync_process_fails_or_dies_then_goes_on(
    rig: AuditRig,
) -> None:
    """A failed fdatasync in the child (here: on a descriptor that cannot be synced) and a
    child killed in a pass each refuse the records of their pass (AuditUnavailable,
    readiness off); the next pass (a new child) takes records again."""
    async with _wal(rig, "disk") as wal:
        await wal.request(statement_request("SELECT 1"))
        real_begin = wal.log.sync_begin
        read_end, write_end = os.pipe()

        def unsyncable() -> PendingSync:
            pending = real_begin()
            return PendingSync(pending.retired, [*pending.files, read_end], pending.directory)

        wal.log.sync_begin = unsyncable  # type: ignore[method-assign]  # fault: EINVAL
        try:
            with pytest.raises(AuditUnavailable, match=r"fdatasync failed.*Invalid argument"):
                await wal.request(statement_request("SELECT refused"))
            assert not wal.accepting
        finally:
            wal.log.sync_begin = real_begin  # type: ignore[method-assign]  # the fault ends
            os.close(read_end)
            os.close(write_end)
        assert await wal.request(statement_request("SELECT 2")) == f"{CHAIN}:3"
        assert wal.accepting

        syncer = wal._syncer
        assert isinstance(syncer, SyncProcess) and syncer.pid is not None
        first = syncer.pid
        os.kill(first, signal.SIGSTOP)  # fault: the child hangs in a pass...
        held = asyncio.ensure_future(wal.request(statement_request("SELECT held")))
        await asyncio.sleep(0.2)
        assert not held.done()
        os.kill(first, signal.SIGKILL)  # ...and dies in it
        with pytest.raises(AuditUnavailable, match=r"fdatasync failed.*exited"):
            await held
        assert not wal.accepting
        # A new child for the next pass.
        assert await wal.request(statement_request("SELECT 3")) == f"{CHAIN}:5"
        assert syncer.pid is not None and syncer.pid != first
        assert wal.accepting
        # One that dies between passes costs nothing: the next pass starts another.
        second = syncer.pid
        os.kill(second, signal.SIGKILL)
        for _ in range(100):
            if syncer.pid is None:
                break
            await asyncio.sleep(0.01)
        assert syncer.pid is None
        assert await wal.request(statement_request("SELECT 4")) == f"{CHAIN}:6"
        assert syncer.pid not in (None, first, second)
    await _all_verified(rig)


@pytest.mark.parametrize("replaced", ["fdatasync", "fsync"])
async def test_a_fault_injected_into_os_fdatasync_is_not_bypassed_by_the_process(
    rig: AuditRig, monkeypatch: pytest.MonkeyPatch, replaced: str
) -> None:
    """os.fdatasync (or os.fsync) replaced in the gateway's process, as a fault injected or a
    wrapper: the passes go through it (on the thread), not around it through the child that
    calls the kernel's. A sync that fails there refuses its records; back to the process once
    the replacement is gone."""
    real = getattr(os, replaced)
    calls: list[int] = []

    def failing(fd: int) -> None:
        calls.append(fd)
        raise OSError(5, "Input/output error (injected)")

    async with _wal(rig, "disk", segment_bytes=200) as wal:
        assert await wal.request(statement_request("SELECT 1")) == f"{CHAIN}:1"
        monkeypatch.setattr(os, replaced, failing)
        # fsync is the directory's, after a segment was created: the records roll one over.
        with pytest.raises(AuditUnavailable, match="Input/output error"):
            await wal.request(statement_request("SELECT refused " + "x" * 300))
        assert calls and not wal.accepting
        monkeypatch.setattr(os, replaced, real)
        spawned = len(calls)
        assert await wal.request(statement_request("SELECT 2 " + "y" * 300)) == f"{CHAIN}:3"
        assert wal.accepting and len(calls) == spawned
    await _all_verified(rig)


def _ended(pid: int) -> bool:
    """Whether the process has ended: gone, or a zombie not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


async def test_a_stuck_sync_process_is_replaced(rig: AuditRig) -> None:
    """A child that does not answer its pass (stopped here; hung) within the writer's timeout
    fails the pass (AuditUnavailable) and is killed; the next pass starts a new child and
    takes records again, those written during the stall first, not failing at the timeout
    from then on."""
    async with _wal(rig, "disk", timeout=0.5) as wal:
        assert await wal.request(statement_request("SELECT 1")) == f"{CHAIN}:1"
        syncer = wal._syncer
        assert isinstance(syncer, SyncProcess) and syncer.pid is not None
        first = syncer.pid
        os.kill(first, signal.SIGSTOP)  # fault: the child hangs and never resumes
        started = time.monotonic()
        stuck = asyncio.ensure_future(wal.request(statement_request("SELECT stuck")))
        await asyncio.sleep(0.3)
        # Written during the stall, within its own timeout: the pass after the stuck one,
        # on a new child, makes it durable.
        during = asyncio.ensure_future(wal.request(statement_request("SELECT during")))
        with pytest.raises(AuditUnavailable):
            await stuck
        assert time.monotonic() - started < 5
        assert await during == f"{CHAIN}:3"
        for _ in range(200):  # SIGKILLed
            if _ended(first):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"the stuck sync process {first} was not killed")
        assert await wal.request(statement_request("SELECT 2")) == f"{CHAIN}:4"
        assert syncer.pid not in (None, first)
        assert wal.accepting
        assert await wal.request(statement_request("SELECT 3")) == f"{CHAIN}:5"
    await _all_verified(rig)


async def test_the_sync_process_outlives_a_ctrl_c_to_the_process_group(rig: AuditRig) -> None:
    """Ctrl-C reaches every process of the terminal's foreground group: the gateway then
    stops and still syncs what it writes meanwhile. Its sync process is in a group of its
    own (not reached, even while it starts) and ignores SIGINT sent to it directly; it ends
    when its socket closes."""
    async with _wal(rig, "disk") as wal:
        syncer = wal._syncer
        assert isinstance(syncer, SyncProcess) and syncer.pid is not None
        pid = syncer.pid
        assert os.getpgid(pid) != os.getpgid(0)
        await wal.request(statement_request("SELECT 1"))  # answered: it has started
        os.kill(pid, signal.SIGINT)
        await asyncio.sleep(0.1)
        assert await wal.request(statement_request("SELECT after ctrl-c")) == f"{CHAIN}:2"
        assert syncer.pid == pid
    await _all_verified(rig)


async def test_more_rotated_segments_than_one_request_carries_are_synced_on_the_thread(
    rig: AuditRig,
) -> None:
    """Tiny segments behind a stalled pass: more segments rotate out before the next pass
    than one request to the sync process may carry (MAX_FDS). That pass syncs them on the
    thread; the one after goes back to the process; every record is durable and verifies."""
    async with _wal(rig, "disk", segment_bytes=100) as wal:
        first = await wal.request(statement_request("SELECT first"))
        syncer = wal._syncer
        assert isinstance(syncer, SyncProcess) and syncer.pid is not None
        os.kill(syncer.pid, signal.SIGSTOP)  # the next pass stalls...
        try:
            stalled = asyncio.ensure_future(wal.request(statement_request("SELECT stalled")))
            await asyncio.sleep(0.05)
            for _ in range(SYNC_MAX_FDS + 20):
                wal.outcome_nowait(statement_outcome(first))
                wal._flush()  # one write each: a segment rotated out each
            assert len(wal.log._retired) > SYNC_MAX_FDS
        finally:
            os.kill(syncer.pid, signal.SIGCONT)  # ...and goes on
        await stalled
        after = await wal.request(statement_request("SELECT after"))
        assert wal.log._retired == []
        assert wal._sync_thread is not None  # the pass that carried too many
        assert await wal.request(statement_request("SELECT again")) == (
            f"{CHAIN}:{int(after.split(':')[1]) + 1}"
        )
    await _all_verified(rig)


async def test_a_failed_sync_leaves_the_rotated_segments_and_directory_to_the_next(
    rig: AuditRig,
) -> None:
    """Records in a segment rotated out, and a new segment's directory entry, are durable
    only once a sync covering them succeeds: one that failed hands them to the next
    (before, a failed sync dropped them, and the next success released records whose
    segment or directory entry had never been synced)."""
    trail = AuditLog(rig.tmp / "log", segment_bytes=100)
    trail.open()
    trail.write(b"x" * 150, 1)  # rotates in: a new segment, the directory dirty
    trail.write(b"y" * 150, 2)  # rotates: the first segment retired
    first = trail.sync_begin()
    assert len(first.retired) == 1 and first.directory is not None
    trail.sync_end(first, ok=False)
    again = trail.sync_begin()
    assert again.retired == first.retired and again.directory is not None
    trail.sync_end(again, ok=True)
    done = trail.sync_begin()
    assert done.retired == [] and done.directory is None
    trail.sync_end(done, ok=True)
    trail.close()


async def test_disk_syncs_on_one_thread_of_its_own_without_an_executor_hop(
    rig: AuditRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fdatasync_in = "thread": each fdatasync is one wake-up of the log's sync thread: no
    executor work item, queue and futures per sync (their GIL hand-offs cost the event
    loop more than the sync)."""
    wal = _wal(rig, "disk", fdatasync_in="thread")
    threads: list[int] = []
    real = wal.log.sync

    def on_thread() -> None:
        threads.append(threading.get_ident())
        real()

    wal.log.sync = on_thread  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    executor = loop.run_in_executor

    def no_sync_in_executor(pool: Any, func: Any, *args: Any) -> Any:
        assert func is not on_thread, "an fdatasync went through an executor"
        return executor(pool, func, *args)

    monkeypatch.setattr(loop, "run_in_executor", no_sync_in_executor)
    async with wal:
        for burst in range(3):
            await asyncio.gather(
                *(wal.request(statement_request(f"SELECT {burst}, {i}")) for i in range(20))
            )
    assert threads and len(set(threads)) == 1
    assert threads[0] != threading.get_ident()
    await _all_verified(rig)


async def test_a_sync_pass_ending_with_the_head_due_and_records_written_starts_one_pass(
    rig: AuditRig,
) -> None:
    """disk: a pass ends (_synced) while the head witness is due and more records were
    written meanwhile: both ask for the next pass. One pass is asked for, once (a second
    wake-up of the sync thread raised 'release unlocked lock' in the loop's callback and
    left the records written meanwhile waiting)."""
    wal = _wal(rig, "disk", fdatasync_in="thread")
    wal.head_interval = 0.005  # the head witness is due at the end of most passes
    real = wal.log.sync

    def slow() -> None:
        time.sleep(0.01)  # records keep being written while a pass runs
        real()

    wal.log.sync = slow  # type: ignore[method-assign]
    heads = wal.head
    assert heads is not None

    def unwritable(chain: str, seq: int, link: bytes) -> None:
        raise OSError(28, "No space left on device")  # so the head is still due at the end

    real_record = heads.record
    heads.record = unwritable  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        async with wal:
            for burst in range(10):
                await asyncio.gather(
                    *(wal.request(statement_request(f"SELECT {burst}, {i}")) for i in range(5)),
                    asyncio.sleep(0.003),
                )
            heads.record = real_record  # type: ignore[method-assign]  # the disk has room again
    finally:
        loop.set_exception_handler(None)
    assert errors == []


@pytest.mark.parametrize(
    ("durability", "fdatasync_in"), [("disk", "process"), ("disk", "thread"), ("os", "process")]
)
async def test_the_head_witness_is_rewritten_off_the_event_loop_never_ahead_of_the_log(
    rig: AuditRig, durability: str, fdatasync_in: str
) -> None:
    """The witness is a file replaced by rename (milliseconds under load): the head thread
    writes it, naming a record already durable in the log, and it catches up once idle."""
    wal = _wal(rig, durability, fdatasync_in=fdatasync_in)
    wal.head_interval = 0.01
    loop_thread = threading.get_ident()
    durable_through = 0
    # Whichever syncer runs, a sync covers what was written before its sync_begin() and is
    # done at its sync_end(ok=True).
    real_begin, real_end = wal.log.sync_begin, wal.log.sync_end
    covers: dict[int, int] = {}

    def begin() -> PendingSync:
        last = wal.log.last()  # written before this fdatasync: covered by it
        pending = real_begin()
        covers[id(pending)] = last.seq if last else 0
        return pending

    def end(pending: PendingSync, *, ok: bool) -> None:
        nonlocal durable_through
        real_end(pending, ok=ok)
        if ok:
            durable_through = max(durable_through, covers.pop(id(pending)))

    wal.log.sync_begin = begin  # type: ignore[method-assign]
    wal.log.sync_end = end  # type: ignore[method-assign]
    written: list[tuple[int, int]] = []
    heads = wal.head
    assert heads is not None
    real_record = heads.record

    def record(chain: str, seq: int, link: bytes) -> None:
        if durability == "disk":
            assert seq <= durable_through, "head witness ahead of the fdatasynced log"
        written.append((threading.get_ident(), seq))
        real_record(chain, seq, link)

    heads.record = record  # type: ignore[method-assign]
    async with wal:
        for burst in range(5):
            await asyncio.gather(
                *(wal.request(statement_request(f"SELECT {burst}, {i}")) for i in range(10))
            )
            await asyncio.sleep(0.02)
        last = await wal.request(statement_request("SELECT last"))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if rig.heads.read(CHAIN) == (int(last.split(":")[1]), wal.log.last().link):  # type: ignore[union-attr]
                break
        assert rig.heads.read(CHAIN) is not None
        assert rig.heads.read(CHAIN)[0] == int(last.split(":")[1])  # type: ignore[index]
        assert written and all(thread != loop_thread for thread, _ in written)
    await _all_verified(rig)


@pytest.mark.parametrize("fdatasync_in", ["process", "thread"])
async def test_os_forwards_after_the_write_and_disk_fails_closed_without_fdatasync(
    rig: AuditRig, fdatasync_in: str
) -> None:
    """A fault injected into the log's sync() (replaced on the log) is what a disk pass
    does, whichever syncer the writer has: the process's passes go through the replaced
    sync() on a thread while it is replaced, and back to the process once it is not."""

    def broken() -> None:
        raise OSError(5, "Input/output error")

    async with _wal(rig, "os") as wal:
        wal.log.sync = broken  # type: ignore[method-assign]  # fault: fdatasync fails
        assert await wal.request(statement_request("SELECT os")) == f"{CHAIN}:1"
    async with _wal(rig, "disk", fdatasync_in=fdatasync_in) as wal:
        assert await wal.request(statement_request("SELECT before")) == f"{CHAIN}:2"
        wal.log.sync = broken  # type: ignore[method-assign]  # fault: fdatasync fails
        with pytest.raises(AuditUnavailable, match="fdatasync failed"):
            await wal.request(statement_request("SELECT disk"))
        assert not wal.accepting
        del wal.log.sync  # the fault ends
        # The session goes on once the disk takes records again.
        assert await wal.request(statement_request("SELECT again")) == f"{CHAIN}:4"
        assert wal.accepting
        if fdatasync_in == "process":
            assert isinstance(wal._syncer, SyncProcess) and wal._syncer.pid is not None


async def test_a_failed_write_refuses_the_request_and_keeps_the_outcome(rig: AuditRig) -> None:
    async with _wal(rig, "os", spool_retry=0.01) as wal:
        rid = await wal.request(statement_request("SELECT 1"))
        real = wal.log.write

        def full(data: bytes, first_seq: int) -> None:
            raise OSError(28, "No space left on device")

        wal.log.write = full  # type: ignore[method-assign]  # fault: the disk is full
        await wal.outcome(statement_outcome(rid))
        with pytest.raises(AuditUnavailable, match="No space left"):
            await wal.request(statement_request("SELECT refused"))
        assert wal.spooled == 1
        wal.log.write = real  # type: ignore[method-assign]  # the fault ends
        assert await wal.request(statement_request("SELECT 2")) == f"{CHAIN}:2"
        for _ in range(100):
            if not wal.spooled:
                break
            await asyncio.sleep(0.01)
    kinds = [e.sealed().kind for e in AuditLog(rig.tmp / "log").entries()]
    assert sorted(kinds) == ["outcome", "request", "request"]
    await _all_verified(rig)


async def test_a_sync_pass_after_a_failed_write_does_not_say_the_log_takes_records(
    rig: AuditRig,
) -> None:
    """disk: a sync pass can run without a write (the head witness's, the idle catch-up);
    one that follows a failed write must not turn readiness back on while the disk is
    still full: only a write that takes its records does."""
    async with _wal(rig, "disk", spool_retry=3600) as wal:
        wal.head_interval = 0.01
        await wal.request(statement_request("SELECT 1"))
        real = wal.log.write

        def full(data: bytes, first_seq: int) -> None:
            raise OSError(28, "No space left on device")

        wal.log.write = full  # type: ignore[method-assign]  # fault: the disk is full
        with pytest.raises(AuditUnavailable, match="No space left"):
            await wal.request(statement_request("SELECT refused"))
        assert not wal.accepting
        # Sync passes without a write: the head witness of the record written before.
        for _ in range(5):
            wal._head_on_file = None
            wal._write_head()
            await asyncio.sleep(0.02)
        assert not wal.accepting, "a sync pass said a full disk takes records"
        wal.log.write = real  # type: ignore[method-assign]  # the fault ends
        await wal.request(statement_request("SELECT 2"))
        assert wal.accepting
    await _all_verified(rig)


@pytest.mark.parametrize("cut", [3, 20, 60])
async def test_a_torn_final_record_is_cut_off_at_start_and_said(
    rig: AuditRig, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    async with _wal(rig, "disk") as wal:
        for i in range(3):
            await wal.request(statement_request(f"SELECT {i}"))
    (segment,) = AuditLog(rig.tmp / "log").segments()
    whole = segment.read_bytes()
    head = rig.heads.path(CHAIN).read_bytes()
    # A fourth record's first bytes, as a kill in the middle of write() leaves them: the
    # write never returned, so nothing (the head witness included) learnt of the record.
    async with _wal(rig, "disk") as wal:
        await wal.request(statement_request("SELECT torn"))
    fourth = segment.read_bytes()[len(whole) :]
    segment.write_bytes(whole + fourth[:cut])
    rig.heads.path(CHAIN).write_bytes(head)
    await rig.sql("DELETE FROM audit_record WHERE seq = 4")  # nor the index
    caplog.set_level(logging.ERROR, "pgwarden.audit")
    async with _wal(rig, "disk") as wal:
        assert "not a whole record" in caplog.text
        # The chain goes on from the last whole record.
        assert await wal.request(statement_request("SELECT after")) == f"{CHAIN}:4"
    assert list(segment.parent.glob("*.torn-*"))
    await _all_verified(rig)


async def test_a_garbled_final_record_is_not_accepted(rig: AuditRig) -> None:
    async with _wal(rig, "os") as wal:
        for i in range(3):
            await wal.request(statement_request(f"SELECT {i}"))
    (segment,) = AuditLog(rig.tmp / "log").segments()
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0xFF  # the CRC no longer matches the last frame
    segment.write_bytes(bytes(data))
    # It was acknowledged (the head witness names it): cut off, the loss is not papered over.
    with pytest.raises(ChainGap, match="reached seq 3, but the log ends at seq 2"):
        await _wal(rig, "os").start()


async def test_the_index_catches_up_from_the_log_idempotently(
    rig: AuditRig, tmp_path: Path
) -> None:
    async with _wal(rig, "os") as wal:
        for i in range(30):
            await wal.request(statement_request(f"SELECT {i}"))
    # A second index, empty, as after a kill before anything was indexed.
    fresh = SqliteAuditStore(tmp_path / "fresh.sqlite3")
    await fresh.open()
    try:
        trail = AuditLog(rig.tmp / "log")
        assert await index_lag(fresh, trail, CHAIN) == 30
        assert await index_from_log(fresh, trail, CHAIN) == 30
        assert await index_from_log(fresh, trail, CHAIN) == 0
        assert await index_lag(fresh, trail, CHAIN) == 0
        assert await compare_index(fresh, trail, CHAIN) is None
        assert (await verify(fresh, rig.keyring, rig.heads)).ok
    finally:
        await fresh.close()


async def test_an_index_edit_is_told_apart_from_the_log(rig: AuditRig) -> None:
    async with _wal(rig, "os") as wal:
        for i in range(5):
            await wal.request(statement_request(f"SELECT {i}"))
    await rig.sql("UPDATE audit_record SET link = ? WHERE seq = 3", bytes(32))
    problem = await compare_index(rig.store(), AuditLog(rig.tmp / "log"), CHAIN)
    assert problem is not None and problem.seq == 3 and problem.kind == "changed"


async def test_segments_rotate_and_prune_keeps_log_and_index_verifiable(rig: AuditRig) -> None:
    async with _wal(rig, "disk", segment_bytes=2000) as wal:
        for i in range(40):
            await wal.request(statement_request(f"SELECT {i}"))
        cutoff = time.time()
        await wal.rotate_key()
        for i in range(5):
            await wal.request(statement_request(f"SELECT late {i}"))
    trail = AuditLog(rig.tmp / "log")
    assert len(trail.segments()) > 3
    await _all_verified(rig)
    async with _wal(rig, "disk", segment_bytes=2000) as wal:
        anchor = await wal.prune(cutoff)
        assert anchor is not None and anchor.through_seq == 40
        after = await wal.request(statement_request("SELECT after prune"))
    assert after == f"{CHAIN}:{40 + 1 + 5 + 1 + 1}"
    assert AuditLog.first_seq(trail.segments()[0]) > 1
    await _all_verified(rig)


async def test_a_prune_by_a_writer_that_wrote_nothing_yet_closes_and_witnesses_it(
    rig: AuditRig, caplog: pytest.LogCaptureFixture
) -> None:
    """`pgwarden audit prune`'s writer commits the prune record itself: the head witness
    pass that commit starts covers no record of the writer's. That pass failed an assertion
    on the loop (logged, not raised), so a close() waiting for it waited for ever (a hang
    seen under load), and the witness was left to the close."""
    async with _wal(rig, "disk", segment_bytes=1500) as wal:
        for i in range(12):
            await wal.request(statement_request(f"SELECT {i}"))
        cutoff = time.time()
        await wal.rotate_key()
        await wal.request(statement_request("SELECT late"))
    wal = _wal(rig, "disk", segment_bytes=1500)
    await wal.start()
    anchor = await wal.prune(cutoff)
    assert anchor is not None
    pruned_at = wal.position
    await asyncio.wait_for(wal.close(), 10)
    assert not [r for r in caplog.records if "Exception in callback" in r.getMessage()]
    head = rig.heads.read(CHAIN)
    assert head is not None and head[0] == pruned_at
    await _all_verified(rig)


async def test_one_writer_per_log(rig: AuditRig) -> None:
    async with _wal(rig, "os"):
        with pytest.raises(AuditLogBusy):
            await _wal(rig, "os").start()


async def test_a_log_behind_its_head_witness_is_refused_unless_accepted(rig: AuditRig) -> None:
    async with _wal(rig, "disk") as wal:
        for i in range(4):
            await wal.request(statement_request(f"SELECT {i}"))
    for segment in AuditLog(rig.tmp / "log").segments():
        segment.unlink()
    with pytest.raises(ChainGap, match="behind its head witness"):
        await _wal(rig, "disk", store=SqliteAuditStore(rig.tmp / "other.sqlite3")).start()
    async with _wal(
        rig, "disk", store=SqliteAuditStore(rig.tmp / "other.sqlite3"), accept_gap=True
    ) as wal:
        assert await wal.request(statement_request("SELECT after")) == f"{CHAIN}:6"
    kinds = [e.sealed().kind for e in AuditLog(rig.tmp / "log").entries()]
    assert kinds == ["chain_gap", "request"]


async def test_a_follower_reads_what_is_added_whole_frames_only_across_segments(
    rig: AuditRig,
) -> None:
    async with _wal(rig, "os", segment_bytes=1500) as wal:
        await wal.request(statement_request("SELECT 0"))
        follower = wal.log.follow(0)
        assert [e.seq for e in follower.read(100)] == [1]
        assert follower.read(100) == []
        for i in range(1, 12):
            await wal.request(statement_request(f"SELECT {i}"))
        assert len(wal.log.segments()) > 1
        assert [e.seq for e in follower.read(5)] == [2, 3, 4, 5, 6]
        assert [e.seq for e in follower.read(100)] == list(range(7, 13))
        # Half a frame at the end (a write in progress) is read once it is whole.
        await wal.request(statement_request("SELECT 12"))
        segment = wal.log.segments()[-1]
        whole = segment.read_bytes()
        segment.write_bytes(whole[:-10])
        assert follower.read(100) == []
        segment.write_bytes(whole)
        assert [e.seq for e in follower.read(100)] == [13]
    # A follower placed after a seq starts there.
    assert [e.seq for e in AuditLog(rig.tmp / "log").follow(10).read(100)] == [11, 12, 13]


@pytest.mark.parametrize("rig", ["sqlite"], indirect=True)
async def test_the_index_process_reads_each_record_of_the_log_once(
    rig: AuditRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index process's seal follows the log; a batch too large for one guarded INSERT
    was sealed twice, the second time from a new follower reading the segment from its
    start: each poll under load parsed the whole segment again (quadratic in its size)."""
    async with _wal(rig, "os") as wal:
        for i in range(1000):
            wal.outcome_nowait(statement_outcome(f"{CHAIN}:{i}"))
        await wal.request(statement_request("SELECT last"))
    parsed = 0
    frames = log_module._frames

    def counted(data: bytes | memoryview, segment: Path) -> Iterator[LogEntry | int]:
        nonlocal parsed
        for item in frames(data, segment):
            parsed += isinstance(item, LogEntry)
            yield item

    monkeypatch.setattr(log_module, "_frames", counted)
    index = SqliteAuditStore(rig.tmp / "index.sqlite3", inline=True)
    follow = _Follow(AuditLog(rig.tmp / "log"), most=200)
    batches = []
    while batch := await index.append(CHAIN, follow):
        batches.append(len(batch))
    # Caught up, it polls: a poll that finds nothing new takes no transaction.
    commits = index.commits
    assert [await index.append(CHAIN, follow) for _ in range(5)] == [[]] * 5
    assert index.commits == commits
    await index.close()
    assert sum(batches) == 1001 and max(batches) == 200
    assert parsed <= 1001 + len(batches) + 5, parsed
    store = SqliteAuditStore(rig.tmp / "index.sqlite3")
    try:
        assert (await verify(store, rig.keyring, None)).ok
        assert await compare_index(store, AuditLog(rig.tmp / "log"), CHAIN) is None
    finally:
        await store.close()


async def test_a_follower_far_behind_reads_a_segment_a_chunk_at_a_time(
    rig: AuditRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded reads, whole frames across chunk ends, a record larger than a chunk."""
    monkeypatch.setattr(log_module, "_FOLLOW_CHUNK", 2000)
    async with _wal(rig, "os") as wal:
        for i in range(30):
            text = "SELECT " + ("'big'" * 1000 if i == 17 else str(i))
            await wal.request(statement_request(text))
    reads: list[int] = []
    read_on = LogFollower._read_on

    def measured(self: LogFollower, segment: Path) -> bytes:
        data = read_on(self, segment)
        reads.append(len(data))
        return data

    monkeypatch.setattr(LogFollower, "_read_on", measured)
    follower = AuditLog(rig.tmp / "log").follow(0)
    got = [e for batch in iter(lambda: follower.read(7), []) for e in batch]
    assert [e.seq for e in got] == list(range(1, 31))
    assert "'big'" * 1000 in got[17].body.decode()
    big = len(got[17].body)
    assert big > 2000 and max(reads) < big + 100
    assert sorted(reads)[len(reads) // 2] <= 2000


async def test_os_durability_closes_the_segments_it_rotates_out(rig: AuditRig) -> None:
    async with _wal(rig, "os", segment_bytes=1000) as wal:
        for i in range(30):
            await wal.request(statement_request(f"SELECT {i}"))
        assert len(wal.log.segments()) > 5
        assert wal.log._retired == []
