"""The audit sink: records of one chain group-committed by a single writer task."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from gateway.audit.chain import Anchor, AuditChain, ChainTail, PendingRecord, SealedRecord
from gateway.audit.events import SessionEvent, StatementOutcome, StatementRequest
from gateway.audit.keys import AuditKeyring, HeadWitness
from gateway.audit.records import (
    canonical,
    outcome_record,
    record_id,
    request_record,
    session_record,
)
from gateway.audit.store import AuditStore, AuditStoreError
from gateway.proxy.ports import AuditUnavailable

log = logging.getLogger("pgwarden.audit")


@dataclass(slots=True)
class _Append:
    pending: PendingRecord
    done: asyncio.Future[str]


@dataclass(slots=True)
class _Prune:
    cutoff: float
    done: asyncio.Future[Anchor | None]


_STOP = object()
# Record kinds whose caller waits for durability before a statement may run.
_URGENT = frozenset({"request", "key_rotation"})


def _expire(done: asyncio.Future[str], timeout: float) -> None:
    if not done.done():
        done.set_exception(
            AuditUnavailable(f"audit store did not confirm the record within {timeout:g}s")
        )


def _log_lost_outcome(done: asyncio.Future[str]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("audit outcome record lost: %s", done.exception())


class AuditWriter:
    """Implements the proxy's AuditSink over an AuditStore.

    Callers queue records and await their own future; one task takes everything queued,
    seals it onto the chain and commits it in one transaction (one fsync), then resolves the
    futures. While a commit is in flight the next batch gathers, so throughput grows with
    concurrency instead of durability serialising the gateway.

    `request()` returns only once its record is committed, and raises AuditUnavailable when
    the store fails or does not confirm within `timeout`. A record whose caller timed out may
    still be committed later: the trail then shows a request without an outcome. Outcome and
    session records are awaited the same way but only logged on failure, since the
    statement has already run (or the session already ended) by then.
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
        self._queue: asyncio.Queue[_Append | _Prune | object] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        # How long outcome/session records wait for a request record to commit with.
        self.linger = 0.005
        self.head_interval = 0.05
        self._head: tuple[int, bytes] | None = None
        self._head_written = 0.0
        self._head_flush: asyncio.TimerHandle | None = None
        self._concurrent = bool(getattr(store, "concurrent_appends", False))
        self._inflight: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        try:
            await self.store.open()
        except AuditStoreError as exc:
            # Not fatal: every batch retries the store, and requests fail closed meanwhile.
            log.warning("audit store not available at start: %s", exc)
        self._task = asyncio.create_task(self._run(), name=f"audit-writer-{self.chain.name}")

    async def close(self) -> None:
        """Commit what is queued, stop the writer task and close the store."""
        if self._task is not None:
            self._queue.put_nowait(_STOP)
            await self._task
            self._task = None
        await self.store.close()

    async def __aenter__(self) -> AuditWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- AuditSink -------------------------------------------------------------------------

    async def request(self, record: StatementRequest) -> str:
        body = request_record(record)
        # Encoded here, while the previous batch commits, not on the commit's critical path.
        pending = PendingRecord("request", record.time, body, canonical(body))
        try:
            return await self._append(pending)
        except AuditUnavailable:
            if not self.fail_open:
                raise
            log.error("audit store down, statement runs unaudited (fail_open): %s", record.text)
            return ""

    async def outcome(self, record: StatementOutcome) -> None:
        body = outcome_record(record, self.rows_limit, self.bytes_limit)
        await self._append_logged(PendingRecord("outcome", record.time, body, canonical(body)))

    def outcome_nowait(self, record: StatementOutcome) -> None:
        """outcome() without a task or a timer per record: nobody waits for an outcome,
        so it is queued with a callback that logs a failure."""
        body = outcome_record(record, self.rows_limit, self.bytes_limit)
        pending = PendingRecord("outcome", record.time, body, canonical(body))
        if self._task is None or self._task.done():
            log.error("audit outcome record lost: audit writer is not running")
            return
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_log_lost_outcome)
        self._queue.put_nowait(_Append(pending, done))

    async def session(self, event: SessionEvent) -> None:
        body = session_record(event)
        await self._append_logged(PendingRecord(event.kind, event.time, body, canonical(body)))

    # -- chain maintenance -----------------------------------------------------------------

    async def rotate_key(self) -> str:
        """Append a rotation record and move to the next key; the old key is destroyed."""
        return await self._append(PendingRecord("key_rotation", time.time(), {}))

    async def prune(self, older_than: float) -> Anchor | None:
        """Delete this chain's records from before `older_than` (unix time), leaving an anchor."""
        done: asyncio.Future[Anchor | None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Prune(older_than, done))
        try:
            return await done
        except Exception as exc:
            raise AuditUnavailable(f"audit prune failed: {exc}") from exc

    # -- the writer task -------------------------------------------------------------------

    async def _append(self, pending: PendingRecord) -> str:
        if self._task is None or self._task.done():
            raise AuditUnavailable("audit writer is not running")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        self._queue.put_nowait(_Append(pending, done))
        # A timer that fails the future is much cheaper per record than asyncio.wait_for.
        timer = loop.call_later(self.timeout, _expire, done, self.timeout)
        try:
            return await done
        except AuditUnavailable:
            raise
        except Exception as exc:
            raise AuditUnavailable(f"audit store failed: {exc}") from exc
        finally:
            timer.cancel()

    async def _append_logged(self, pending: PendingRecord) -> None:
        try:
            await self._append(pending)
        except AuditUnavailable as exc:
            log.error("audit %s record lost: %s", pending.kind, exc)

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[_Append] = []
            item = await self._queue.get()
            urgent = False
            while True:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, _Prune):
                    await self._dispatch(batch)
                    batch = []
                    await self._drain_commits()
                    await self._prune(item)
                elif isinstance(item, _Append):
                    batch.append(item)
                    # A statement waits on its request record; outcome and session records
                    # may wait a little to share the next request's fsync.
                    urgent = urgent or item.pending.kind in _URGENT
                if stopping or len(batch) >= self.max_batch:
                    break
                if self._queue.empty():
                    if urgent or not batch:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), self.linger)
                    except TimeoutError:
                        break
                    continue
                item = self._queue.get_nowait()
            await self._dispatch(batch)
        await self._drain_commits()
        self._write_head()

    async def _dispatch(self, batch: list[_Append]) -> None:
        if not batch:
            return
        if not self._concurrent or any(a.pending.kind == "key_rotation" for a in batch):
            # One commit at a time; a rotation changes the key that seals what follows.
            await self._drain_commits()
            await self._commit(batch)
            return
        # The store commits appends in call order and joins those that queue up behind a
        # commit into its next one: the next batch need not wait for this one to land.
        task = asyncio.ensure_future(self._commit(batch))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _drain_commits(self) -> None:
        while self._inflight:
            await asyncio.wait(list(self._inflight))

    async def _commit(self, batch: list[_Append]) -> None:
        if not batch:
            return
        pendings = [a.pending for a in batch]
        try:
            sealed = await self.store.append(
                self.chain.name, lambda tail: self.chain.seal(tail, pendings)
            )
            self._after_commit(sealed[-1])
        except Exception as exc:
            log.warning("audit commit of %d records failed: %s", len(batch), exc)
            failure = AuditUnavailable(f"audit store failed: {exc}")
            for a in batch:
                if not a.done.done():
                    a.done.set_exception(failure)
            return
        for a, s in zip(batch, sealed, strict=True):
            if not a.done.done():
                a.done.set_result(record_id(s.chain, s.seq))

    async def _prune(self, item: _Prune) -> None:
        sealed: list[SealedRecord] = []

        def seal(tail: ChainTail, through: ChainTail) -> tuple[SealedRecord, Anchor]:
            record, anchor = self.chain.seal_prune(tail, through, item.cutoff, time.time())
            sealed.append(record)
            return record, anchor

        try:
            anchor = await self.store.prune(self.chain.name, item.cutoff, seal)
            if anchor is not None:
                self._after_commit(sealed[-1])
        except Exception as exc:
            if not item.done.done():
                item.done.set_exception(exc)
            return
        if not item.done.done():
            item.done.set_result(anchor)

    def _after_commit(self, last: SealedRecord) -> None:
        next_epoch = last.epoch + 1 if last.kind == "key_rotation" else last.epoch
        if next_epoch != self.chain.epoch:
            # The rotation record is committed first, the key file replaced second: a crash
            # in between leaves an old key that the next start hashes forward again.
            key = self.chain.advance(next_epoch)
            if self.keyring is not None:
                self.keyring.replace_current(self.chain.name, next_epoch, key)
        self._head = (last.seq, last.link)
        # The head file is a witness against truncation; it may lag the store (verify
        # accepts that) so it is rewritten at most every head_interval, not per commit.
        wait = self.head_interval - (time.monotonic() - self._head_written)
        if wait <= 0:
            self._write_head()
        elif self._head_flush is None:
            # Catch up once the interval has passed, so an idle gateway's head is current.
            self._head_flush = asyncio.get_running_loop().call_later(wait, self._write_head)

    def _write_head(self) -> None:
        if self._head_flush is not None:
            self._head_flush.cancel()
            self._head_flush = None
        if self.head is not None and self._head is not None:
            self.head.record(self.chain.name, *self._head)
            self._head_written = time.monotonic()
