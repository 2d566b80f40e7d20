"""The control plane's records: approval requests, approvers' votes and grants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# pending: held, waiting for approvers; approved: released while held; timed_out: the hold
# ended unanswered (an approval now makes a grant); granted: approved after the hold, as a
# grant; denied: an approver said no; withdrawn: the client cancelled or went away.
RequestStatus = Literal["pending", "approved", "timed_out", "granted", "denied", "withdrawn"]
# Where votes still count.
OPEN_STATUSES: frozenset[str] = frozenset({"pending", "timed_out"})
Verdict = Literal["approve", "deny"]
GrantKind = Literal["once", "window"]


@dataclass(frozen=True, slots=True)
class Vote:
    request_id: str
    subject: str
    groups: tuple[str, ...]
    verdict: Verdict
    note: str
    time: float


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """One held (or once-held) message: what the policy asked a person to decide on."""

    id: str
    created: float
    status: RequestStatus
    # The requester, as the token said: subject, issuer, groups, token id.
    principal: dict[str, Any]
    # TARGET (or TARGET/DATABASE) as the audit trail names it, and the database.
    target: str
    database: str
    session_id: str
    instance: str
    # The statements of the message, their facts (policy input) and Bind parameters.
    text: str
    protocol: str
    params: tuple[str | None, ...]
    facts: tuple[dict[str, Any], ...]
    fingerprint: str
    # What a one-time grant is keyed on: normalized text and parameters (see grants.py).
    grant_key: str
    reasons: tuple[str, ...]
    approvers: tuple[str, ...]
    approvers_required: int
    justification: str
    decision_id: str | None
    # The audit record of the statement (its request record).
    audit_record: str | None
    # When the hold ends (created + approval.wait_seconds).
    wait_until: float
    decided_at: float | None = None
    # The note of the approver whose vote decided it (a deny's reason).
    note: str = ""
    votes: tuple[Vote, ...] = field(default=())

    @property
    def subject(self) -> str:
        return str(self.principal.get("subject", ""))

    def approvals(self) -> tuple[Vote, ...]:
        return tuple(v for v in self.votes if v.verdict == "approve")

    @classmethod
    def from_json(cls, d: dict[str, Any], votes: tuple[Vote, ...] = ()) -> ApprovalRequest:
        return cls(
            id=d["id"],
            created=d["created"],
            status=d["status"],
            principal=d["principal"],
            target=d["target"],
            database=d["database"],
            session_id=d["session_id"],
            instance=d["instance"],
            text=d["text"],
            protocol=d["protocol"],
            params=tuple(d["params"]),
            facts=tuple(d["facts"]),
            fingerprint=d["fingerprint"],
            grant_key=d["grant_key"],
            reasons=tuple(d["reasons"]),
            approvers=tuple(d["approvers"]),
            approvers_required=d["approvers_required"],
            justification=d["justification"],
            decision_id=d["decision_id"],
            audit_record=d["audit_record"],
            wait_until=d["wait_until"],
            decided_at=d.get("decided_at"),
            note=d.get("note", ""),
            votes=votes,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created,
            "status": self.status,
            "principal": self.principal,
            "target": self.target,
            "database": self.database,
            "session_id": self.session_id,
            "instance": self.instance,
            "text": self.text,
            "protocol": self.protocol,
            "params": list(self.params),
            "facts": list(self.facts),
            "fingerprint": self.fingerprint,
            "grant_key": self.grant_key,
            "reasons": list(self.reasons),
            "approvers": list(self.approvers),
            "approvers_required": self.approvers_required,
            "justification": self.justification,
            "decision_id": self.decision_id,
            "audit_record": self.audit_record,
            "wait_until": self.wait_until,
            "decided_at": self.decided_at,
            "note": self.note,
            "votes": [
                {
                    "subject": v.subject,
                    "groups": list(v.groups),
                    "verdict": v.verdict,
                    "note": v.note,
                    "time": v.time,
                }
                for v in self.votes
            ],
        }


@dataclass(frozen=True, slots=True)
class Grant:
    """Leave to run a statement without being held: once (the same statement and parameters)
    or, for a time window, any statement of the same shape (fingerprint)."""

    id: str
    request_id: str
    kind: GrantKind
    subject: str
    target: str
    # grant_key for `once`, the fingerprint for `window`.
    key: str
    created: float
    expires: float
    used_at: float | None = None
    used_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "request_id": self.request_id,
            "kind": self.kind,
            "subject": self.subject,
            "target": self.target,
            "created": self.created,
            "expires": self.expires,
            "used_at": self.used_at,
            "used_by": self.used_by,
        }
