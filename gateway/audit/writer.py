"""The audit sink: records of one chain group-committed, in call order, by the store."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Generic, TypeVar

from gateway.audit.chain import (
    Anchor,
    AuditChain,
    ChainTail,
    PendingRecord,
    SealedRecord,
    record_key,
)
from gateway.audit.events import (
    ApprovalEvent,
    SessionEvent,
    StatementOutcome,
    StatementRequest,
)
from gateway.audit.keys import AuditKeyring, HeadWitness
from gateway.audit.records import (
    approval_record,
    canonical,
    outcome_record,
    request_record,
    session_record,
)
from gateway.audit.store import AuditStore, AuditStoreError, CommitResult, Seal
from gateway.metrics import Latencies
from gateway.proxy.ports import AuditUnavailable

log = logging.getLogger("pgwarden.audit")

T = TypeVar("T")

# One waiter per queued record, or None for a record nobody waits on (an outcome: the
# statement has run; a session event): losing one of those is logged.
Waiter = asyncio.Future[str] | None
# What became of each record of a committed batch, in order: its sealed record, or None
# where it was sent again and the store already held it (it is not stored twice).
Placed = list[SealedRecord | None]


def placed(pending: list[PendingRecord], sealed: list[SealedRecord]) -> Placed:
    """Each pending record's sealed record (see Placed). A chain_gap record that the seal
    put first stands for none of them."""
    i = 0
    while i < len(sealed) and sealed[i].kind == "chain_gap":
        i += 1
    out: Placed = []
    for p in pending:
        if i < len(sealed) and (not p.resent or sealed[i].key == p.key):
            out.append(sealed[i])
            i += 1
        else:
            out.append(None)
    return out


def resendable(p: PendingRecord, resent: bool = False) -> PendingRecord:
    """A record nobody waits on, with its key: if its commit fails it is sent again, and
    the store must be able to tell it is already there. (Made anew: cheaper than
    _replace, once per outcome.)"""
    assert p.encoded is not None
    return PendingRecord(p.kind, p.time, p.record, p.encoded, record_key(p.kind, p.encoded), resent)


def fail_requests(waiters: Iterable[Waiter], failure: AuditUnavailable) -> None:
    """Fail the waiters of request records (their statements do not run)."""
    for w in waiters:
        if w is not None and not w.done():
            w.set_exception(failure)


class Spool(Generic[T]):
    """Outcome and session records the store did not take, kept to be sent again.

    Their statements have already run (or their sessions ended): dropping them would leave
    requests without outcomes. Bounded, so that a long outage costs memory only up to
    `limit` records; what does not fit is logged and counted in `lost`. They are sent again
    `chunk` at a time: a store that is still down fails one small commit, not all of them.
    """

    chunk = 1000

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lost = 0
        self._items: collections.deque[T] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def keep(self, items: list[T]) -> None:
        room = max(self.limit - len(self._items), 0)
        if len(items) > room:
            self.drop(len(items) - room, f"the spool is full ({self.limit} records)")
            items = items[:room]
        self._items.extend(items)

    def take(self, most: int | None = None) -> list[T]:
        """The oldest `most` records (all by default), no longer in the spool."""
        items = self._items
        if most is None or most >= len(items):
            out = list(items)
            items.clear()
            return out
        return [items.popleft() for _ in range(most)]

    def drop(self, count: int, why: str) -> None:
        self.lost += count
        log.error("audit: %d outcome or session records lost: %s", count, why)


def expire_waiters(waiters: list[Waiter], timeout: float) -> None:
    """A timer's end: waiters still waiting fail (their records may still commit later)."""
    failure = AuditUnavailable(f"audit store did not confirm the record within {timeout:g}s")
    for w in waiters:
        if w is not None and not w.done():
            w.set_exception(failure)


def durable_or_fail_open(
    queue: Callable[[], asyncio.Future[str]], *, fail_open: bool, text: str
) -> asyncio.Future[str]:
    """A request record's id once committed, as a future (a statement relayed from a data
    callback waits on it without a task). If the store cannot take it, AuditUnavailable,
    or (audit.fail_open) an empty id: the statement then runs unaudited, and it is logged."""
    try:
        committed = queue()
    except AuditUnavailable as exc:
        committed = asyncio.get_running_loop().create_future()
        committed.set_exception(exc)
    if not fail_open:
        return committed
    settled: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def settle(done: asyncio.Future[str]) -> None:
        if settled.done():
            return
        if done.cancelled():
            settled.cancel()
            return
        exc = done.exception()
        if isinstance(exc, AuditUnavailable):
            log.error("audit store down, statement runs unaudited (fail_open): %s", text)
            settled.set_result("")
        elif exc is not None:
            settled.set_exception(exc)
        else:
            settled.set_result(done.result())

    committed.add_done_callback(settle)
    return settled


class ChainGap(AuditStoreError):
    """The store ends before the record the head witness names: records were lost. The
    writer will not seal new records onto such a tail without the operator's consent."""


class BatchClock:
    """When a batch of queued records leaves: at the end of the current event-loop pass
    (`soon`, someone waits on it), or `linger` later (nobody waits: it may ride with the
    next one). `flush` is called once either way; it calls `fired()` first."""

    __slots__ = ("_flush", "_soon", "_timer", "linger")

    def __init__(self, flush: Callable[[], None], linger: float = 0.005) -> None:
        self._flush = flush
        self.linger = linger
        self._soon = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def soon_pending(self) -> bool:
        return self._soon

    def soon(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._soon:
            self._soon = True
            loop.call_soon(self._flush)

    def later(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._soon and self._timer is None:
            self._timer = loop.call_later(self.linger, self._flush)

    def fired(self) -> None:
        self._soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ChainHeadKeeper:
    """After a record is durable: move the key past a rotation record, keep the head
    witness current and `position` (the last durable seq, for the admin listener). Shared by
    the writers that make records durable (store or log)."""

    chain: AuditChain
    position: int | None
    keyring: AuditKeyring | None
    head: HeadWitness | None
    head_interval: float
    _head: tuple[int, bytes] | None
    _head_written: float
    _head_flush: asyncio.TimerHandle | None
    _loop: asyncio.AbstractEventLoop | None

    def _after_commit(self, last: SealedRecord) -> None:
        self.position = last.seq
        next_epoch = last.epoch + 1 if last.kind == "key_rotation" else last.epoch
        if next_epoch != self.chain.epoch:
            # The rotation record is committed first, the key file replaced second: a crash
            # in between leaves an old key that the next start hashes forward again.
            key = self.chain.advance(next_epoch)
            if self.keyring is not None:
                self.keyring.replace_current(self.chain.name, next_epoch, key)
        self._head = (last.seq, last.link)
        self._write_head_when_due()

    def _write_head_when_due(self) -> None:
        # The head file is a witness against truncation; it may lag the store (verify
        # accepts that) so it is rewritten at most every head_interval, not per commit.
        wait = self.head_interval - (time.monotonic() - self._head_written)
        if wait <= 0:
            self._write_head()
        elif self._head_flush is None and self._loop is not None:
            # Catch up once the interval has passed, so an idle gateway's head is current.
            self._head_flush = self._loop.call_later(wait, self._write_head)

    def _write_head(self) -> None:
        if self._head_flush is not None:
            self._head_flush.cancel()
            self._head_flush = None
        if self.head is not None and self._head is not None:
            self.head.record(self.chain.name, *self._head)
            self._head_written = time.monotonic()


class BatchedRecords:
    """Records queued for the next batch, with their waiters, and when that batch leaves
    (BatchClock): the part the store writer and the log writer share."""

    _pending: list[PendingRecord]
    _waiters: list[Waiter]
    _loop: asyncio.AbstractEventLoop | None
    _clock: BatchClock
    max_batch: int

    def _queue(self, pending: PendingRecord, waiter: Waiter, *, urgent: bool) -> None:
        self._pending.append(pending)
        self._waiters.append(waiter)
        assert self._loop is not None
        if urgent or len(self._pending) >= self.max_batch:
            # Everything queued in this pass of the event loop goes in one batch.
            self._clock.soon(self._loop)
        else:
            self._clock.later(self._loop)

    @property
    def linger(self) -> float:
        return self._clock.linger

    @linger.setter
    def linger(self, value: float) -> None:
        self._clock.linger = value


class AuditWriter(BatchedRecords, ChainHeadKeeper):
    """Implements the proxy's AuditSink over an AuditStore.

    Records queue in call order. A request record (its statement waits on it) sends what is
    queued to the store at the end of the current event-loop pass; outcome and session
    records wait up to `linger` to share the next request's commit. Each batch is one store
    transaction (one fsync); a store that takes concurrent appends (SQLite) joins batches
    that queue behind a commit into its next one, others get one batch at a time. So
    throughput grows with concurrency instead of durability serialising the gateway, and a
    record costs a list append plus, for a request, one future: no task, timer or queue
    item per record.

    `request()` returns only once its record is committed, and raises AuditUnavailable when
    the store fails or does not confirm within `timeout`. A record whose caller timed out may
    still be committed later: the trail then shows a request without an outcome. Outcome and
    session records are only logged on failure, since the statement has already run (or the
    session already ended) by then.
    """

    def __init__(
        self,
        store: AuditStore,
        chain: AuditChain,
        *,
        keyring: AuditKeyring | None = None,
        head: HeadWitness | None = None,
        timeout: float = 2.0,
        rows_limit: int = 100,
        bytes_limit: int = 65536,
        fail_open: bool = False,
        max_batch: int = 2000,
        accept_gap: bool = False,
        spool_limit: int = 100_000,
        spool_retry: float = 0.5,
    ) -> None:
        self.store = store
        self.chain = chain
        self.keyring = keyring
        self.head = head
        self.timeout = timeout
        self.rows_limit = rows_limit
        self.bytes_limit = bytes_limit
        self.fail_open = fail_open
        self.max_batch = max_batch
        # The operator's consent to bridge a gap found at this start with a chain_gap record.
        self.accept_gap = accept_gap
        # Records nobody waits on that a commit failed, sent again every spool_retry (not
        # in the audit process: its gateway keeps them, see on_commit).
        self.spool: Spool[PendingRecord] = Spool(spool_limit)
        self.spool_retry = spool_retry
        self._spool_timer: asyncio.TimerHandle | None = None
        # How long outcome/session records wait for a request record to commit with.
        self._clock = BatchClock(self._flush)
        self.head_interval = 0.05
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._pending: list[PendingRecord] = []
        self._waiters: list[Waiter] = []
        # Fails queued requests that cannot go to the store yet (see _defer).
        self._watch: asyncio.TimerHandle | None = None
        # Set while a key rotation or a prune has the chain to itself: records queue.
        self._held = False
        self._exclusive_lock = asyncio.Lock()
        self._inflight = 0
        self._settled = asyncio.Event()
        self._settled.set()
        submit = getattr(store, "submit", None)
        self._concurrent = submit is not None and bool(getattr(store, "concurrent_appends", False))
        self._store_submit: Callable[[str, Seal, Callable[[CommitResult], None]], None] = (
            submit if submit is not None else self._submit_task
        )
        self._head: tuple[int, bytes] | None = None
        self._head_written = 0.0
        self._head_flush: asyncio.TimerHandle | None = None
        # Told of every commit, in order: how many records it held and what came of each
        # (or why none was stored).
        self.on_commit: Callable[[int, Placed | BaseException], None] | None = None
        # For the admin listener: the last committed record's seq, the time from a batch's
        # submission to its commit, and whether the store took the last batch.
        self.position: int | None = None
        self.commit_seconds = Latencies()
        self.restarts = 0
        # Records are indexed as they are committed (the store is the log).
        self.index_lag = 0
        self.store_ok = True

    async def start(self) -> None:
        """Open the store. Raises ChainGap if the store is behind the head witness and the
        operator did not consent to bridging the gap (`accept_gap`)."""
        if self.head is not None:
            # Never seal onto a tail before the last record this chain is known to have had.
            self._head = self.head.read(self.chain.name)
        try:
            await self.store.open()
        except AuditStoreError as exc:
            # Not fatal: every batch retries the store, and requests fail closed meanwhile
            # (a gap found then refuses the batch: see _seal).
            log.warning("audit store not available at start: %s", exc)
        else:
            await self._check_continuity()
        self._loop = asyncio.get_running_loop()
        self._running = True

    async def _check_continuity(self) -> None:
        head = self._head
        if head is None:
            return
        try:
            last_seen = await self.store.get(self.chain.name, head[0])
        except AuditStoreError as exc:
            log.warning("audit store not readable at start: %s", exc)
            return
        if last_seen is not None and last_seen.link == head[1]:
            return
        if not self.accept_gap:
            raise ChainGap(self._gap_message(head[0]))
        log.error(
            "audit: %s; continuing the chain after it with a chain_gap record (accepted by "
            "the operator)",
            self._gap_message(head[0], advice=False),
        )

    def _gap_message(self, seq: int, *, advice: bool = True) -> str:
        chain = self.chain.name
        message = (
            f"the audit store is behind its head witness: chain {chain} reached seq {seq}, "
            f"but the store does not hold that record (deleted, truncated or restored from an "
            f"older copy)"
        )
        if advice:
            message += (
                "; refusing to start a new chain over the evidence. `pgwarden audit verify` "
                "names what is missing; to start anyway and record the lost range in the "
                "chain, run `pgwarden serve --accept-audit-gap` once"
            )
        return message

    async def close(self) -> None:
        """Commit what is queued, wait for it, and close the store."""
        if self._running:
            # One last try for all that the store did not take before.
            self._resend_spool(None)
            self._running = False
            async with self._exclusive_lock:
                await self._drain()
            self._write_head()
        if self._spool_timer is not None:
            self._spool_timer.cancel()
            self._spool_timer = None
        if self.spool:
            self.spool.drop(len(self.spool.take()), "the store did not take them by shutdown")
        await self.store.close()

    async def __aenter__(self) -> AuditWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- AuditSink -------------------------------------------------------------------------

    async def request(self, record: StatementRequest) -> str:
        return await self.request_soon(record)

    def request_soon(self, record: StatementRequest) -> asyncio.Future[str]:
        return durable_or_fail_open(
            partial(self._committed_request, record), fail_open=self.fail_open, text=record.text
        )

    def _committed_request(self, record: StatementRequest) -> asyncio.Future[str]:
        if not self._running or self._loop is None:
            raise AuditUnavailable("audit writer is not running")
        body = request_record(record)
        waiter: asyncio.Future[str] = self._loop.create_future()
        self._queue(
            PendingRecord("request", record.time, body, canonical(body)), waiter, urgent=True
        )
        return waiter

    async def outcome(self, record: StatementOutcome) -> None:
        self.outcome_nowait(record)

    def outcome_nowait(self, record: StatementOutcome) -> None:
        """Queue an outcome record: nobody waits for it; a failure to store it is logged."""
        body = outcome_record(record, self.rows_limit, self.bytes_limit)
        self._queue_logged(PendingRecord("outcome", record.time, body, canonical(body)))

    async def session(self, event: SessionEvent) -> None:
        body = session_record(event)
        self._queue_logged(PendingRecord(event.kind, event.time, body, canonical(body)))

    async def approval(self, event: ApprovalEvent) -> None:
        body = approval_record(event)
        self._queue_logged(PendingRecord("approval", event.time, body, canonical(body)))

    # -- chain maintenance -----------------------------------------------------------------

    async def rotate_key(self) -> str:
        """Append a rotation record and move to the next key; the old key is destroyed."""
        pending = [PendingRecord("key_rotation", time.time(), {})]
        chain = self.chain
        sealed = await self._exclusive(
            lambda: self.store.append(chain.name, partial(self._seal, pending=pending))
        )
        self._after_commit(sealed[-1])
        return f"{sealed[-1].chain}:{sealed[-1].seq}"

    async def prune(self, older_than: float) -> Anchor | None:
        """Delete this chain's records from before `older_than` (unix time), leaving an anchor."""
        made: list[SealedRecord] = []

        def seal(tail: ChainTail, through: ChainTail) -> tuple[SealedRecord, Anchor]:
            record, anchor = self.chain.seal_prune(tail, through, older_than, time.time())
            made.append(record)
            return record, anchor

        anchor = await self._exclusive(lambda: self.store.prune(self.chain.name, older_than, seal))
        if anchor is not None:
            self._after_commit(made[-1])
        return anchor

    async def _exclusive(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run `op` with the chain to itself: what was queued before is committed first,
        what is queued meanwhile waits for it (a rotation changes the key that seals it)."""
        if not self._running:
            raise AuditUnavailable("audit writer is not running")
        async with self._exclusive_lock:
            try:
                await self._drain()
                self._held = True
                return await op()
            except AuditUnavailable:
                raise
            except Exception as exc:
                raise AuditUnavailable(f"audit store failed: {exc}") from exc
            finally:
                self._held = False
                if self._pending:
                    self._flush()

    async def _drain(self) -> None:
        """Until nothing is queued or in flight."""
        while self._pending or self._inflight:
            if self._pending:
                self._flush()
            await self._settled.wait()

    # -- batching --------------------------------------------------------------------------

    def append(self, pending: PendingRecord, *, urgent: bool) -> bool:
        """Queue an encoded record nobody awaits (its commit is told to `on_commit`);
        `urgent` sends it at the end of this loop pass rather than after `linger`."""
        if not self._running or self._loop is None:
            return False
        self._queue(pending, None, urgent=urgent)
        return True

    def _queue_logged(self, pending: PendingRecord) -> None:
        if not self.append(resendable(pending), urgent=False):
            log.error("audit %s record lost: audit writer is not running", pending.kind)

    def _flush(self) -> None:
        self._clock.fired()
        if not self._pending:
            return
        if self._held or (self._inflight and not self._concurrent):
            self._defer()
            return
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        pending, waiters = self._pending, self._waiters
        self._pending, self._waiters = [], []
        assert self._loop is not None
        timer = self._loop.call_later(self.timeout, expire_waiters, waiters, self.timeout)
        self._inflight += 1
        self._settled.clear()
        self._store_submit(
            self.chain.name,
            partial(self._seal, pending=pending),
            partial(self._committed, pending, waiters, timer, self._loop.time()),
        )

    def _seal(
        self, tail: ChainTail, stored: frozenset[bytes], pending: list[PendingRecord]
    ) -> tuple[list[SealedRecord], ChainTail]:
        """Seal a batch onto the store's tail, unless that tail is behind the last record
        this chain is known to have had (store wiped or restored while it was closed or even
        while the gateway runs): then refuse, or with consent bridge the gap first. Re-sent
        records the store already holds (`stored`) are left out."""
        if stored:
            pending = [p for p in pending if not (p.resent and p.key in stored)]
        head = self._head
        if head is not None and (
            tail.seq < head[0] or (tail.seq == head[0] and tail.link != head[1])
        ):
            if not self.accept_gap:
                raise ChainGap(self._gap_message(head[0]))
            gap = PendingRecord(
                "chain_gap",
                time.time(),
                {
                    "lost_from": tail.seq + 1 if tail.seq < head[0] else head[0],
                    "lost_through": head[0],
                    "store_ended_at": tail.seq,
                    "witness_link": head[1].hex(),
                    "reason": "store behind its head witness; accepted by the operator",
                },
            )
            # Linked to the last link the witness saw: the new records extend the old chain.
            tail = ChainTail(head[0], head[1], self.chain.epoch)
            pending = [gap, *pending]
        return self.chain.seal(tail, pending)

    def _defer(self) -> None:
        """Queued records wait for the store (a commit in flight that this store must not
        overlap, or a rotation or prune): their requests still fail after `timeout`."""
        if self._watch is None and self._loop is not None:
            self._watch = self._loop.call_later(self.timeout, self._expire_queued)

    def _expire_queued(self) -> None:
        self._watch = None
        expire_waiters(self._waiters, self.timeout)

    def _submit_task(self, chain: str, seal: Seal, done: Callable[[CommitResult], None]) -> None:
        """For stores without a callback path: one task per batch."""

        def finished(task: asyncio.Task[list[SealedRecord]]) -> None:
            if task.cancelled():
                done(AuditStoreError("audit commit cancelled"))
            else:
                done(task.exception() or task.result())

        asyncio.ensure_future(self.store.append(chain, seal)).add_done_callback(finished)

    def _committed(
        self,
        pending: list[PendingRecord],
        waiters: list[Waiter],
        timer: asyncio.TimerHandle,
        submitted: float,
        result: CommitResult,
    ) -> None:
        timer.cancel()
        self._inflight -= 1
        if self._loop is not None:
            self.commit_seconds.observe(self._loop.time() - submitted)
        self._store_state(not isinstance(result, BaseException), result)
        told: Placed | BaseException
        if isinstance(result, BaseException):
            told = result
            log.warning("audit commit of %d records failed: %s", len(waiters), result)
            fail_requests(waiters, AuditUnavailable(f"audit store failed: {result}"))
            if self.on_commit is None:
                self.spool.keep([p for p, w in zip(pending, waiters, strict=True) if w is None])
                self._retry_spool()
        else:
            self.accept_gap = False  # consent was for the tail found at this start
            if result:
                self._after_commit(result[-1])
            told = places = placed(pending, result)
            for w, s in zip(waiters, places, strict=True):
                if w is not None and not w.done():
                    if s is None:  # never: a record someone waits on is not sent again
                        w.set_exception(AuditUnavailable("audit record was already stored"))
                    else:
                        w.set_result(f"{s.chain}:{s.seq}")
            if self.spool and self._spool_timer is None:
                self._resend_spool()  # the store takes records again: the next chunk
        if self.on_commit is not None:
            self.on_commit(len(waiters), told)
        if not self._inflight:
            self._settled.set()
        if self._pending and not self._clock.soon_pending and not self._concurrent:
            self._flush()

    def _retry_spool(self) -> None:
        if self.spool and self._spool_timer is None and self._loop is not None:
            self._spool_timer = self._loop.call_later(self.spool_retry, self._resend_spool)

    def _resend_spool(self, most: int | None = Spool.chunk) -> None:
        self._spool_timer = None
        if self._running and self._loop is not None:
            for p in self.spool.take(most):
                # Its commit failed, or was not confirmed: it may be stored already.
                self._queue(p._replace(resent=True), None, urgent=False)

    @property
    def accepting(self) -> bool:
        """The writer runs and takes records (the store may still refuse a commit)."""
        return self._running

    def _store_state(self, ok: bool, result: object) -> None:
        """Whether the store took the last batch; each change is one log line."""
        if ok == self.store_ok:
            return
        self.store_ok = ok
        if ok:
            log.info("audit store up", extra={"event": "audit_store_up"})
        else:
            log.error("audit store down: %s", result, extra={"event": "audit_store_down"})
