"""The shared control store: PostgreSQL (asyncpg) for several gateways. Every change is
NOTIFYed on one channel, so that an approval, a revocation or a new target made through one
gateway (or the CLI) reaches every other at once. A LISTEN connection that drops is
reopened; until it is, `notifies_others` is false and readers poll."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from gateway.control.models import ApprovalRequest, Grant, RequestStatus, Vote
from gateway.control.rules import Ballot, Judgement, judge
from gateway.control.store import (
    ANYTHING_CHANGED,
    TARGETS_CHANGED,
    TOKENS_CHANGED,
    ChangeListener,
    ControlStoreUnavailable,
    UnknownRequest,
)
from gateway.control.targets import Target, TargetError, stored_target, target_json
from gateway.identity.registry import TokenRecord, UnknownToken, token_from_row

log = logging.getLogger("pgwarden.control")

CHANNEL = "pgwarden_control"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pgwarden_approval_request (
    id text PRIMARY KEY,
    created double precision NOT NULL,
    status text NOT NULL,
    decided_at double precision,
    note text NOT NULL DEFAULT '',
    body jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS pgwarden_approval_vote (
    request_id text NOT NULL REFERENCES pgwarden_approval_request (id),
    subject text NOT NULL,
    groups jsonb NOT NULL,
    verdict text NOT NULL,
    note text NOT NULL,
    time double precision NOT NULL,
    PRIMARY KEY (request_id, subject)
);
CREATE TABLE IF NOT EXISTS pgwarden_approval_grant (
    id text PRIMARY KEY,
    request_id text NOT NULL,
    kind text NOT NULL,
    subject text NOT NULL,
    target text NOT NULL,
    key text NOT NULL,
    created double precision NOT NULL,
    expires double precision NOT NULL,
    used_at double precision,
    used_by text,
    -- Set once the grant's end is recorded in the audit trail.
    ended boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS pgwarden_approval_grant_key
    ON pgwarden_approval_grant (subject, target, key);
CREATE TABLE IF NOT EXISTS pgwarden_token (
    jti text PRIMARY KEY,
    subject text NOT NULL,
    groups jsonb NOT NULL,
    issued_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    revoked_at double precision
);
CREATE TABLE IF NOT EXISTS pgwarden_target (
    name text PRIMARY KEY,
    body jsonb NOT NULL
);
"""

_TOKEN_COLUMNS = "jti, subject, groups::text, issued_at, expires_at, revoked_at"
# How soon a dropped LISTEN connection is opened again (doubling up to the second figure).
_RELISTEN_SECONDS = (0.25, 5.0)
# Connecting and each query: a store that does not answer is reported, not waited for.
_TIMEOUT_SECONDS = 5.0

_GRANT_COLUMNS = "id, request_id, kind, subject, target, key, created, expires, used_at, used_by"


def _grant(row: Any) -> Grant:
    return Grant(*tuple(row))


class PostgresControlStore:
    def __init__(self, dsn: str, *, listen: bool = True) -> None:
        self.dsn = dsn
        self._pool: asyncpg.Pool | None = None
        self._listen_wanted = listen
        self._listen: asyncpg.Connection | None = None
        self._relisten: asyncio.Task[None] | None = None
        self._closed = False
        self._listeners: list[ChangeListener] = []

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise ControlStoreUnavailable("the control store is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        """A pooled connection; the store being down or unreachable is reported as
        ControlStoreUnavailable, whatever the driver raised."""
        try:
            async with self.pool.acquire(timeout=_TIMEOUT_SECONDS) as conn:
                yield conn
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise ControlStoreUnavailable(f"the control store is unreachable: {exc}") from exc
        except asyncpg.PostgresError as exc:
            # Connection trouble, insufficient resources, operator intervention (shutdown,
            # cancel): the store is not answering now. Anything else is a bug to report.
            if str(exc.sqlstate)[:2] not in ("08", "53", "57"):
                raise
            raise ControlStoreUnavailable(f"the control store is not answering: {exc}") from exc

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=4, timeout=10, command_timeout=_TIMEOUT_SECONDS
            )
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError) as exc:
            raise ControlStoreUnavailable(f"the control store is unreachable: {exc}") from exc
        # Several gateways may start at once: one creates the tables, the others wait.
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('pgwarden_control'))")
            await conn.execute(_SCHEMA)
        if self._listen_wanted:
            await self._open_listen()

    async def _open_listen(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=_TIMEOUT_SECONDS)
        await conn.add_listener(CHANNEL, self._notified)
        conn.add_termination_listener(self._listen_lost)
        self._listen = conn

    @property
    def notifies_others(self) -> bool:
        return self._listen is not None and not self._listen.is_closed()

    def _listen_lost(self, _conn: object) -> None:
        """The LISTEN connection ended (server restart, network, pg_terminate_backend):
        notifications sent meanwhile are lost, so it is reopened and, once it is, every
        listener is told to look again."""
        self._listen = None
        if self._closed or (self._relisten is not None and not self._relisten.done()):
            return
        # Readers waiting for a notification start polling now.
        self._changed(ANYTHING_CHANGED)
        log.warning(
            "control store: the LISTEN connection was lost; reopening it (polling meanwhile)",
            extra={"event": "control_listen_lost"},
        )
        self._relisten = asyncio.ensure_future(self._reopen_listen())

    async def _reopen_listen(self) -> None:
        delay, most = _RELISTEN_SECONDS
        while not self._closed:
            try:
                await self._open_listen()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.debug("control store: LISTEN not reopened yet: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, most)
                continue
            log.info(
                "control store: the LISTEN connection is open again",
                extra={"event": "control_listen_reopened"},
            )
            self._changed(ANYTHING_CHANGED)
            return

    async def close(self) -> None:
        self._closed = True
        if self._relisten is not None:
            self._relisten.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relisten
        if self._listen is not None:
            conn, self._listen = self._listen, None
            await conn.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._changed(payload)

    def _changed(self, request_id: str) -> None:
        for listener in self._listeners:
            try:
                listener(request_id)
            except Exception:
                log.exception("control store listener failed")

    # -- requests --------------------------------------------------------------------------

    async def create_request(self, request: ApprovalRequest) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO pgwarden_approval_request (id, created, status, body)"
                " VALUES ($1, $2, $3, $4::jsonb)",
                request.id,
                request.created,
                request.status,
                json.dumps(request.to_json()),
            )
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, request.id)

    async def request(self, request_id: str) -> ApprovalRequest | None:
        async with self.pool.acquire() as conn:
            return await _load(conn, request_id)

    async def requests(
        self, status: RequestStatus | None = None, limit: int = 100
    ) -> list[ApprovalRequest]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id FROM pgwarden_approval_request WHERE $1::text IS NULL OR status = $1"
                " ORDER BY created DESC LIMIT $2",
                status,
                limit,
            )
            return [r for row in rows if (r := await _load(conn, row["id"])) is not None]

    async def vote(
        self, request_id: str, ballot: Ballot, now: float, grant_seconds: float
    ) -> Judgement:
        async with self.pool.acquire() as conn, conn.transaction():
            request = await _load(conn, request_id, lock=True)
            if request is None:
                raise UnknownRequest(request_id)
            judgement = judge(request, ballot, now, grant_seconds)
            v = judgement.vote
            await conn.execute(
                "INSERT INTO pgwarden_approval_vote VALUES ($1, $2, $3::jsonb, $4, $5, $6)",
                request_id,
                v.subject,
                json.dumps(v.groups),
                v.verdict,
                v.note,
                v.time,
            )
            r = judgement.request
            await conn.execute(
                "UPDATE pgwarden_approval_request SET status = $1, decided_at = $2, note = $3"
                " WHERE id = $4",
                r.status,
                r.decided_at,
                r.note,
                request_id,
            )
            g = judgement.grant
            if g is not None:
                await conn.execute(
                    f"INSERT INTO pgwarden_approval_grant ({_GRANT_COLUMNS})"  # noqa: S608
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL)",
                    g.id,
                    g.request_id,
                    g.kind,
                    g.subject,
                    g.target,
                    g.key,
                    g.created,
                    g.expires,
                )
            # Delivered at commit, to every gateway listening (this one included).
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, request_id)
        self._changed(request_id)
        return judgement

    async def settle(
        self, request_id: str, to: RequestStatus, now: float
    ) -> tuple[ApprovalRequest, bool]:
        async with self.pool.acquire() as conn, conn.transaction():
            moved = await conn.execute(
                "UPDATE pgwarden_approval_request SET status = $1, decided_at = $2"
                " WHERE id = $3 AND status = 'pending'",
                to,
                now,
                request_id,
            )
            request = await _load(conn, request_id)
            if request is None:
                raise UnknownRequest(request_id)
            if moved == "UPDATE 1":
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, request_id)
        return request, moved == "UPDATE 1"

    # -- grants ----------------------------------------------------------------------------

    async def use_grant(
        self, subject: str, target: str, grant_key: str, fingerprint: str, now: float, used_by: str
    ) -> Grant | None:
        async with self.pool.acquire() as conn:
            # The row lock makes two sessions racing for one grant take it once.
            row = await conn.fetchrow(
                f"UPDATE pgwarden_approval_grant SET used_at = $1, used_by = $2 WHERE id = ("  # noqa: S608
                "  SELECT id FROM pgwarden_approval_grant WHERE subject = $3 AND target = $4"
                "  AND key = $5 AND kind = 'once' AND used_at IS NULL AND expires > $1"
                "  ORDER BY created LIMIT 1 FOR UPDATE SKIP LOCKED)"
                f" RETURNING {_GRANT_COLUMNS}",
                now,
                used_by,
                subject,
                target,
                grant_key,
            )
            if row is not None:
                return _grant(row)
            row = await conn.fetchrow(
                f"SELECT {_GRANT_COLUMNS} FROM pgwarden_approval_grant"  # noqa: S608
                " WHERE subject = $1 AND target = $2 AND key = $3 AND kind = 'window'"
                " AND expires > $4 ORDER BY expires DESC LIMIT 1",
                subject,
                target,
                fingerprint,
                now,
            )
            return _grant(row) if row is not None else None

    async def grants(self, live_at: float | None = None) -> list[Grant]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_GRANT_COLUMNS} FROM pgwarden_approval_grant"  # noqa: S608
                " WHERE $1::float8 IS NULL"
                " OR (expires > $1 AND (kind = 'window' OR used_at IS NULL))"
                " ORDER BY created DESC",
                live_at,
            )
            return [_grant(r) for r in rows]

    async def expire_grants(self, now: float) -> list[Grant]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "UPDATE pgwarden_approval_grant SET ended = true WHERE NOT ended"  # noqa: S608
                " AND expires <= $1 AND (kind = 'window' OR used_at IS NULL)"
                f" RETURNING {_GRANT_COLUMNS}",
                now,
            )
            return [_grant(r) for r in rows]

    # -- the token registry ----------------------------------------------------------------

    async def record_token(self, token: TokenRecord) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO pgwarden_token (jti, subject, groups, issued_at, expires_at,"
                " revoked_at) VALUES ($1, $2, $3::jsonb, $4, $5, $6) ON CONFLICT (jti) DO NOTHING",
                token.jti,
                token.subject,
                json.dumps(list(token.groups)),
                token.issued_at,
                token.expires_at,
                token.revoked_at,
            )
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, TOKENS_CHANGED)
        self._changed(TOKENS_CHANGED)

    async def revoke_token(self, jti: str, at: float) -> TokenRecord:
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "UPDATE pgwarden_token SET revoked_at = $1 WHERE jti = $2 AND revoked_at IS NULL",
                at,
                jti,
            )
            record = await _token(conn, jti)
            if record is None:
                raise UnknownToken(jti)
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, TOKENS_CHANGED)
        self._changed(TOKENS_CHANGED)
        return record

    async def token(self, jti: str) -> TokenRecord | None:
        async with self._conn() as conn:
            return await _token(conn, jti)

    async def tokens(self) -> list[TokenRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT {_TOKEN_COLUMNS} FROM pgwarden_token ORDER BY issued_at, jti"  # noqa: S608
            )
            return [token_from_row(tuple(r)) for r in rows]

    async def revoked_tokens(self) -> frozenset[str]:
        async with self._conn() as conn:
            rows = await conn.fetch("SELECT jti FROM pgwarden_token WHERE revoked_at IS NOT NULL")
            return frozenset(r["jti"] for r in rows)

    # -- targets ---------------------------------------------------------------------------

    async def targets(self) -> dict[str, Target]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT name, body::text AS body FROM pgwarden_target ORDER BY name"
            )
            return {r["name"]: stored_target(r["name"], r["body"]) for r in rows}

    async def add_target(self, target: Target, *, replace: bool = False) -> None:
        on_conflict = "DO UPDATE SET body = excluded.body" if replace else "DO NOTHING"
        async with self._conn() as conn, conn.transaction():
            done = await conn.execute(
                "INSERT INTO pgwarden_target (name, body) VALUES ($1, $2::jsonb)"  # noqa: S608
                f" ON CONFLICT (name) {on_conflict}",
                target.name,
                target_json(target).decode(),
            )
            if done == "INSERT 0 0":
                raise TargetError(f"target {target.name} already exists")
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, TARGETS_CHANGED)
        self._changed(TARGETS_CHANGED)

    async def remove_target(self, name: str) -> None:
        async with self._conn() as conn, conn.transaction():
            done = await conn.execute("DELETE FROM pgwarden_target WHERE name = $1", name)
            if done == "DELETE 0":
                raise TargetError(f"no target named {name}")
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, TARGETS_CHANGED)
        self._changed(TARGETS_CHANGED)


async def _token(conn: Any, jti: str) -> TokenRecord | None:
    row = await conn.fetchrow(
        f"SELECT {_TOKEN_COLUMNS} FROM pgwarden_token WHERE jti = $1",  # noqa: S608
        jti,
    )
    return None if row is None else token_from_row(tuple(row))


_LOAD = (
    "SELECT status, decided_at, note, body::text AS body FROM pgwarden_approval_request"
    " WHERE id = $1"
)
# A vote reads the request and its votes, judges and writes: one at a time per request.
_LOAD_LOCKED = _LOAD + " FOR UPDATE"


async def _load(conn: Any, request_id: str, *, lock: bool = False) -> ApprovalRequest | None:
    query = _LOAD_LOCKED if lock else _LOAD
    row = await conn.fetchrow(query, request_id)
    if row is None:
        return None
    votes = tuple(
        Vote(
            request_id,
            v["subject"],
            tuple(json.loads(v["groups"])),
            v["verdict"],
            v["note"],
            v["time"],
        )
        for v in await conn.fetch(
            "SELECT subject, groups::text AS groups, verdict, note, time"
            " FROM pgwarden_approval_vote WHERE request_id = $1 ORDER BY time",
            request_id,
        )
    )
    d = json.loads(row["body"])
    d.update(status=row["status"], decided_at=row["decided_at"], note=row["note"])
    return ApprovalRequest.from_json(d, votes)
