"""Audit events: what the gateway records about sessions and statements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from gateway.identity.principal import Principal
from gateway.policy.decision import Decision

if TYPE_CHECKING:
    from gateway.audit.records import RequestTemplate

SessionEventKind = Literal["session_start", "session_end", "auth_failure", "session_kill"]


@dataclass(frozen=True, slots=True)
class SessionEvent:
    kind: SessionEventKind
    time: float
    instance: str
    session_id: str
    client_addr: str
    application_name: str
    startup_user: str
    target: str
    principal: Principal | None
    # Why a session ended or authentication failed (client quit, token expired, ...).
    reason: str = ""


@dataclass(frozen=True, slots=True)
class StatementRequest:
    """Written, durably, before the statement is forwarded (or when it is refused)."""

    time: float
    instance: str
    session_id: str
    client_addr: str
    application_name: str
    principal: Principal | None
    target: str
    text: str
    fingerprint: str
    protocol: str
    params: tuple[str | None, ...]
    decision: Decision
    approval_id: str | None = None
    # Output columns masked for this statement, as schema.table.column.
    masked_columns: tuple[str, ...] = ()
    # Whether result rows of this statement are recorded with it.
    record_rows: bool = False
    # This record as its plan pre-encoded it (every field but time, text and params), where
    # the statement runs on a plan: the sink splices those in instead of encoding it all.
    template: RequestTemplate | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class StatementOutcome:
    request_id: str
    time: float
    command_tag: str | None
    rows: int | None
    sqlstate: str | None
    error_message: str | None
    duration_ms: float
    bytes_out: int
    # Recorded result rows (after masking) when the request asked for it.
    recorded_rows: tuple[tuple[str | None, ...], ...] = field(default=())
    # The recorded rows' column names, as the client saw them in RowDescription.
    recorded_columns: tuple[str, ...] = field(default=())
    forwarded: bool = True
    # Rows (or COPY data messages) of the result not relayed: over the decision's budget.
    rows_withheld: int = 0


# What happened to an approval request: asked; one approver's vote; decided (approved while
# held, granted after the hold, denied); the hold ended unanswered (timed_out) or by the
# client (withdrawn); a grant used in place of a hold; a grant that ended unused, or whose
# time window closed.
ApprovalEventKind = Literal[
    "requested",
    "vote",
    "approved",
    "granted",
    "denied",
    "timed_out",
    "withdrawn",
    "grant_used",
    "grant_expired",
]


@dataclass(frozen=True, slots=True)
class ApprovalEvent:
    event: ApprovalEventKind
    time: float
    instance: str
    approval_id: str
    # Who acted: the requester (requested, timed_out, withdrawn, grant_used) or the approver.
    principal: Principal | None
    target: str
    session_id: str
    # The audit record of the held statement (its request record).
    request_id: str | None
    status: str
    note: str = ""
    grant_id: str | None = None
    grant_kind: str | None = None
    grant_expires: float | None = None
