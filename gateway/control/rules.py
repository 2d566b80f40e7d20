"""Who may vote on an approval request, and what a vote makes of it: pure functions the
stores apply inside their transaction, so that two approvers voting at once count once each."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

from gateway.control.models import (
    OPEN_STATUSES,
    ApprovalRequest,
    Grant,
    RequestStatus,
    Verdict,
    Vote,
)

# A hold whose gateway went away never marks its request timed out: past its end by this
# much, a pending request is taken as timed out (an approval then makes a grant).
ORPHANED_AFTER_SECONDS = 5.0


class VoteRefused(Exception):
    """The vote does not count; the message says why. `status` is the HTTP status that fits."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Ballot:
    """One approver's vote as the API received it."""

    subject: str
    groups: tuple[str, ...]
    verdict: Verdict
    note: str
    # An approver may grant the statement's shape for this long instead of this one run.
    window_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Judgement:
    request: ApprovalRequest
    vote: Vote
    grant: Grant | None
    # The request's status changed with this vote (it was decided).
    decided: bool


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


def check_voter(request: ApprovalRequest, ballot: Ballot) -> None:
    """Raise VoteRefused unless `ballot`'s author may vote on `request` at all."""
    if ballot.subject == request.subject:
        # Four eyes: whatever the requester's groups, its own request needs someone else.
        raise VoteRefused("a requester may not approve or deny its own request")
    if not set(ballot.groups).intersection(request.approvers):
        wanted = " or ".join(request.approvers)
        raise VoteRefused(f"only members of {wanted} may decide this request")
    if any(v.subject == ballot.subject for v in request.votes):
        raise VoteRefused(f"{ballot.subject} has already voted on this request", 409)


def judge(request: ApprovalRequest, ballot: Ballot, now: float, grant_seconds: float) -> Judgement:
    """The request after `ballot`, and the grant an approval after the hold makes."""
    status: RequestStatus = request.status
    if status == "pending" and now > request.wait_until + ORPHANED_AFTER_SECONDS:
        status = "timed_out"
    if status not in OPEN_STATUSES:
        raise VoteRefused(f"request {request.id} is {status}", 409)
    check_voter(request, ballot)
    vote = Vote(request.id, ballot.subject, ballot.groups, ballot.verdict, ballot.note, now)
    votes = (*request.votes, vote)
    if ballot.verdict == "deny":
        decided = replace(request, status="denied", votes=votes, decided_at=now, note=ballot.note)
        return Judgement(decided, vote, None, True)
    approvals = sum(1 for v in votes if v.verdict == "approve")
    if approvals < request.approvers_required:
        return Judgement(replace(request, status=status, votes=votes), vote, None, False)
    grant = None
    if ballot.window_seconds is not None:
        grant = Grant(
            new_id("grant"),
            request.id,
            "window",
            request.subject,
            request.target,
            request.fingerprint,
            now,
            now + ballot.window_seconds,
        )
    elif status == "timed_out":
        grant = Grant(
            new_id("grant"),
            request.id,
            "once",
            request.subject,
            request.target,
            request.grant_key,
            now,
            now + grant_seconds,
        )
    final: RequestStatus = "approved" if status == "pending" else "granted"
    decided = replace(request, status=final, votes=votes, decided_at=now, note=ballot.note)
    return Judgement(decided, vote, grant, True)
