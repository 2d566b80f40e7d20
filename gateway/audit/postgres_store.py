"""The shared audit store: PostgreSQL via asyncpg, one chain per gateway instance."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from gateway.audit.chain import EMPTY_TAIL, Anchor, ChainTail, SealedRecord
from gateway.audit.store import (
    AuditStoreError,
    RecordFilter,
    Seal,
    SealPrune,
    SearchDialect,
    StoredRecord,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_record (
    pos bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain text NOT NULL,
    seq bigint NOT NULL,
    epoch integer NOT NULL,
    kind text NOT NULL,
    time double precision NOT NULL,
    session_id text,
    subject text,
    target text,
    action text,
    request_id text,
    text text,
    body bytea NOT NULL,
    link bytea NOT NULL,
    record_key bytea,
    UNIQUE (chain, seq)
);
-- A store from before record_key (how a record sent again after a lost acknowledgement is
-- found, through the time index). Added only where missing: ALTER TABLE would take the
-- table's lock at every start.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema =
            current_schema() AND table_name = 'audit_record' AND column_name = 'record_key') THEN
        ALTER TABLE audit_record ADD COLUMN record_key bytea;
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS audit_record_time ON audit_record (time);
CREATE INDEX IF NOT EXISTS audit_record_request ON audit_record (request_id)
    WHERE request_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS audit_anchor (
    chain text PRIMARY KEY,
    through_seq bigint NOT NULL,
    through_link bytea NOT NULL,
    next_epoch integer NOT NULL,
    signed_epoch integer NOT NULL,
    time double precision NOT NULL,
    mac bytea NOT NULL
);
-- A body's signed record, or NULL where the body is not JSON (tampered with: verify names
-- it), so that a search reading the body skips that record rather than failing.
CREATE OR REPLACE FUNCTION pgwarden_audit_record(body bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN convert_from(body, 'UTF8')::jsonb -> 'record';
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;
"""

_COLUMNS = (
    "pos, chain, seq, epoch, kind, time, body, link,"
    " session_id, subject, target, action, request_id, text"
)
_INSERT = (
    "INSERT INTO audit_record (chain, seq, epoch, kind, time, session_id, subject, target,"
    " action, request_id, text, body, link, record_key)"
    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)"
)
_INSERT_MANY = (
    "INSERT INTO audit_record (chain, seq, epoch, kind, time, session_id, subject, target,"
    " action, request_id, text, body, link, record_key) SELECT * FROM unnest($1::text[],"
    " $2::bigint[], $3::integer[], $4::text[], $5::float8[], $6::text[], $7::text[],"
    " $8::text[], $9::text[], $10::text[], $11::text[], $12::bytea[], $13::bytea[],"
    " $14::bytea[])"
)

_RECORD_JSON = "pgwarden_audit_record(body)"
# A record without masks (or an older one, without the field) is not masked.
_DIALECT = SearchDialect(
    placeholder=lambda i: f"${i}",
    contains="strpos(text, {}) > 0",
    in_group=f"coalesce({_RECORD_JSON} -> 'principal' -> 'groups', '[]'::jsonb) ? {{}}",
    masked=f"coalesce(jsonb_array_length(CASE jsonb_typeof({_RECORD_JSON} -> 'masked_columns')"
    f" WHEN 'array' THEN {_RECORD_JSON} -> 'masked_columns' END), 0) > 0",
)

# Guard for an insert sealed onto a remembered tail: still the chain's last record?
_IF_TAIL_IS = (
    " WHERE EXISTS (SELECT 1 FROM (SELECT seq, link FROM audit_record WHERE chain = $15"
    " ORDER BY seq DESC LIMIT 1) last WHERE last.seq = $16 AND last.link = $17)"
)


class _TailMoved(Exception):
    pass


def _lock_key(chain: str) -> int:
    """A stable signed 64-bit advisory lock key serialising the writers of one chain."""
    digest = hashlib.sha256(b"pgwarden-audit:" + chain.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# How a lost or half-dead connection surfaces in asyncpg, whatever the operation it was in:
# the server's FATAL read with the close (ConnectionDoesNotExistError, a
# PostgresConnectionError); the socket gone (OSError, ConnectionError); no answer
# (TimeoutError); the connection marked closed under the caller (InterfaceError); or the
# protocol's state machine left mid-operation, as when the server's FATAL (pg_terminate_backend)
# has been read but not yet the end of the stream: the next statement then fails with
# InternalClientError "cannot switch to state 15; another operation (2) is in progress"
# on a connection that does not yet say it is closed. Each means: drop the connection.
_CONNECTION_LOST = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
)
# What any store operation turns into AuditStoreError: the above, or the server's refusal.
_STORE_FAILURES = (*_CONNECTION_LOST, asyncpg.PostgresError)


def _connection_lost(exc: BaseException, conn: asyncpg.Connection | None = None) -> bool:
    return isinstance(exc, _CONNECTION_LOST) or (conn is not None and conn.is_closed())


def _row(r: Any) -> StoredRecord:
    return StoredRecord(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), bytes(r[7]), *tuple(r)[8:])


def _insert_args(s: SealedRecord) -> tuple[Any, ...]:
    c = s.columns
    return (
        s.chain, s.seq, s.epoch, s.kind, s.time, c["session_id"], c["subject"], c["target"],
        c["action"], c["request_id"], c["text"], s.body, s.link, s.key,
    )  # fmt: skip


class _BeforeCommit(Exception):
    """A transaction failed before COMMIT was sent (its cause chained): nothing is stored.
    `retry`: on a new connection or a fresh tail, the same work may succeed."""

    def __init__(self, *, retry: bool) -> None:
        super().__init__()
        self.retry = retry


class _CommitUnknown(Exception):
    """The connection failed with COMMIT sent (or about to be): `result` was made by the
    work and may or may not be stored."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


class PostgresAuditStore:
    """Several gateway replicas write one database, each its own chain (named by instance).

    Per-replica chains rather than one global sequence: replicas never wait for each other,
    each keeps its own key, and group commit stays a local matter. The price is that order
    across replicas is by time, not by one sequence; each chain is still complete and ordered.
    """

    def __init__(self, dsn: str, timeout: float = 2.0) -> None:
        self.dsn = dsn
        self.timeout = timeout
        self.commits = 0
        self._pool: asyncpg.Pool | None = None
        self._writer: asyncpg.Connection | None = None
        self._tails: dict[str, ChainTail] = {}

    async def open(self) -> None:
        await self._ensure_pool()

    async def _ensure_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        try:
            pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=4, timeout=self.timeout,
                command_timeout=self.timeout,
            )  # fmt: skip
        except _STORE_FAILURES as exc:
            raise AuditStoreError(f"audit database unreachable: {exc}") from exc
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(f"SELECT pg_advisory_xact_lock({_lock_key('')})")
                await conn.execute(_SCHEMA)
        except _STORE_FAILURES as exc:
            pool.terminate()
            raise AuditStoreError(f"audit database schema: {exc}") from exc
        self._pool = pool
        return pool

    async def close(self) -> None:
        if self._writer is not None:
            try:
                await self._writer.close(timeout=self.timeout)
            except _STORE_FAILURES:
                self._writer.terminate()  # a dead connection takes no goodbye
            self._writer = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), self.timeout)
            except _STORE_FAILURES:
                pool.terminate()

    async def _tail(self, conn: asyncpg.Connection, chain: str) -> ChainTail:
        row = await conn.fetchrow(
            "SELECT seq, link, epoch, kind FROM audit_record WHERE chain = $1"
            " ORDER BY seq DESC LIMIT 1",
            chain,
        )
        if row is not None:
            return ChainTail.after(row[0], bytes(row[1]), row[2], row[3])
        anchor = await self._anchor(conn, chain)
        if anchor is not None:
            return ChainTail(anchor.through_seq, anchor.through_link, anchor.next_epoch)
        return EMPTY_TAIL

    async def _transaction(
        self,
        chain: str,
        work: Callable[[asyncpg.Connection], Awaitable[T]],
        landed: Callable[[asyncpg.Connection, T], Awaitable[bool]],
    ) -> T:
        """Run `work` in one transaction under the chain's lock, at most twice: again on a
        new connection when the first was lost (or another writer moved the chain) before
        COMMIT; when the connection is lost with the COMMIT sent, `landed` tells on a new
        connection whether it took effect, so that a batch is never stored twice nor
        refused once stored."""
        for attempt in (1, 2):
            try:
                result = await self._transaction_once(chain, work)
            except _BeforeCommit as failed:
                cause = failed.__cause__
                if attempt == 1 and failed.retry:
                    continue
                raise AuditStoreError(f"audit database: {cause}") from cause
            except _CommitUnknown as unknown:
                if not await self._landed(chain, landed, unknown.result, unknown.__cause__):
                    if attempt == 1:
                        continue
                    raise AuditStoreError(
                        f"audit database commit failed: {unknown.__cause__}"
                    ) from unknown.__cause__
                result = unknown.result
            self.commits += 1
            return result
        raise AssertionError("unreachable")

    async def _landed(
        self,
        chain: str,
        landed: Callable[[asyncpg.Connection, T], Awaitable[bool]],
        result: T,
        cause: BaseException | None,
    ) -> bool:
        """Whether a commit whose answer was lost took effect. Under the chain's lock, which
        the lost transaction held to its end: it has committed or rolled back by then."""
        try:
            conn = await self._write_connection()
            await conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({_lock_key(chain)})")
            found = await landed(conn, result)
        except Exception as exc:
            # Unknown it stays: the caller refuses (a request's statement does not run).
            self._drop_writer()  # never left inside the look's transaction, holding the lock
            raise AuditStoreError(
                f"audit database commit failed ({cause}), and whether it took effect cannot"
                f" be read: {exc}"
            ) from exc
        try:
            await conn.execute("ROLLBACK")
        except _STORE_FAILURES:
            self._drop_writer()  # the answer is in; only the connection is lost
        return found

    async def _write_connection(self) -> asyncpg.Connection:
        # Writes use one connection of their own, outside the pool: a pool's release resets
        # the session, an extra round trip on every commit.
        if self._writer is None or self._writer.is_closed():
            self._writer = None
            await self._ensure_pool()
            self._writer = await asyncpg.connect(
                self.dsn, timeout=self.timeout, command_timeout=self.timeout
            )
        return self._writer

    def _drop_writer(self) -> None:
        """Close the write connection at once (no goodbye on a connection that may be
        dead); the next write opens another."""
        if self._writer is not None:
            self._writer.terminate()
            self._writer = None

    async def _transaction_once(
        self, chain: str, work: Callable[[asyncpg.Connection], Awaitable[T]]
    ) -> T:
        try:
            conn = await self._write_connection()
        except AuditStoreError:
            raise
        except Exception as exc:
            raise _BeforeCommit(retry=_connection_lost(exc)) from exc
        try:
            # BEGIN and the chain lock in one simple-protocol round trip.
            await conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({_lock_key(chain)})")
            result = await work(conn)
        except Exception as exc:
            # Nothing is committed: after a server-side error the connection is fine once
            # rolled back; a lost one (or a failed rollback) is dropped, and the retry gets
            # a new one. A failure of the work itself (a seal that refuses) is not retried.
            lost = _connection_lost(exc, conn)
            if not lost:
                try:
                    await conn.execute("ROLLBACK")
                except Exception:
                    lost = True
            if lost:
                self._drop_writer()
            raise _BeforeCommit(
                retry=lost or isinstance(exc, asyncpg.UniqueViolationError | _TailMoved)
            ) from exc
        try:
            await conn.execute("COMMIT")
        except Exception as exc:
            # Whether the commit happened is unknown until the chain is read again.
            self._drop_writer()
            raise _CommitUnknown(result) from exc
        return result

    async def append(self, chain: str, seal: Seal) -> list[SealedRecord]:
        async def work(conn: asyncpg.Connection) -> list[SealedRecord]:
            # The tail this store committed last saves a round trip; the insert itself checks
            # it is still the chain's last record (another writer, such as `audit prune`, may
            # have appended) and the retry then reads the tail afresh.
            cached = self._tails.pop(chain, None)
            tail = cached or await self._tail(conn, chain)
            sealed, after = seal(tail, frozenset())
            resent = [s for s in sealed if s.resent and s.key is not None]
            if resent:
                # Sent again after a lost acknowledgement: what the chain already holds is
                # left out (under the chain's lock, so no commit of them is still in flight).
                # Found through the time index (a record sent again has its first time): an
                # index on the key would cost every outcome a random insert.
                rows = await conn.fetch(
                    "SELECT record_key FROM audit_record WHERE chain = $1"
                    " AND time = ANY($2::float8[]) AND record_key = ANY($3::bytea[])",
                    chain,
                    [s.time for s in resent],
                    [s.key for s in resent],
                )
                if rows:
                    sealed, after = seal(tail, frozenset(bytes(r[0]) for r in rows))
            if not sealed:
                # Nothing after the tail (the audit log's indexer caught up): no statement.
                self._tails[chain] = tail
                return sealed
            # One statement over arrays: a single round trip for the whole batch.
            columns = list(zip(*(_insert_args(s) for s in sealed), strict=True))
            if cached is None:
                await conn.execute(_INSERT_MANY, *columns)
            else:
                status = await conn.execute(
                    _INSERT_MANY + _IF_TAIL_IS, *columns, chain, tail.seq, tail.link
                )
                if status != f"INSERT 0 {len(sealed)}":
                    raise _TailMoved(f"chain {chain} was extended by another writer")
            new_tail.append(after)
            return sealed

        async def landed(conn: asyncpg.Connection, sealed: list[SealedRecord]) -> bool:
            # One transaction: its last record there (with its link) means all of it is.
            if not sealed:
                return True
            last = sealed[-1]
            link = await conn.fetchval(
                "SELECT link FROM audit_record WHERE chain = $1 AND seq = $2", chain, last.seq
            )
            return link is not None and bytes(link) == last.link

        new_tail: list[ChainTail] = []
        sealed = await self._transaction(chain, work, landed)
        if new_tail:
            self._tails[chain] = new_tail[-1]
        return sealed

    async def prune(self, chain: str, cutoff: float, seal: SealPrune) -> Anchor | None:
        self._tails.pop(chain, None)

        async def work(conn: asyncpg.Connection) -> Anchor | None:
            row = await conn.fetchrow(
                "SELECT seq, link, epoch, kind FROM audit_record WHERE chain = $1 AND seq ="
                " (SELECT max(seq) FROM audit_record WHERE chain = $1 AND time < $2)",
                chain, cutoff,
            )  # fmt: skip
            if row is None:
                return None
            through = ChainTail.after(row[0], bytes(row[1]), row[2], row[3])
            sealed, anchor = seal(await self._tail(conn, chain), through)
            await conn.execute(_INSERT, *_insert_args(sealed))
            await conn.execute(
                "INSERT INTO audit_anchor VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (chain) DO"
                " UPDATE SET through_seq = EXCLUDED.through_seq,"
                " through_link = EXCLUDED.through_link, next_epoch = EXCLUDED.next_epoch,"
                " signed_epoch = EXCLUDED.signed_epoch, time = EXCLUDED.time, mac = EXCLUDED.mac",
                anchor.chain, anchor.through_seq, anchor.through_link, anchor.next_epoch,
                anchor.signed_epoch, anchor.time, anchor.mac,
            )  # fmt: skip
            await conn.execute(
                "DELETE FROM audit_record WHERE chain = $1 AND seq <= $2", chain, through.seq
            )
            return anchor

        async def landed(conn: asyncpg.Connection, anchor: Anchor | None) -> bool:
            if anchor is None:
                return True
            stored = await self._anchor(conn, chain)
            return stored is not None and stored.mac == anchor.mac

        return await self._transaction(chain, work, landed)

    async def _read(self, query: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        """A read on a pooled connection; once more if that connection was lost. Every
        pooled connection may have been ended at once (a server restart, a terminate of
        the database's backends): the pool then replaces them all before the second try."""
        for attempt in (1, 2):
            pool = await self._ensure_pool()
            try:
                return await query(pool)
            except _STORE_FAILURES as exc:
                if attempt == 1 and _connection_lost(exc):
                    await pool.expire_connections()
                    continue
                raise AuditStoreError(f"audit database: {exc}") from exc
        raise AssertionError("unreachable")

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async def fetch(pool: asyncpg.Pool) -> list[Any]:
            return list(await pool.fetch(sql, *args))

        return await self._read(fetch)

    async def chains(self) -> list[str]:
        rows = await self._fetch(
            "SELECT chain FROM audit_record GROUP BY chain UNION SELECT chain FROM audit_anchor"
            " ORDER BY 1"
        )
        return [r[0] for r in rows]

    async def scan(
        self, chain: str, after_seq: int = 0, batch: int = 1000
    ) -> AsyncGenerator[StoredRecord, None]:
        # Keyset pages on (chain, seq) rather than one long-lived cursor: memory stays flat
        # and no transaction stays open against vacuum while a million records stream out.
        while True:
            rows = await self._fetch(
                f"SELECT {_COLUMNS} FROM audit_record WHERE chain = $1 AND seq > $2"  # noqa: S608 - constant column list
                " ORDER BY seq, pos LIMIT $3",
                chain, after_seq, batch,
            )  # fmt: skip
            for r in rows:
                yield _row(r)
            if len(rows) < batch:
                return
            after_seq = rows[-1][2]

    async def search(self, where: RecordFilter, limit: int) -> list[StoredRecord]:
        clause, args = where.clauses(_DIALECT)
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM audit_record{clause} ORDER BY pos DESC"  # noqa: S608 - constant column list
            f" LIMIT ${len(args) + 1}",
            *args, limit,
        )  # fmt: skip
        return [_row(r) for r in rows]

    async def after(self, pos: int, limit: int) -> list[StoredRecord]:
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM audit_record WHERE pos > $1 ORDER BY pos LIMIT $2",  # noqa: S608
            pos,
            limit,
        )
        return [_row(r) for r in rows]

    async def get(self, chain: str, seq: int) -> StoredRecord | None:
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM audit_record WHERE chain = $1 AND seq = $2",  # noqa: S608
            chain,
            seq,
        )
        return _row(rows[0]) if rows else None

    async def _anchor(self, conn: asyncpg.Connection, chain: str) -> Anchor | None:
        row = await conn.fetchrow(
            "SELECT chain, through_seq, through_link, next_epoch, signed_epoch, time, mac"
            " FROM audit_anchor WHERE chain = $1",
            chain,
        )
        if row is None:
            return None
        return Anchor(row[0], row[1], bytes(row[2]), row[3], row[4], row[5], bytes(row[6]))

    async def anchor(self, chain: str) -> Anchor | None:
        async def read(pool: asyncpg.Pool) -> Anchor | None:
            async with pool.acquire() as conn:
                return await self._anchor(conn, chain)

        return await self._read(read)
