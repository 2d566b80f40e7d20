"""The embedded control store: one SQLite file in the state directory, driven from one
thread. Changes made in this process are told to listeners at once; other processes on the
machine (the CLI, a second gateway on the same state directory) are seen by polling."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import orjson

from gateway.control.models import ApprovalRequest, Grant, RequestStatus, Vote
from gateway.control.rules import Ballot, Judgement, judge
from gateway.control.store import (
    TARGETS_CHANGED,
    TOKENS_CHANGED,
    ChangeListener,
    ControlStoreUnavailable,
    UnknownRequest,
)
from gateway.control.targets import Target, TargetError, stored_target, target_json
from gateway.identity.registry import TokenRecord, UnknownToken, token_from_row

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS approval_request (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    decided_at REAL,
    note TEXT NOT NULL DEFAULT '',
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS approval_request_created ON approval_request (created);
CREATE TABLE IF NOT EXISTS approval_vote (
    request_id TEXT NOT NULL REFERENCES approval_request (id),
    subject TEXT NOT NULL,
    groups TEXT NOT NULL,
    verdict TEXT NOT NULL,
    note TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (request_id, subject)
);
CREATE TABLE IF NOT EXISTS approval_grant (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    target TEXT NOT NULL,
    key TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    used_at REAL,
    used_by TEXT,
    -- Set once the grant's end is recorded in the audit trail.
    ended INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS approval_grant_key ON approval_grant (subject, target, key);
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    groups TEXT NOT NULL,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS target (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
"""

_TOKEN_COLUMNS = "jti, subject, groups, issued_at, expires_at, revoked_at"

_GRANT_COLUMNS = "id, request_id, kind, subject, target, key, created, expires, used_at, used_by"


def _grant(row: tuple[object, ...]) -> Grant:
    return Grant(*row)  # type: ignore[arg-type]


class SqliteControlStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pgwarden-control")
        self._listeners: list[ChangeListener] = []

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._db is None:
                raise ControlStoreUnavailable(f"the control store {self.path} is not open")
            try:
                return fn(self._db)
            except sqlite3.OperationalError as exc:  # locked too long, unreadable, full disk
                raise ControlStoreUnavailable(f"the control store {self.path}: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    @property
    def notifies_others(self) -> bool:
        return False

    async def start(self) -> None:
        def open_db() -> sqlite3.Connection:
            # The token registry is about who may connect: keep it from other users.
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            return db

        self._db = await asyncio.get_running_loop().run_in_executor(self._thread, open_db)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._thread, db.close)
        self._thread.shutdown(wait=False)

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def _changed(self, request_id: str) -> None:
        for listener in self._listeners:
            listener(request_id)

    # -- requests --------------------------------------------------------------------------

    async def create_request(self, request: ApprovalRequest) -> None:
        body = json.dumps(request.to_json())

        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO approval_request (id, created, status, body) VALUES (?, ?, ?, ?)",
                (request.id, request.created, request.status, body),
            )

        await self._run(insert)
        self._changed(request.id)

    async def request(self, request_id: str) -> ApprovalRequest | None:
        return await self._run(lambda db: _load(db, request_id))

    async def requests(
        self, status: RequestStatus | None = None, limit: int = 100
    ) -> list[ApprovalRequest]:
        def select(db: sqlite3.Connection) -> list[ApprovalRequest]:
            where, args = ("WHERE status = ?", (status,)) if status else ("", ())
            ids = db.execute(
                f"SELECT id FROM approval_request {where} ORDER BY created DESC LIMIT ?",  # noqa: S608
                (*args, limit),
            ).fetchall()
            return [r for (rid,) in ids if (r := _load(db, rid)) is not None]

        return await self._run(select)

    async def vote(
        self, request_id: str, ballot: Ballot, now: float, grant_seconds: float
    ) -> Judgement:
        def apply(db: sqlite3.Connection) -> Judgement:
            db.execute("BEGIN IMMEDIATE")
            try:
                request = _load(db, request_id)
                if request is None:
                    raise UnknownRequest(request_id)
                judgement = judge(request, ballot, now, grant_seconds)
                v = judgement.vote
                db.execute(
                    "INSERT INTO approval_vote VALUES (?, ?, ?, ?, ?, ?)",
                    (request_id, v.subject, json.dumps(v.groups), v.verdict, v.note, v.time),
                )
                r = judgement.request
                db.execute(
                    "UPDATE approval_request SET status = ?, decided_at = ?, note = ? WHERE id = ?",
                    (r.status, r.decided_at, r.note, request_id),
                )
                if judgement.grant is not None:
                    _insert_grant(db, judgement.grant)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return judgement

        judgement = await self._run(apply)
        self._changed(request_id)
        return judgement

    async def settle(
        self, request_id: str, to: RequestStatus, now: float
    ) -> tuple[ApprovalRequest, bool]:
        def move(db: sqlite3.Connection) -> tuple[ApprovalRequest, bool]:
            moved = db.execute(
                "UPDATE approval_request SET status = ?, decided_at = ?"
                " WHERE id = ? AND status = 'pending'",
                (to, now, request_id),
            ).rowcount
            request = _load(db, request_id)
            if request is None:
                raise UnknownRequest(request_id)
            return request, moved == 1

        result = await self._run(move)
        if result[1]:
            self._changed(request_id)
        return result

    # -- grants ----------------------------------------------------------------------------

    async def use_grant(
        self, subject: str, target: str, grant_key: str, fingerprint: str, now: float, used_by: str
    ) -> Grant | None:
        def take(db: sqlite3.Connection) -> Grant | None:
            # One statement: SQLite's write lock makes the pick and the mark one step.
            row = db.execute(
                f"UPDATE approval_grant SET used_at = ?, used_by = ? WHERE id = ("  # noqa: S608
                "  SELECT id FROM approval_grant WHERE subject = ? AND target = ? AND key = ?"
                "  AND kind = 'once' AND used_at IS NULL AND expires > ?"
                "  ORDER BY created LIMIT 1)"
                f" RETURNING {_GRANT_COLUMNS}",
                (now, used_by, subject, target, grant_key, now),
            ).fetchone()
            if row is not None:
                return _grant(row)
            row = db.execute(
                f"SELECT {_GRANT_COLUMNS} FROM approval_grant WHERE subject = ?"  # noqa: S608
                " AND target = ? AND key = ? AND kind = 'window' AND expires > ?"
                " ORDER BY expires DESC LIMIT 1",
                (subject, target, fingerprint, now),
            ).fetchone()
            return _grant(row) if row is not None else None

        return await self._run(take)

    async def grants(self, live_at: float | None = None) -> list[Grant]:
        def select(db: sqlite3.Connection) -> list[Grant]:
            if live_at is None:
                rows = db.execute(
                    f"SELECT {_GRANT_COLUMNS} FROM approval_grant ORDER BY created DESC"  # noqa: S608
                ).fetchall()
            else:
                rows = db.execute(
                    f"SELECT {_GRANT_COLUMNS} FROM approval_grant"  # noqa: S608
                    " WHERE expires > ? AND (kind = 'window' OR used_at IS NULL)"
                    " ORDER BY created DESC",
                    (live_at,),
                ).fetchall()
            return [_grant(r) for r in rows]

        return await self._run(select)

    async def expire_grants(self, now: float) -> list[Grant]:
        def sweep(db: sqlite3.Connection) -> list[Grant]:
            rows = db.execute(
                "UPDATE approval_grant SET ended = 1 WHERE ended = 0 AND expires <= ?"  # noqa: S608
                " AND (kind = 'window' OR used_at IS NULL)"
                f" RETURNING {_GRANT_COLUMNS}",
                (now,),
            ).fetchall()
            return [_grant(r) for r in rows]

        return await self._run(sweep)

    # -- the token registry ----------------------------------------------------------------

    async def record_token(self, token: TokenRecord) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"  # noqa: S608
                " ON CONFLICT (jti) DO NOTHING",
                (
                    token.jti,
                    token.subject,
                    orjson.dumps(list(token.groups)).decode(),
                    token.issued_at,
                    token.expires_at,
                    token.revoked_at,
                ),
            )

        await self._run(insert)
        self._changed(TOKENS_CHANGED)

    async def revoke_token(self, jti: str, at: float) -> TokenRecord:
        def revoke(db: sqlite3.Connection) -> TokenRecord:
            db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE jti = ? AND revoked_at IS NULL", (at, jti)
            )
            record = _token(db, jti)
            if record is None:
                raise UnknownToken(jti)
            return record

        record = await self._run(revoke)
        self._changed(TOKENS_CHANGED)
        return record

    async def token(self, jti: str) -> TokenRecord | None:
        return await self._run(lambda db: _token(db, jti))

    async def tokens(self) -> list[TokenRecord]:
        def select(db: sqlite3.Connection) -> list[TokenRecord]:
            rows = db.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY issued_at, jti"  # noqa: S608
            ).fetchall()
            return [token_from_row(r) for r in rows]

        return await self._run(select)

    async def revoked_tokens(self) -> frozenset[str]:
        def select(db: sqlite3.Connection) -> frozenset[str]:
            rows = db.execute("SELECT jti FROM tokens WHERE revoked_at IS NOT NULL")
            return frozenset(jti for (jti,) in rows)

        return await self._run(select)

    # -- targets ---------------------------------------------------------------------------

    async def targets(self) -> dict[str, Target]:
        def select(db: sqlite3.Connection) -> dict[str, Target]:
            rows = db.execute("SELECT name, body FROM target ORDER BY name").fetchall()
            return {name: stored_target(name, body) for name, body in rows}

        return await self._run(select)

    async def add_target(self, target: Target, *, replace: bool = False) -> None:
        body = target_json(target).decode()

        def insert(db: sqlite3.Connection) -> None:
            if replace:
                db.execute(
                    "INSERT INTO target (name, body) VALUES (?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET body = excluded.body",
                    (target.name, body),
                )
                return
            try:
                db.execute("INSERT INTO target (name, body) VALUES (?, ?)", (target.name, body))
            except sqlite3.IntegrityError:
                raise TargetError(f"target {target.name} already exists") from None

        await self._run(insert)
        self._changed(TARGETS_CHANGED)

    async def remove_target(self, name: str) -> None:
        def delete(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM target WHERE name = ?", (name,)).rowcount == 0:
                raise TargetError(f"no target named {name}")

        await self._run(delete)
        self._changed(TARGETS_CHANGED)


def _token(db: sqlite3.Connection, jti: str) -> TokenRecord | None:
    row = db.execute(
        f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE jti = ?",  # noqa: S608
        (jti,),
    ).fetchone()
    return None if row is None else token_from_row(row)


def _insert_grant(db: sqlite3.Connection, g: Grant) -> None:
    db.execute(
        f"INSERT INTO approval_grant ({_GRANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
        (g.id, g.request_id, g.kind, g.subject, g.target, g.key, g.created, g.expires, None, None),
    )


def _load(db: sqlite3.Connection, request_id: str) -> ApprovalRequest | None:
    row = db.execute(
        "SELECT status, decided_at, note, body FROM approval_request WHERE id = ?", (request_id,)
    ).fetchone()
    if row is None:
        return None
    status, decided_at, note, body = row
    votes = tuple(
        Vote(request_id, subject, tuple(json.loads(groups)), verdict, vnote, time)
        for subject, groups, verdict, vnote, time in db.execute(
            "SELECT subject, groups, verdict, note, time FROM approval_vote"
            " WHERE request_id = ? ORDER BY time",
            (request_id,),
        )
    )
    d = json.loads(body)
    d.update(status=status, decided_at=decided_at, note=note)
    return ApprovalRequest.from_json(d, votes)
