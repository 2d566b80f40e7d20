"""Feeding an audit store (the searchable index) from the audit log, off the statement path.

Delivery is at least once and inserts are idempotent: each batch is sealed onto the store's
own tail (the store reads it under its write lock), so records the store already holds are
skipped, whoever put them there (this gateway before a crash, `pgwarden audit` catching up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from itertools import islice

from gateway.audit.chain import ChainTail, SealedRecord
from gateway.audit.log import AuditLog
from gateway.audit.store import AuditStore

log = logging.getLogger("pgwarden.audit")


def _tail_after(records: list[SealedRecord], tail: ChainTail) -> ChainTail:
    if not records:
        return tail
    last = records[-1]
    return ChainTail.after(last.seq, last.link, last.epoch, last.kind)


class LogIndexer:
    """Copies what the log holds into the store, in seq order, batch by batch.

    Records just written are handed over in memory (`add`); what is not in memory (a
    backlog at start, records dropped while the store was down) is read back from the log.
    `lag` is how many records the log holds that the store is not known to.
    """

    def __init__(
        self,
        store: AuditStore,
        audit_log: AuditLog,
        chain: str,
        *,
        max_batch: int = 5000,
        memory_limit: int = 200_000,
        retry: float = 0.5,
    ) -> None:
        self.store = store
        self.log = audit_log
        self.chain = chain
        self.max_batch = max_batch
        self.memory_limit = memory_limit
        self.retry = retry
        self.logged_seq = 0
        self.indexed_seq = 0
        self.last_error: str | None = None
        self._queue: list[SealedRecord] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def lag(self) -> int:
        return max(self.logged_seq - self.indexed_seq, 0)

    def add(self, sealed: list[SealedRecord]) -> None:
        """Records now in the log (called on the writer's loop after each write)."""
        self._queue.extend(sealed)
        self.logged_seq = sealed[-1].seq
        if len(self._queue) > self.memory_limit:
            # The store is far behind: keep memory flat, read these back from the log later.
            del self._queue[: len(self._queue) - self.memory_limit // 2]
        self._idle.clear()
        self._wake.set()

    def start(self, logged_seq: int) -> None:
        self.logged_seq = logged_seq
        self._task = asyncio.create_task(self._run(), name="audit-index")
        self._wake.set()

    async def _run(self) -> None:
        failing = False
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while True:
                    done = await self.store.append(self.chain, self._seal)
                    if done:
                        self._indexed(done[-1].seq)
                    if not done or self.indexed_seq >= self.logged_seq:
                        break
                if failing:
                    log.warning(
                        "audit index: the store takes records again",
                        extra={"event": "audit_store_up"},
                    )
                failing, self.last_error = False, None
                self._idle.set()
            except Exception as exc:  # the index must outlive any store failure
                self.last_error = str(exc)
                if not failing:
                    log.warning(
                        "audit index: store failed, %d records wait in the log: %s",
                        self.lag,
                        exc,
                        extra={"event": "audit_store_down"},
                    )
                failing = True
                if self._stopping:
                    self._idle.set()
                    return
                await asyncio.sleep(self.retry)
                self._wake.set()

    def _indexed(self, seq: int) -> None:
        self.indexed_seq = max(self.indexed_seq, seq)
        queue = self._queue
        i = 0
        while i < len(queue) and queue[i].seq <= seq:
            i += 1
        del queue[:i]

    def _seal(
        self, tail: ChainTail, _stored: frozenset[bytes] = frozenset()
    ) -> tuple[list[SealedRecord], ChainTail]:
        """The next batch after the store's tail (runs where the store commits). Records of
        the log are never re-sent: idempotent by their seq."""
        self.indexed_seq = max(self.indexed_seq, tail.seq)
        queue = list(self._queue)  # a snapshot: the loop may add to it meanwhile
        start = next((i for i, s in enumerate(queue) if s.seq > tail.seq), len(queue))
        if start < len(queue) and queue[start].seq == tail.seq + 1:
            batch = queue[start : start + self.max_batch]
        else:
            batch = records_after(self.log, tail.seq, self.max_batch)
        return batch, _tail_after(batch, tail)

    async def caught_up(self, within: float) -> bool:
        """Whether the store holds all the log does (waiting up to `within` seconds)."""
        if self.lag:
            self._idle.clear()
            self._wake.set()
            try:
                await asyncio.wait_for(self._idle.wait(), within)
            except TimeoutError:
                return False
        return not self.lag and self.last_error is None

    async def close(self, within: float) -> None:
        """Index what the log holds (for up to `within` seconds), then stop."""
        if self._task is None:
            return
        self._stopping = True
        if self.lag:
            self._wake.set()
            try:
                await asyncio.wait_for(self._idle.wait(), within)
            except TimeoutError:
                log.warning("audit index: %d records left to index at the next start", self.lag)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None


def records_after(audit_log: AuditLog, seq: int, most: int) -> list[SealedRecord]:
    return [e.sealed() for e in islice(audit_log.entries(seq), most)]


async def index_from_log(store: AuditStore, audit_log: AuditLog, chain: str) -> int:
    """Bring the store up to the log (what `pgwarden audit` does before it reads); how many
    records were added. Safe beside a running gateway: inserts are idempotent."""
    added = 0
    while True:
        batch = await store.append(chain, lambda tail, _: _sealed_after(audit_log, tail))
        if not batch:
            return added
        added += len(batch)


def _sealed_after(audit_log: AuditLog, tail: ChainTail) -> tuple[list[SealedRecord], ChainTail]:
    batch = records_after(audit_log, tail.seq, 5000)
    return batch, _tail_after(batch, tail)
