"""Reads a JWT's header and claims without trusting them, only to choose who verifies it."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.identity.checks import MALFORMED
from gateway.identity.principal import TokenRejected

# Real tokens are a few KiB at most; a bound keeps hostile input from costing much before
# any signature has been checked. The gateway's own, tighter bound is the setting
# identity.max_token_bytes (checked first, as "token too large"); this is the hard ceiling.
MAX_TOKEN_LENGTH = 1024 * 1024


@dataclass(frozen=True, slots=True)
class UnverifiedToken:
    header: dict[str, Any]
    claims: dict[str, Any]

    @property
    def issuer(self) -> str | None:
        iss = self.claims.get("iss")
        return iss if isinstance(iss, str) else None


def _segment(text: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise TokenRejected(MALFORMED) from exc
    if not isinstance(value, dict):
        raise TokenRejected(MALFORMED)
    return value


def peek(token: str) -> UnverifiedToken:
    """The header and claims as written; TokenRejected("malformed token") if unreadable."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise TokenRejected(MALFORMED)
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenRejected(MALFORMED)
    header = _segment(parts[0])
    # RFC 7515 makes `alg` mandatory; without it there is nothing to check a signature by.
    if not isinstance(header.get("alg"), str):
        raise TokenRejected(MALFORMED)
    return UnverifiedToken(header, _segment(parts[1]))
