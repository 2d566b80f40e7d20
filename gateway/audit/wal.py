"""The write-ahead audit sink: records sealed onto the audit log on the gateway's event loop.

Everything queued in one pass of the event loop is sealed (HMAC chain) and appended to the
log with one `write()`; no thread or process hop is needed for that. Durability is a setting:

- `os`: a request's statement is released once its record is written to the log file. It
  survives the gateway being killed (the bytes are in the kernel), not the machine losing
  power.
- `disk` (default): released once an fdatasync covering its record returns. One sync runs at
  a time, in a process of its own (syncer.py; `fdatasync_in = "thread"`: a thread of its
  own), and covers every record written before it started: records written meanwhile ride
  on the next one (group commit across sessions).

The head witness is rewritten on a thread of its own, naming a record already durable.

No mode forwards a statement before its record is written. The SQLite or PostgreSQL store is
an index fed from the log by a LogIndexer, off the statement path.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import posix
import subprocess
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Protocol

import orjson

from gateway.audit.chain import (
    EMPTY_TAIL,
    Anchor,
    AuditChain,
    ChainTail,
    PendingRecord,
    SealedRecord,
)
from gateway.audit.events import (
    ApprovalEvent,
    SessionEvent,
    StatementOutcome,
    StatementRequest,
)
from gateway.audit.index import LogIndexer, index_from_log
from gateway.audit.keys import AuditKeyring, HeadWitness
from gateway.audit.log import AuditLog, LogEntry, PendingSync, frame
from gateway.audit.records import (
    approval_record,
    canonical,
    outcome_record,
    request_bytes,
    request_record,
    session_record,
)
from gateway.audit.store import AuditStore, AuditStoreError
from gateway.audit.syncer import MAX_FDS as SYNC_MAX_FDS
from gateway.audit.syncer import SyncProcess
from gateway.audit.writer import (
    BatchClock,
    BatchedRecords,
    ChainGap,
    ChainHeadKeeper,
    Spool,
    Waiter,
    durable_or_fail_open,
    expire_waiters,
    fail_requests,
)
from gateway.metrics import Latencies
from gateway.proxy.ports import AuditUnavailable

log = logging.getLogger("pgwarden.audit")


class AuditLogBusy(AuditStoreError):
    """Another process (a running gateway of this instance) writes this chain's log."""


def _syncs_are_the_kernels() -> bool:
    """Whether os.fdatasync and os.fsync are still the system calls themselves (posix's), as
    the sync process makes them; not replaced in this process."""
    return os.fdatasync is posix.fdatasync and os.fsync is posix.fsync


def lock_log(directory: Path) -> int:
    """An exclusive lock on a chain's log, held while writing it; its file descriptor."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise AuditLogBusy(
            f"the audit log {directory} is being written by another process (a running "
            "gateway of this instance)"
        ) from exc
    return fd


def _tail_of(entry: LogEntry) -> ChainTail:
    env = orjson.loads(entry.body)
    return ChainTail.after(entry.seq, entry.link, env["epoch"], env["kind"])


class AuditIndex(Protocol):
    """What feeds the store from the log: LogIndexer (in this process) or IndexProcess."""

    logged_seq: int
    indexed_seq: int
    last_error: str | None

    @property
    def lag(self) -> int: ...

    def add(self, sealed: list[SealedRecord]) -> None: ...

    def start(self, logged_seq: int) -> None: ...

    async def caught_up(self, within: float) -> bool: ...

    async def close(self, within: float) -> None: ...


class SyncThread:
    """A thread that runs one pass of `sync` (the log's fdatasync, or the head witness's
    rewrite) per `request()` (one pass at a time: the caller asks again only after `done`
    was called), `done(error)` called on the event loop once per pass.

    Not an executor: a sync through `run_in_executor` costs a work item, a queue, a
    concurrent and an asyncio future and their callbacks, run partly on this thread, and
    every bytecode this thread runs takes the GIL from the event loop (measured: the
    hand-offs, not the fdatasync, were most of what `disk` cost over `os`). Here the thread
    runs a few lines per sync.
    """

    def __init__(
        self,
        sync: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        done: Callable[[BaseException | None], None],
    ) -> None:
        self._sync = sync
        self._loop = loop
        self._done = done
        self._stopping = False
        # Held while the thread has nothing to do; released by request() or stop().
        self._wake = threading.Lock()
        self._wake.acquire()
        self._thread = threading.Thread(target=self._run, name="pgwarden-audit-sync", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wake.release()

    def _run(self) -> None:
        wake, sync, done, call = self._wake, self._sync, self._done, self._loop.call_soon_threadsafe
        while True:
            wake.acquire()
            if self._stopping:
                return
            error: BaseException | None = None
            try:
                sync()
            except Exception as exc:  # reported to the loop, which fails the waiters
                error = exc
            try:
                call(done, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return

    def stop(self) -> None:
        """After the last `done` (no sync requested or running)."""
        self._stopping = True
        self._wake.release()
        self._thread.join()


class WriteAheadAudit(BatchedRecords, ChainHeadKeeper):
    """The gateway's AuditSink over the audit log; see the module docstring.

    `request()` returns the record's id once it is durable in the configured sense and
    raises AuditUnavailable if the log cannot take it (write or fdatasync failed, or no
    confirmation within `timeout`). Outcome and session records a failed write did not take
    are spooled and written again.
    """

    def __init__(
        self,
        audit_log: AuditLog,
        chain: AuditChain,
        store: AuditStore,
        *,
        durability: str = "disk",
        index: AuditIndex | None = None,
        keyring: AuditKeyring | None = None,
        head: HeadWitness | None = None,
        timeout: float = 2.0,
        rows_limit: int = 100,
        bytes_limit: int = 65536,
        fail_open: bool = False,
        accept_gap: bool = False,
        max_batch: int = 5000,
        spool_limit: int = 100_000,
        spool_retry: float = 0.5,
        fdatasync_in: str = "process",
    ) -> None:
        if durability not in ("disk", "os"):
            raise ValueError("audit durability must be disk or os")
        if fdatasync_in not in ("process", "thread"):
            raise ValueError("audit fdatasync_in must be process or thread")
        self.fdatasync_in = fdatasync_in
        self.log = audit_log
        self.chain = chain
        self.store = store
        self.durability = durability
        self.keyring = keyring
        self.head = head
        self.timeout = timeout
        self.rows_limit = rows_limit
        self.bytes_limit = bytes_limit
        self.fail_open = fail_open
        self.accept_gap = accept_gap
        self.max_batch = max_batch
        self.index: AuditIndex = index or LogIndexer(store, audit_log, chain.name)
        self.spool: Spool[PendingRecord] = Spool(spool_limit)
        self.spool_retry = spool_retry
        self._spool_timer: asyncio.TimerHandle | None = None
        self._clock = BatchClock(self._flush)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._closed = False
        self._lock_fd: int | None = None
        self._tail = EMPTY_TAIL
        self._pending: list[PendingRecord] = []
        self._waiters: list[Waiter] = []
        # disk: (seq, waiter) written and waiting for the fdatasync that covers them, and
        # (last seq, timer) failing them if none does in time.
        self._unsynced: collections.deque[tuple[int, asyncio.Future[str]]] = collections.deque()
        self._timers: collections.deque[tuple[int, asyncio.TimerHandle]] = collections.deque()
        self._written = 0
        self._written_last: SealedRecord | None = None
        self._syncing = False
        # The last record written when the running sync started: what it covers.
        self._sync_covers: SealedRecord | None = None
        # disk: the sync process (None: syncs on the thread, fdatasync_in = "thread" or the
        # process could not be started) and the pass it has under way (AuditLog.sync_begin);
        # the thread, started at its first pass (see _start_sync).
        self._syncer: SyncProcess | None = None
        self._sync_pending: PendingSync | None = None
        self._sync_thread: SyncThread | None = None
        # The head witness's thread, and whether a pass of it is under way.
        self._head_thread: SyncThread | None = None
        self._heading = False
        self._sync_done = asyncio.Event()
        self._head: tuple[int, bytes] | None = None
        self._head_written = 0.0
        self._head_flush: asyncio.TimerHandle | None = None
        # What the head witness file holds (written by the head thread, see _head_pass).
        self._head_on_file: tuple[int, bytes] | None = None
        self.head_interval = 0.05
        # For the admin listener: the last durable record's seq (ChainHeadKeeper), the time
        # from a batch's write() to its being durable (the write itself in os mode, until the
        # fdatasync covering it in disk mode), and whether the log's last write and sync
        # succeeded. The log is written in this process: nothing restarts.
        self.position: int | None = None
        self.commit_seconds = Latencies()
        self.restarts = 0
        self.log_ok = True
        # The last write() took its records: a sync pass that follows a failed write (one
        # started for the head witness, say) says nothing of whether the log takes records.
        self._write_ok = True
        # disk: (last seq of a written batch, loop time of its write), oldest first.
        self._writes: collections.deque[tuple[int, float]] = collections.deque()

    # -- state --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._running

    @property
    def accepting(self) -> bool:
        """The log is open and takes records: its last write (and, in disk mode, fdatasync)
        succeeded (readiness, pgwarden_audit_writer_up)."""
        return self._running and self.log_ok

    def _log_state(self, ok: bool, error: object = None) -> None:
        """Whether the log took the last write or sync; each change is one log line."""
        if ok == self.log_ok:
            return
        self.log_ok = ok
        if ok:
            log.info(
                "audit log takes records again", extra={"event": "audit_writer_up", "restarts": 0}
            )
        else:
            log.error(
                "audit log down: %s (statements are refused meanwhile)",
                error,
                extra={"event": "audit_writer_down", "restarts": 0, "error": str(error)},
            )

    @property
    def index_lag(self) -> int:
        """Records in the log that the store (the index) does not hold yet."""
        return self.index.lag

    @property
    def spooled(self) -> int:
        return len(self.spool)

    @property
    def records_lost(self) -> int:
        return self.spool.lost

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the log (cutting a torn final record off it) and continue its chain. Raises
        ChainGap if the log is behind the head witness and the operator did not consent to
        bridging the gap (`accept_gap`), AuditLogBusy if another process writes it."""
        self._lock_fd = lock_log(self.log.directory)
        try:
            await self._open()
        except BaseException:
            self.log.close()
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        self._loop = asyncio.get_running_loop()
        self._head_thread = SyncThread(self._head_pass, self._loop, self._head_passed)
        if self.durability == "disk" and self.fdatasync_in == "process":
            self._syncer = self._start_syncer(self._loop)
        self._running = True
        if self._tail.seq:
            self.position = self._tail.seq
        self.index.start(self._tail.seq)

    def _start_syncer(self, loop: asyncio.AbstractEventLoop) -> SyncProcess | None:
        try:
            return SyncProcess(loop, self._synced, self.log.directory, stuck_after=self.timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("audit sync process not started (%s): fdatasync on a thread", exc)
            return None

    async def _open(self) -> None:
        last = self.log.open()
        head = self.head.read(self.chain.name) if self.head is not None else None
        self._head = head
        try:
            await self.store.open()
        except AuditStoreError as exc:
            log.warning("audit index store not available at start: %s", exc)
        if last is not None:
            tail = _tail_of(last)
        else:
            # A new log: continue the chain the store holds (a trail from before the log).
            tail = await self._store_tail(head)
        gap = head is not None and (
            tail.seq < head[0] or (tail.seq == head[0] and tail.link != head[1])
        )
        self._tail = tail
        if gap:
            assert head is not None
            message = (
                f"the audit log is behind its head witness: chain {self.chain.name} reached seq "
                f"{head[0]}, but the log ends at seq {tail.seq} (deleted, truncated or restored "
                "from an older copy)"
            )
            if not self.accept_gap:
                raise ChainGap(
                    message + "; refusing to start a new chain over the evidence. `pgwarden "
                    "audit verify` names what is missing; to start anyway and record the lost "
                    "range in the chain, run `pgwarden serve --accept-audit-gap` once"
                )
            log.error("audit: %s; continuing after it with a chain_gap record (accepted)", message)
            gap_record = PendingRecord(
                "chain_gap",
                time.time(),
                {
                    "lost_from": tail.seq + 1 if tail.seq < head[0] else head[0],
                    "lost_through": head[0],
                    "store_ended_at": tail.seq,
                    "witness_link": head[1].hex(),
                    "reason": "audit log behind its head witness; accepted by the operator",
                },
            )
            self._tail = ChainTail(head[0], head[1], self.chain.epoch)
            sealed, tail = self.chain.seal(self._tail, [gap_record])
            self.log.write(b"".join(map(frame, sealed)), sealed[0].seq)
            self.log.sync()
            self._tail = tail
            self.index.add(sealed)
            self._after_commit(sealed[-1])

    async def _store_tail(self, head: tuple[int, bytes] | None) -> ChainTail:
        tail = EMPTY_TAIL
        try:
            anchor = await self.store.anchor(self.chain.name)
            if anchor is not None:
                tail = ChainTail(anchor.through_seq, anchor.through_link, anchor.next_epoch)
            start = max(head[0] - 1, tail.seq) if head is not None else tail.seq
            async for r in self.store.scan(self.chain.name, after_seq=start, batch=5000):
                tail = ChainTail.after(r.seq, r.link, r.epoch, r.kind)
        except AuditStoreError as exc:
            log.warning("audit index store not readable at start: %s", exc)
        if tail.seq:
            log.info("audit log: new, continuing chain %s after seq %d", self.chain.name, tail.seq)
        return tail

    async def close(self) -> None:
        """Write and sync what is queued, index what the log holds, close. Once: a gateway
        that drained (SIGTERM) is stopped again by whoever started it."""
        if self._closed:
            return
        self._closed = True
        if self._running:
            self._resend_spool(None)
            await self._settle()
            self._running = False
        if self._spool_timer is not None:
            self._spool_timer.cancel()
            self._spool_timer = None
        if self.spool:
            self.spool.drop(len(self.spool.take()), "the log did not take them by shutdown")
        await self.index.close(self.timeout)
        if self.index.lag:
            # The indexer stopped short (a child killed or still starting): what the log holds
            # is indexed here, so a clean stop leaves no lag (a crash leaves it to the next
            # start or `pgwarden audit`).
            try:
                await asyncio.wait_for(
                    index_from_log(self.store, self.log, self.chain.name), self.timeout
                )
                self.index.indexed_seq = self.index.logged_seq
            except (AuditStoreError, TimeoutError) as exc:
                log.warning(
                    "audit index: %d records left for the next start: %s", self.index.lag, exc
                )
        if self._head_thread is not None:
            await self._settle()  # a head pass a timer started meanwhile
            if self._syncer is not None:
                self._syncer.stop()
                self._syncer = None
            if self._sync_thread is not None:
                self._sync_thread.stop()
                self._sync_thread = None
            self._head_thread.stop()
            self._head_thread = None
        self._write_head()
        self.log.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        await self.store.close()
        log.info(
            "audit log closed at seq %d (%d records not yet indexed)",
            self._tail.seq,
            self.index.lag,
            extra={"event": "audit_writer_stopped"},
        )

    async def __aenter__(self) -> WriteAheadAudit:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- AuditSink ----------------------------------------------------------------------------

    async def request(self, record: StatementRequest) -> str:
        return await self.request_soon(record)

    def request_soon(self, record: StatementRequest) -> asyncio.Future[str]:
        # Released by log position: when the write (os) or the fdatasync (disk) covering
        # the record is done.
        return durable_or_fail_open(
            partial(self._durable_request, record), fail_open=self.fail_open, text=record.text
        )

    def _durable_request(self, record: StatementRequest) -> asyncio.Future[str]:
        if not self._running or self._loop is None:
            raise AuditUnavailable("audit log is not open")
        if record.template is not None:
            # On its plan: the bytes from the plan's template (the index child derives the
            # searchable columns from them, in its own process).
            pending = PendingRecord("request", record.time, None, request_bytes(record))
        else:
            body = request_record(record)
            pending = PendingRecord("request", record.time, body, canonical(body))
        waiter: asyncio.Future[str] = self._loop.create_future()
        self._queue(pending, waiter, urgent=True)
        return waiter

    async def outcome(self, record: StatementOutcome) -> None:
        self.outcome_nowait(record)

    def outcome_nowait(self, record: StatementOutcome) -> None:
        body = outcome_record(record, self.rows_limit, self.bytes_limit)
        self._queue_kept(PendingRecord("outcome", record.time, body, canonical(body)))

    async def session(self, event: SessionEvent) -> None:
        body = session_record(event)
        self._queue_kept(PendingRecord(event.kind, event.time, body, canonical(body)))

    async def approval(self, event: ApprovalEvent) -> None:
        body = approval_record(event)
        self._queue_kept(PendingRecord("approval", event.time, body, canonical(body)))

    async def rotate_key(self) -> str:
        """Append a rotation record and move to the next key; the old key is destroyed."""
        if not self._running or self._loop is None:
            raise AuditUnavailable("audit log is not open")
        waiter: asyncio.Future[str] = self._loop.create_future()
        self._queue(PendingRecord("key_rotation", time.time(), {}), waiter, urgent=True)
        return await waiter

    async def prune(self, older_than: float) -> Anchor | None:
        """Delete this chain's records from before `older_than` (unix time) from the index
        and the log, leaving a signed anchor in both and a prune record in the chain. For a
        writer that has the log to itself (`pgwarden audit prune`, the gateway stopped)."""
        if not self._running:
            raise AuditUnavailable("audit log is not open")
        await self._settle()
        if not await self.index.caught_up(self.timeout):
            raise AuditUnavailable(
                f"the audit index is {self.index.lag} records behind the log: "
                f"{self.index.last_error or 'not indexed in time'}"
            )
        made: list[SealedRecord] = []

        def seal(tail: ChainTail, through: ChainTail) -> tuple[SealedRecord, Anchor]:
            if (tail.seq, tail.link) != (self._tail.seq, self._tail.link):
                raise AuditStoreError("the audit index does not end where the log does")
            record, anchor = self.chain.seal_prune(tail, through, older_than, time.time())
            # In the log (and on disk) before the index commits it.
            self.log.write(frame(record), record.seq)
            self.log.sync()
            made.append(record)
            return record, anchor

        anchor = await self.store.prune(self.chain.name, older_than, seal)
        if made:
            record = made[-1]
            self._tail = ChainTail.after(record.seq, record.link, record.epoch, record.kind)
            self.index.logged_seq = self.index.indexed_seq = record.seq
            self._after_commit(record)
        if anchor is not None:
            self.log.prune(anchor)
        return anchor

    async def _settle(self) -> None:
        """Until what is queued is written and synced."""
        self._flush()
        while self._syncing or self._unsynced or self._heading:
            self._sync_done.clear()
            await self._sync_done.wait()

    # -- writing ------------------------------------------------------------------------------

    def _queue_kept(self, pending: PendingRecord) -> None:
        if not self._running or self._loop is None:
            log.error("audit %s record lost: the audit log is not open", pending.kind)
            return
        self._queue(pending, None, urgent=False)

    def _flush(self) -> None:
        """Seal what this loop pass queued onto the log's tail and write it in one call."""
        self._clock.fired()
        if not self._pending:
            return
        pending, waiters = self._pending, self._waiters
        self._pending, self._waiters = [], []
        assert self._loop is not None
        started = self._loop.time()
        try:
            sealed, tail = self.chain.seal(self._tail, pending)
            self.log.write(b"".join(map(frame, sealed)), sealed[0].seq)
        except (OSError, ValueError) as exc:
            log.error("audit log write of %d records failed: %s", len(pending), exc)
            self._write_ok = False
            self._log_state(False, f"write failed: {exc}")
            fail_requests(waiters, AuditUnavailable(f"audit log write failed: {exc}"))
            self._keep([p for p, w in zip(pending, waiters, strict=True) if w is None])
            return
        self._write_ok = True
        self._tail = tail
        self.index.add(sealed)
        self._written_last = sealed[-1]
        if self.durability == "os":
            self.commit_seconds.observe(self._loop.time() - started)
            self._log_state(True)
            if self.log.rotated:
                self.log.rotated = 0
                self.log.close_retired()
            for s, w in zip(sealed, waiters, strict=True):
                if w is not None and not w.done():
                    w.set_result(f"{s.chain}:{s.seq}")
            self._after_commit(sealed[-1])
            return
        unsynced = self._unsynced
        for s, w in zip(sealed, waiters, strict=True):
            if w is not None:
                unsynced.append((s.seq, w))
        last = sealed[-1]
        self._written = last.seq
        self._writes.append((last.seq, started))
        if any(w is not None for w in waiters):
            timer = self._loop.call_later(self.timeout, expire_waiters, waiters, self.timeout)
            self._timers.append((last.seq, timer))
        if not self._syncing:
            self._start_sync()

    def _start_sync(self) -> None:
        """One pass at a time: the syncer takes one request per pass; what is written
        after a pass was asked for is the next pass's (see _synced)."""
        if self._syncing:
            # Never move what a running pass covers (its waiters would be released before
            # their fdatasync): the records written meanwhile are the next pass's.
            return
        self._syncing = True
        self._sync_covers = self._written_last
        syncer = self._syncer
        # AuditLog.sync() is the log's one definition of a sync, which the process performs
        # as it does (sync_begin, the fdatasyncs, sync_end). A log whose sync() was replaced
        # on it, or an os.fdatasync / os.fsync replaced in this process (a wrapper, a fault
        # injected), is synced through that, on the thread: what a sync is stays this
        # process's to say, and a fault injected into it is never bypassed by the child.
        if syncer is not None and "sync" not in vars(self.log) and _syncs_are_the_kernels():
            try:
                pending = self.log.sync_begin()
            except OSError as exc:  # the directory cannot be opened: the pass fails
                assert self._loop is not None
                self._loop.call_soon(self._synced, exc)
                return
            if len(pending.files) + (pending.directory is not None) <= SYNC_MAX_FDS:
                self._sync_pending = pending
                syncer.request(pending.files, pending.directory)
                return
            # More segments rotated out since the last pass than one request carries (tiny
            # segments, a slow disk): this pass syncs them on the thread.
            self.log.sync_end(pending, ok=False)
        if self._sync_thread is None:
            assert self._loop is not None
            self._sync_thread = SyncThread(self._fdatasync_pass, self._loop, self._synced)
        self._sync_thread.request()

    def _fdatasync_pass(self) -> None:
        """On the sync thread (no sync process, a replaced sync(), a pass too large for the
        process): sync the log."""
        self.log.sync()  # looked up per pass: tests replace it

    def _head_pass(self) -> None:
        """On the head thread: rewrite the head witness if it is due. The witness is a file
        replaced by rename, which takes milliseconds under load (ext4 starts writing the new
        file out at the rename): not on the event loop. It names the last durable record
        (_after_commit), so it is never ahead of the log."""
        head = self._head
        if (
            self.head is None
            or head is None
            or head == self._head_on_file
            or time.monotonic() - self._head_written < self.head_interval
        ):
            return
        try:
            self.head.record(self.chain.name, *head)
        except OSError as exc:
            # A witness that lags is allowed (verify accepts it); the records are durable.
            # Tried again after head_interval, not by a pass of its own at once (an
            # unwritable witness would keep the head thread passing without end).
            self._head_written = time.monotonic()
            log.warning("audit head witness not written: %s", exc)
            return
        self._head_written = time.monotonic()
        self._head_on_file = head

    def _write_head(self) -> None:
        """The head witness of the last durable record: by the head thread (a pass started
        for it), by this thread only once that is stopped (close)."""
        if self._head_thread is None:
            super()._write_head()
            self._head_on_file = self._head
            return
        if self._head_flush is not None:
            self._head_flush.cancel()
            self._head_flush = None
        if self._head is not None and self._head != self._head_on_file and not self._heading:
            self._heading = True
            self._head_thread.request()

    def _head_passed(self, failure: BaseException | None) -> None:
        """A head witness pass is done. A head that moved during it (or that it could not
        write) is written once head_interval has passed, so an idle gateway's is current."""
        self._heading = False
        if self._running and self._head != self._head_on_file:
            self._write_head_when_due()
        self._sync_done.set()

    def _synced(self, failure: BaseException | None) -> None:
        self._syncing = False
        pending, self._sync_pending = self._sync_pending, None
        if pending is not None:
            self.log.sync_end(pending, ok=failure is None)
        covered = self._sync_covers
        assert covered is not None  # a pass starts after a write (_flush) or for one (below)
        unsynced = self._unsynced
        seq = covered.seq
        writes = self._writes
        if failure is None and writes and writes[0][0] <= seq:
            assert self._loop is not None
            now = self._loop.time()
            while writes and writes[0][0] <= seq:
                self.commit_seconds.observe(now - writes.popleft()[1])
        else:
            while writes and writes[0][0] <= seq:
                writes.popleft()
        if failure is not None:
            log.error("audit log fdatasync failed: %s", failure)
            self._log_state(False, f"fdatasync failed: {failure}")
            error = AuditUnavailable(f"audit log fdatasync failed: {failure}")
            while unsynced and unsynced[0][0] <= seq:
                w = unsynced.popleft()[1]
                if not w.done():
                    w.set_exception(error)
        else:
            chain = self.chain.name
            while unsynced and unsynced[0][0] <= seq:
                s, w = unsynced.popleft()
                if not w.done():
                    w.set_result(f"{chain}:{s}")
            if self._write_ok:
                self._log_state(True)
            self._after_commit(covered)
        timers = self._timers
        while timers and timers[0][0] <= seq:
            timers.popleft()[1].cancel()
        if self._written > seq:
            self._start_sync()  # what was written meanwhile: the next group
        self._sync_done.set()

    # -- the spool ----------------------------------------------------------------------------

    def _keep(self, kept: list[PendingRecord]) -> None:
        if not kept:
            return
        self.spool.keep(kept)
        if self._spool_timer is None and self._loop is not None:
            self._spool_timer = self._loop.call_later(self.spool_retry, self._resend_spool)

    def _resend_spool(self, most: int | None = Spool.chunk) -> None:
        self._spool_timer = None
        if self._running and self._loop is not None:
            for p in self.spool.take(most):
                self._queue(p, None, urgent=False)
