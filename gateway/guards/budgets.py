"""Row and byte budgets from the decision's `limits`: how much of a statement's result may
reach the client, and what the client is told when the rest is withheld.

`limits` (all optional, positive integers): `max_rows` and `max_bytes` per statement (rows:
DataRow or COPY TO STDOUT data messages; bytes: those messages as relayed), `max_rows_total`
per session (rows relayed by all its statements), `statement_timeout_ms` (the statement is
cancelled once it has run that long since pgwarden forwarded it). Over a budget the rows
already relayed stay with the client, no further row is relayed, the upstream query is
cancelled, and the statement ends with ErrorResponse 54000 (57014 for the timeout) naming
the budget and the decision id, in place of the server's own end of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.protocol import ErrorResponse

OVER_BUDGET = "54000"  # program_limit_exceeded
TIMED_OUT = "57014"  # query_canceled, as PostgreSQL's own statement_timeout
_KEYS = ("max_rows", "max_bytes", "max_rows_total", "statement_timeout_ms")


@dataclass(frozen=True, slots=True)
class StatementLimits:
    max_rows: int | None = None
    max_bytes: int | None = None
    max_rows_total: int | None = None
    statement_timeout_ms: int | None = None


def parse_limits(value: Any) -> StatementLimits:
    """The decision's `limits`; ValueError for anything that cannot be enforced as meant."""
    if not isinstance(value, dict):
        raise ValueError("limits must be an object")
    unknown = set(value) - set(_KEYS)
    if unknown:
        raise ValueError(f"unknown limits: {', '.join(sorted(unknown))}")
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
            raise ValueError(f"limits.{key} must be a positive whole number")
    return StatementLimits(**value)


class RowBudget:
    """One statement's budget as its result is relayed (owned by its StatementRun)."""

    __slots__ = (
        "cancelled",
        "cut",
        "decision_id",
        "error",
        "max_bytes",
        "max_rows",
        "rows",
        "size",
        "withheld",
    )

    def __init__(
        self, *, max_rows: int | None, max_bytes: int | None, decision_id: str | None
    ) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.decision_id = decision_id
        self.rows = 0
        self.size = 0
        self.withheld = 0
        # The budget ran out: the rest of the result is withheld and the statement ends with
        # `error` (set once, when it ran out).
        self.cut = False
        self.error = b""
        # The session has sent the CancelRequest for it.
        self.cancelled = False

    def admit(self, frame_size: int) -> bool:
        """Whether one more row of `frame_size` bytes may be relayed; counts it either way."""
        if self.cut:
            self.withheld += 1
            return False
        if self.max_rows is not None and self.rows + 1 > self.max_rows:
            self._run_out(OVER_BUDGET, f"row budget of {self.max_rows} exceeded")
        elif self.max_bytes is not None and self.size + frame_size > self.max_bytes:
            self._run_out(OVER_BUDGET, f"byte budget of {self.max_bytes} exceeded")
        else:
            self.rows += 1
            self.size += frame_size
            return True
        self.withheld += 1
        return False

    def time_out(self, ms: int) -> None:
        if not self.cut:
            self._run_out(TIMED_OUT, f"statement timeout of {ms} ms exceeded")

    def _run_out(self, sqlstate: str, what: str) -> None:
        self.cut = True
        detail = f"decision id: {self.decision_id}" if self.decision_id else None
        self.error = ErrorResponse.build(
            "ERROR",
            sqlstate,
            f"pgwarden: {what}",
            detail=detail,
            hint="the rows before this error were relayed; the rest were withheld",
        ).encode()
