"""The embedded audit store: one SQLite file (WAL, synchronous=FULL) driven from one thread."""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import sqlite3
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from gateway.audit.chain import EMPTY_TAIL, Anchor, ChainTail
from gateway.audit.chain import SealedRecord as Sealed
from gateway.audit.store import (
    AuditStoreError,
    CommitResult,
    RecordFilter,
    Seal,
    SealPrune,
    SearchDialect,
    StoredRecord,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_record (
    pos INTEGER PRIMARY KEY,
    chain TEXT NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    session_id TEXT,
    subject TEXT,
    target TEXT,
    action TEXT,
    request_id TEXT,
    text TEXT,
    body BLOB NOT NULL,
    link BLOB NOT NULL,
    record_key BLOB,
    UNIQUE (chain, seq)
);
CREATE INDEX IF NOT EXISTS audit_record_time ON audit_record (time);
CREATE INDEX IF NOT EXISTS audit_record_request ON audit_record (request_id)
    WHERE request_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS audit_anchor (
    chain TEXT PRIMARY KEY,
    through_seq INTEGER NOT NULL,
    through_link BLOB NOT NULL,
    next_epoch INTEGER NOT NULL,
    signed_epoch INTEGER NOT NULL,
    time REAL NOT NULL,
    mac BLOB NOT NULL
);
"""

_COLUMNS = (
    "pos, chain, seq, epoch, kind, time, body, link,"
    " session_id, subject, target, action, request_id, text"
)
_INSERT = (
    "INSERT INTO audit_record (chain, seq, epoch, kind, time, session_id, subject, target,"
    " action, request_id, text, body, link, record_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
# Re-sent records looked up per query (two variables each; SQLite's limit per statement
# is 999 in older builds).
_RESENT_PER_QUERY = 400


# The body is the signed JSON as bytes: read as text for SQLite's JSON functions (a BLOB
# would be taken for JSONB); a body that is not JSON (tampered with: verify names it) matches
# neither test rather than failing the whole search. No masks (an older record) is unmasked.
_BODY = "CAST(body AS TEXT)"
_DIALECT = SearchDialect(
    placeholder=lambda _: "?",
    contains="instr(text, {}) > 0",
    in_group=f"CASE WHEN json_valid({_BODY}) THEN EXISTS (SELECT 1 FROM json_each({_BODY},"  # noqa: S608 - constant text
    " '$.record.principal.groups') WHERE value = {}) ELSE 0 END",
    masked=f"CASE WHEN json_valid({_BODY}) THEN"
    f" coalesce(json_array_length({_BODY}, '$.record.masked_columns'), 0) > 0 ELSE 0 END",
)

# Appends of at most this many records go as one guarded INSERT (14 variables a row, well
# under SQLite's limit); larger batches take the transaction path.
_GUARDED_MAX = 64


@functools.cache
def _guarded_insert(n: int) -> str:
    """One statement that inserts n sealed records only if the chain still ends where the
    writer sealed them onto (its last row has the expected seq and link). A single statement
    is its own transaction: the check and the insert happen under one write lock, with one
    trip into SQLite (and one GIL hand-off) instead of BEGIN, SELECT, n INSERTs and COMMIT."""
    rows = ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?,?,?)"] * n)
    return _GUARDED_HEAD + rows + _GUARDED_TAIL


_GUARDED_HEAD = (
    "INSERT INTO audit_record (chain, seq, epoch, kind, time, session_id, subject, target,"
    " action, request_id, text, body, link, record_key) SELECT * FROM (VALUES "
)
_GUARDED_TAIL = (
    ") WHERE (SELECT seq = ? AND link = ? FROM audit_record WHERE chain = ?"
    " ORDER BY seq DESC LIMIT 1)"
)


@dataclass(slots=True)
class _QueuedAppend:
    chain: str
    seal: Seal
    # Called on the event loop's thread with the sealed records or the failure.
    done: Callable[[CommitResult], None]
    loop: asyncio.AbstractEventLoop


def _seal_all(
    items: list[_QueuedAppend], tail: ChainTail, stored: frozenset[bytes] = frozenset()
) -> tuple[list[list[Sealed]], ChainTail]:
    out: list[list[Sealed]] = []
    for item in items:
        sealed, tail = item.seal(tail, stored)
        out.append(sealed)
    return out, tail


def _resent(out: list[list[Sealed]]) -> list[Sealed]:
    return [s for batch in out for s in batch if s.resent and s.key is not None]


def _settle(results: list[tuple[Callable[[CommitResult], None], CommitResult]]) -> None:
    for done, result in results:
        done(result)


def _resolve(future: asyncio.Future[list[Sealed]], result: CommitResult) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _bytes(value: Any) -> bytes:
    # SQLite columns are not typed: a hand-edited body may come back as TEXT, and it must
    # reach the verifier (and fail there), not crash the reader.
    return value.encode() if isinstance(value, str) else bytes(value)


def _row(r: tuple[Any, ...]) -> StoredRecord:
    return StoredRecord(r[0], r[1], r[2], r[3], r[4], r[5], _bytes(r[6]), _bytes(r[7]), *r[8:])


def _insert_args(s: Sealed) -> tuple[Any, ...]:
    c = s.columns
    return (
        s.chain, s.seq, s.epoch, s.kind, s.time, c["session_id"], c["subject"], c["target"],
        c["action"], c["request_id"], c["text"], s.body, s.link, s.key,
    )  # fmt: skip


class SqliteAuditStore:
    """All work runs on one dedicated thread, which owns the connection, or (inline) on
    the caller's.

    The file's inode is checked before every append: if the file was removed or replaced,
    SQLite would go on writing to the unlinked inode and the records would be lost.
    """

    def __init__(
        self,
        path: Path,
        busy_timeout: float = 2.0,
        synchronous: str = "full",
        *,
        inline: bool = False,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError("audit sqlite synchronous must be full or normal")
        self.path = path
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self.commits = 0
        # Inline: every call does its work on the caller's thread, blocking it (the audit
        # process, whose event loop has nothing else to do, avoids a thread hand-off).
        self.inline = inline
        self._db: sqlite3.Connection | None = None
        self._inode: int | None = None
        self._closed = False
        # Where each chain ended after this store's last commit to it. Valid only while no
        # one else wrote the chain: every use is checked by the guarded INSERT.
        self._tails: dict[str, ChainTail] = {}
        self._appends: collections.deque[_QueuedAppend] = collections.deque()
        self._draining = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pgwarden-audit-sqlite")

    async def _run(self, fn: Callable[[], T]) -> T:
        if self.inline:
            return fn()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, fn)

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        db.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk (WAL fsynced) before COMMIT returns, so a record survives
        # a power loss. NORMAL: in the OS before COMMIT returns (survives the gateway being
        # killed, not the machine losing power) and fsynced at checkpoints.
        db.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(audit_record)")}
        if "record_key" not in columns:  # a store from before it
            db.execute("ALTER TABLE audit_record ADD COLUMN record_key BLOB")
        os.chmod(self.path, 0o600)
        self._db = db
        self._inode = os.stat(self.path).st_ino

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)
        self._thread.shutdown(wait=True)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._open()
        assert self._db is not None
        return self._db

    def _check_file(self) -> None:
        try:
            inode = os.stat(self.path).st_ino
        except OSError as exc:
            raise AuditStoreError(f"audit database {self.path} is gone: {exc}") from exc
        if inode != self._inode:
            raise AuditStoreError(f"audit database {self.path} was replaced")

    def _tail(self, db: sqlite3.Connection, chain: str) -> ChainTail:
        row = db.execute(
            "SELECT seq, link, epoch, kind FROM audit_record WHERE chain = ?"
            " ORDER BY seq DESC LIMIT 1",
            (chain,),
        ).fetchone()
        if row is not None:
            return ChainTail.after(row[0], bytes(row[1]), row[2], row[3])
        anchor = self._anchor(db, chain)
        if anchor is not None:
            return ChainTail(anchor.through_seq, anchor.through_link, anchor.next_epoch)
        return EMPTY_TAIL

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            db = self._conn()
            self._check_file()
            # IMMEDIATE takes the write lock before the tail is read: two writers of one
            # chain (gateway and `audit prune`) cannot both extend the same tail.
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise AuditStoreError(f"audit database {self.path}: {exc}") from exc
        self.commits += 1
        return result

    # The writer may have several appends in flight: this store keeps them in order.
    concurrent_appends = True

    async def append(self, chain: str, seal: Seal) -> list[Sealed]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Sealed]] = loop.create_future()
        self.submit(chain, seal, partial(_resolve, done))
        return await done

    def submit(self, chain: str, seal: Seal, done: Callable[[CommitResult], None]) -> None:
        """Queue an append for the store thread; `done` is called on the event loop with
        the sealed records or the failure. Appends queued while the thread commits go
        together in its next commit (sealed in order, one fsync), so callers may submit
        concurrently: records land in the order of the calls. Inline, the commit is made
        (and `done` called) before this returns."""
        if self.inline:
            item = _QueuedAppend(chain, seal, done, asyncio.get_running_loop())
            done(self._commit_items([item])[0])
            return
        self._appends.append(_QueuedAppend(chain, seal, done, asyncio.get_running_loop()))
        if not self._draining:
            self._draining = True
            self._thread.submit(self._drain)

    def _drain(self) -> None:
        """Store thread: commit queued appends until none are left, without a trip back to
        the event loop between commits."""
        try:
            self._drain_queue()
        except BaseException:
            self._draining = False
            raise

    def _drain_queue(self) -> None:
        queue = self._appends
        while True:
            if not queue:
                self._draining = False
                # An append queued after the check above may have seen the flag still set.
                if not queue:
                    return
                self._draining = True
            items: list[_QueuedAppend] = []
            while queue and (not items or queue[0].chain == items[0].chain):
                items.append(queue.popleft())
            settle = list(
                zip([item.done for item in items], self._commit_items(items), strict=True)
            )
            items[0].loop.call_soon_threadsafe(_settle, settle)

    def _commit_items(self, items: list[_QueuedAppend]) -> list[CommitResult]:
        """Appends of one chain in one commit; what each of them came to."""
        try:
            return list(self._commit_appends(items))
        except AuditStoreError as exc:
            return [exc] * len(items)
        except Exception:
            # One bad seal (a key epoch out of reach) must not fail the others: alone.
            results: list[CommitResult] = []
            for item in items:
                try:
                    results.extend(self._commit_appends([item]))
                except Exception as exc:
                    results.append(exc)
            return results

    def _commit_appends(self, items: list[_QueuedAppend]) -> list[list[Sealed]]:
        chain = items[0].chain
        cached = self._tails.get(chain)
        # Sealed onto the remembered tail, too many for one guarded INSERT: still good if the
        # chain ends there under the write lock. Sealing again would cost a seal that reads
        # the log (the index process's) a second read, from its segment's start.
        early: tuple[list[list[Sealed]], ChainTail] | None = None
        if cached is not None:
            out, tail = _seal_all(items, cached)
            sealed = [s for batch in out for s in batch]
            if not sealed:
                # Nothing after what this store committed last (an index caught up with the
                # log, polling): no transaction, and no write lock taken 50 times a second.
                return out
            # Records sent again are looked for first, under the write lock: the transaction.
            guarded = len(sealed) <= _GUARDED_MAX and not _resent(out)
            if guarded and self._insert_guarded(chain, cached, sealed):
                self._tails[chain] = tail
                return out
            if not guarded:
                early = out, tail
        self._tails.pop(chain, None)

        def work(db: sqlite3.Connection) -> list[list[Sealed]]:
            at = self._tail(db, chain)
            if early is not None and at == cached:
                out, tail = early
            else:
                out, tail = _seal_all(items, at)
            resent = _resent(out)
            if resent:
                stored = self._stored_keys(db, chain, resent)
                if stored:
                    out, tail = _seal_all(items, at, stored)
            db.executemany(_INSERT, [_insert_args(s) for batch in out for s in batch])
            self._tails[chain] = tail
            return out

        return self._transaction(work)

    def _stored_keys(
        self, db: sqlite3.Connection, chain: str, resent: list[Sealed]
    ) -> frozenset[bytes]:
        """The keys of these re-sent records that the chain already holds. Found through
        the time index (a record sent again has its first time): an index of its own on
        the key would cost every outcome a random insert, for a look rarely needed."""
        found: set[bytes] = set()
        for i in range(0, len(resent), _RESENT_PER_QUERY):
            part = resent[i : i + _RESENT_PER_QUERY]
            marks = ",".join("?" * len(part))
            # `+chain`: not by the (chain, seq) index, which would walk the whole chain.
            rows = db.execute(
                "SELECT record_key FROM audit_record WHERE +chain = ?"  # noqa: S608 - placeholders only
                f" AND time IN ({marks}) AND record_key IN ({marks})",
                (chain, *(s.time for s in part), *(s.key for s in part)),
            ).fetchall()
            found.update(bytes(r[0]) for r in rows)
        return frozenset(found)

    def _insert_guarded(self, chain: str, cached: ChainTail, sealed: list[Sealed]) -> bool:
        """Insert onto the remembered tail; False (nothing inserted) if the chain moved."""
        args: list[Any] = []
        for s in sealed:
            args.extend(_insert_args(s))
        args += (cached.seq, cached.link, chain)
        try:
            db = self._conn()
            self._check_file()
            inserted = db.execute(_guarded_insert(len(sealed)), args).rowcount
        except sqlite3.Error as exc:
            self._tails.pop(chain, None)
            raise AuditStoreError(f"audit database {self.path}: {exc}") from exc
        except BaseException:
            self._tails.pop(chain, None)
            raise
        if inserted != len(sealed):
            # Another writer (`audit prune`, a second process) moved the chain: the caller
            # seals again onto the tail as it is now, as the first append does.
            return False
        self.commits += 1
        return True

    async def prune(self, chain: str, cutoff: float, seal: SealPrune) -> Anchor | None:
        def work(db: sqlite3.Connection) -> Anchor | None:
            self._tails.pop(chain, None)
            last = db.execute(
                "SELECT max(seq) FROM audit_record WHERE chain = ? AND time < ?", (chain, cutoff)
            ).fetchone()[0]
            if last is None:
                return None
            seq, link, epoch, kind = db.execute(
                "SELECT seq, link, epoch, kind FROM audit_record WHERE chain = ? AND seq = ?",
                (chain, last),
            ).fetchone()
            through = ChainTail.after(seq, bytes(link), epoch, kind)
            sealed, anchor = seal(self._tail(db, chain), through)
            db.execute(_INSERT, _insert_args(sealed))
            db.execute(
                "INSERT OR REPLACE INTO audit_anchor VALUES (?,?,?,?,?,?,?)",
                (
                    anchor.chain, anchor.through_seq, anchor.through_link, anchor.next_epoch,
                    anchor.signed_epoch, anchor.time, anchor.mac,
                ),
            )  # fmt: skip
            db.execute("DELETE FROM audit_record WHERE chain = ? AND seq <= ?", (chain, last))
            return anchor

        return await self._run(lambda: self._transaction(work))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            try:
                return fn(self._conn())
            except sqlite3.Error as exc:
                raise AuditStoreError(f"audit database {self.path}: {exc}") from exc

        return await self._run(run)

    async def chains(self) -> list[str]:
        def q(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT DISTINCT chain FROM audit_record UNION SELECT chain FROM audit_anchor"
                " ORDER BY 1"
            ).fetchall()
            return [r[0] for r in rows]

        return await self._read(q)

    async def scan(
        self, chain: str, after_seq: int = 0, batch: int = 1000
    ) -> AsyncGenerator[StoredRecord, None]:
        # Keyset pages on (chain, seq): memory stays flat on any size and no read
        # transaction is held open against the writer.
        def page(db: sqlite3.Connection, last: int) -> list[StoredRecord]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM audit_record WHERE chain = ? AND seq > ?"  # noqa: S608 - constant column list
                " ORDER BY seq, pos LIMIT ?",
                (chain, last, batch),
            ).fetchall()
            return [_row(r) for r in rows]

        while True:
            records = await self._read(functools.partial(page, last=after_seq))
            for r in records:
                yield r
            if len(records) < batch:
                return
            after_seq = records[-1].seq

    async def search(self, where: RecordFilter, limit: int) -> list[StoredRecord]:
        clause, args = where.clauses(_DIALECT)

        def q(db: sqlite3.Connection) -> list[StoredRecord]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM audit_record{clause} ORDER BY pos DESC LIMIT ?",  # noqa: S608 - constant column list
                (*args, limit),
            ).fetchall()
            return [_row(r) for r in rows]

        return await self._read(q)

    async def after(self, pos: int, limit: int) -> list[StoredRecord]:
        def q(db: sqlite3.Connection) -> list[StoredRecord]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM audit_record WHERE pos > ? ORDER BY pos LIMIT ?",  # noqa: S608 - constant column list
                (pos, limit),
            ).fetchall()
            return [_row(r) for r in rows]

        return await self._read(q)

    async def get(self, chain: str, seq: int) -> StoredRecord | None:
        def q(db: sqlite3.Connection) -> StoredRecord | None:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM audit_record WHERE chain = ? AND seq = ?",  # noqa: S608
                (chain, seq),
            ).fetchone()
            return None if row is None else _row(row)

        return await self._read(q)

    def _anchor(self, db: sqlite3.Connection, chain: str) -> Anchor | None:
        row = db.execute(
            "SELECT chain, through_seq, through_link, next_epoch, signed_epoch, time, mac"
            " FROM audit_anchor WHERE chain = ?",
            (chain,),
        ).fetchone()
        if row is None:
            return None
        return Anchor(row[0], row[1], bytes(row[2]), row[3], row[4], row[5], bytes(row[6]))

    async def anchor(self, chain: str) -> Anchor | None:
        return await self._read(lambda db: self._anchor(db, chain))
