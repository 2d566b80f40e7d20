"""What the token registry holds about a locally issued token (never the token itself).

The registry lives in the control store (gateway/control/), shared by every gateway that
serves the same users; `tokens.sqlite3` in the state directory is where it lived before,
imported once (gateway/control/legacy.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

# The registry's file before it moved into the control store.
LEGACY_REGISTRY_FILE = Path("tokens.sqlite3")

TokenStatus = Literal["active", "expired", "revoked"]


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


def token_from_row(row: Sequence[Any]) -> TokenRecord:
    """A record from a stored row: jti, subject, groups (a JSON list), issued_at,
    expires_at, revoked_at."""
    jti, subject, groups, issued_at, expires_at, revoked_at = row
    return TokenRecord(jti, subject, tuple(orjson.loads(groups)), issued_at, expires_at, revoked_at)
