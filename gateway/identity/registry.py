"""The record of locally issued tokens (never the tokens themselves) and their revocation."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson

from gateway.identity.checks import REVOKED, UNKNOWN_TOKEN

REGISTRY_FILE = Path("tokens.sqlite3")

TokenStatus = Literal["active", "expired", "revoked"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    groups TEXT NOT NULL,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL
)
"""


@dataclass(frozen=True, slots=True)
class TokenRecord:
    jti: str
    subject: str
    groups: tuple[str, ...]
    issued_at: float
    expires_at: float
    revoked_at: float | None = None

    def status(self, now: float) -> TokenStatus:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if now >= self.expires_at else "active"


class UnknownToken(LookupError):
    """No token with that id was issued here."""


class TokenRegistry:
    """One SQLite file shared by the CLI (which writes) and gateways (which check).

    Gateways keep the revoked ids in memory and look at the file again at most every
    `recheck_seconds`, reloading only when SQLite's data_version says another connection
    committed; `refresh()` looks at once (the gateway's revocation watch calls it on a short
    period), and a `fresh` rejection check (a login) looks at once too.
    """

    def __init__(
        self,
        path: Path,
        *,
        recheck_seconds: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Autocommit, so data_version is read outside any transaction and sees others' commits.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._lock = threading.Lock()
        self._recheck_seconds = recheck_seconds
        self._monotonic = monotonic
        with self._lock:
            self._db.execute(_SCHEMA)
        self._known: set[str] = set()
        self._revoked: set[str] = set()
        self._data_version = -1
        self._checked_at = float("-inf")
        # Set when a look at the file finds the revoked set changed; refresh() reports it.
        self._revocations_changed = False

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> TokenRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def record(self, token: TokenRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO tokens (jti, subject, groups, issued_at, expires_at, revoked_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    token.jti,
                    token.subject,
                    orjson.dumps(list(token.groups)).decode(),
                    token.issued_at,
                    token.expires_at,
                    token.revoked_at,
                ),
            )
            self._known.add(token.jti)

    def revoke(self, jti: str, *, at: float | None = None) -> TokenRecord:
        """The token's record after revoking it; a second revocation keeps the first time."""
        when = time.time() if at is None else at
        with self._lock:
            self._db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE jti = ? AND revoked_at IS NULL",
                (when, jti),
            )
            row = self._db.execute(f"{_SELECT} WHERE jti = ?", (jti,)).fetchone()
            if row is None:
                raise UnknownToken(jti)
            self._known.add(jti)
            self._revoked.add(jti)
            # This connection's own commit does not move its data_version: say so here.
            self._revocations_changed = True
        return _record(row)

    def find(self, jti: str) -> TokenRecord | None:
        with self._lock:
            row = self._db.execute(f"{_SELECT} WHERE jti = ?", (jti,)).fetchone()
        return None if row is None else _record(row)

    def tokens(self) -> list[TokenRecord]:
        """Every recorded token, oldest first."""
        with self._lock:
            rows = self._db.execute(f"{_SELECT} ORDER BY issued_at, jti").fetchall()
        return [_record(r) for r in rows]

    def rejection(self, jti: str, *, fresh: bool = False) -> str | None:
        """None if `jti` was issued here and is not revoked; else the failed check's name.
        `fresh`: look at the file now, so a revocation committed a moment ago counts."""
        with self._lock:
            self._refresh(force=fresh)
            if jti in self._revoked:
                return REVOKED
            if jti in self._known:
                return None
            # Issued after our last look (e.g. by the CLI a moment ago): ask the file once.
            row = self._db.execute("SELECT revoked_at FROM tokens WHERE jti = ?", (jti,)).fetchone()
            if row is None:
                return UNKNOWN_TOKEN
            self._known.add(jti)
            if row[0] is not None:
                self._revoked.add(jti)
                return REVOKED
            return None

    def refresh(self) -> bool:
        """Look at the file now; True if the set of revoked tokens changed since the last
        call, whichever look (this one, or a check's on the way) noticed it."""
        with self._lock:
            self._refresh(force=True)
            changed, self._revocations_changed = self._revocations_changed, False
            return changed

    def revoked_count(self) -> int:
        """Read the revocations now (a reload); how many there are. The change, if any, is
        still reported by the next refresh(), so the token watch ends the sessions it
        concerns."""
        with self._lock:
            self._refresh(force=True)
            return len(self._revoked)

    def _refresh(self, *, force: bool = False) -> None:
        now = self._monotonic()
        if not force and now - self._checked_at < self._recheck_seconds:
            return
        self._checked_at = now
        # One cheap pragma: it changes only when another connection has committed.
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        if version == self._data_version:
            return
        self._data_version = version
        rows = self._db.execute("SELECT jti FROM tokens WHERE revoked_at IS NOT NULL")
        revoked = {jti for (jti,) in rows}
        if revoked != self._revoked:
            self._revocations_changed = True
        self._revoked = revoked


_SELECT = "SELECT jti, subject, groups, issued_at, expires_at, revoked_at FROM tokens"


def _record(row: tuple[str, str, str, float, float, float | None]) -> TokenRecord:
    jti, subject, groups, issued_at, expires_at, revoked_at = row
    return TokenRecord(jti, subject, tuple(orjson.loads(groups)), issued_at, expires_at, revoked_at)
