"""The policy's answer for one statement: allow, deny or approve, with masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["allow", "deny", "approve"]
MASK_METHODS = frozenset({"redact", "null", "hash", "partial", "email"})


@dataclass(frozen=True, slots=True)
class Mask:
    schema: str
    table: str
    column: str
    method: str


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reasons: tuple[str, ...] = ()
    approvers: tuple[str, ...] = ()
    # For approve: how many distinct approvers must say yes (four eyes: 2).
    approvers_required: int = 1
    masks: tuple[Mask, ...] = ()
    decision_id: str | None = None
    bundle_revision: str | None = None
    cache_hit: bool = False
    # `"record_rows": true`: the rows the client receives (after masking) are recorded with
    # the statement's outcome.
    record_rows: bool = False
    # `"decide_with_params": true`: each Execute of the prepared statement is decided again
    # with its Bind parameters.
    decide_with_params: bool = False
    # Any other key of the policy's answer, kept as it came (nothing in pgwarden reads it).
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # True when pgwarden denied on the policy's behalf (OPA down, malformed answer, ...):
    # such a deny says nothing about the policy, so it is never cached.
    refused: bool = False

    @classmethod
    def refuse(cls, reason: str) -> Decision:
        """A deny made by pgwarden itself (OPA unreachable, malformed answer, ...)."""
        return cls(action="deny", reasons=(reason,), refused=True)
