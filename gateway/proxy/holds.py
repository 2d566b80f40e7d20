"""What a client reads about a statement held for approval: the notice when it is held,
and the error when the hold ends without it running."""

from __future__ import annotations

from gateway.control.models import ApprovalRequest, Grant
from gateway.policy.decision import Decision
from gateway.protocol import ErrorResponse, NoticeResponse

# The SQLSTATEs: refused (insufficient_privilege), cancelled by the client (query_canceled),
# and pgwarden could not ask (system_error).
REFUSED = "42501"
CANCELED = "57014"
CANNOT_ASK = "58000"


def _who(request: ApprovalRequest) -> str:
    who = " or ".join(request.approvers) or "an approver"
    if request.approvers_required > 1:
        who = f"{request.approvers_required} distinct approvers from {who}"
    return who


def _reason(request: ApprovalRequest) -> str:
    return request.reasons[0] if request.reasons else "the policy gave no reason"


def approve_command(request_id: str) -> str:
    return f"pgwarden approvals approve {request_id} --note '...'"


def held_notice(request: ApprovalRequest, wait_seconds: float) -> bytes:
    """Sent the moment the statement is held, before anyone has decided."""
    detail = [f"approval request: {request.id}", f"approvers: {_who(request)}"]
    if request.justification:
        detail.append(f"justification: {request.justification}")
    if request.decision_id:
        detail.append(f"decision id: {request.decision_id}")
    waits = f"held for up to {wait_seconds:g} s" if wait_seconds > 0 else "not held"
    return NoticeResponse.build(
        "NOTICE",
        "00000",
        f"pgwarden: approval requested ({request.id}), {waits}: {_reason(request)}",
        detail="\n".join(detail),
        hint=f"an approver runs: {approve_command(request.id)}",
    ).encode()


def grant_notice(grant: Grant) -> bytes:
    until = "used up now" if grant.kind == "once" else "a time window"
    return NoticeResponse.build(
        "NOTICE",
        "00000",
        f"pgwarden: runs under grant {grant.id} ({until}) of approval request {grant.request_id}",
    ).encode()


def hold_refusal(request: ApprovalRequest, decision: Decision, wait_seconds: float) -> bytes:
    """The error in place of a held statement that does not run."""
    detail = [f"approval request: {request.id}"]
    if len(request.reasons) > 1:
        detail.append("also: " + "; ".join(request.reasons[1:]))
    if decision.decision_id:
        detail.append(f"decision id: {decision.decision_id}")
    if request.status == "denied":
        who = next((v.subject for v in request.votes if v.verdict == "deny"), "an approver")
        note = f": {request.note}" if request.note else ""
        message = f"pgwarden: approval denied by {who}{note}"
        return ErrorResponse.build("ERROR", REFUSED, message, detail="\n".join(detail)).encode()
    if request.status == "withdrawn":
        return ErrorResponse.build(
            "ERROR",
            CANCELED,
            "canceling statement due to user request",
            detail=f"pgwarden: approval request {request.id} withdrawn; the statement did not run",
        ).encode()
    # Timed out (or asked without a wait): it may run once it is approved.
    if request.audit_record:
        detail.append(f"statement record: pgwarden audit show {request.audit_record}")
    waited = f"no approver decided within {wait_seconds:g} s" if wait_seconds > 0 else "not held"
    return ErrorResponse.build(
        "ERROR",
        REFUSED,
        f"pgwarden: approval required: {_reason(request)}",
        detail="\n".join(detail),
        hint=(
            f"It did not run ({waited}). Ask {_who(request)} to approve it"
            f" ({approve_command(request.id)}), then run the same statement again: it then"
            " runs once."
        ),
    ).encode()


def cannot_ask(problem: str) -> bytes:
    return ErrorResponse.build(
        "ERROR",
        CANNOT_ASK,
        f"pgwarden: approval request could not be made, statement not run ({problem})",
    ).encode()
