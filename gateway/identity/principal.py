"""Who is behind a connection: the verified identity that a token carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    issuer: str
    groups: tuple[str, ...]
    token_id: str
    # Unix time after which the token is no longer valid (None: no expiry claim).
    expires_at: float | None
    claims: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # The issuer's key that verified the token (OIDC), so its withdrawal can end sessions.
    key_id: str | None = field(default=None, compare=False)

    def to_input(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "groups": list(self.groups),
            "token_id": self.token_id,
            "claims": self.claims,
        }


class TokenRejected(Exception):
    """A token failed a check; the message names the check and never holds the token."""

    def __init__(self, check: str) -> None:
        super().__init__(check)
        self.check = check
