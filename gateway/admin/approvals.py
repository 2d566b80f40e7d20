"""The approvals API on the admin listener: list, show, approve, deny, grants. Every call
carries the caller's own bearer token (the same tokens the data path verifies): an approver
is who its token says, and sees the requests it may decide, its own, or all (admin groups).

No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time,
and the caller dependency is local to the router."""

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from gateway.control.models import ApprovalRequest, RequestStatus
from gateway.control.rules import VoteRefused
from gateway.control.store import ControlStoreUnavailable, UnknownRequest
from gateway.enforce.approvals import ApprovalDesk
from gateway.identity.principal import Principal, TokenRejected

TokenCheck = Callable[[str], Awaitable[Principal]]


class VoteOut(BaseModel):
    subject: str
    groups: list[str]
    verdict: Literal["approve", "deny"]
    note: str
    time: float


class ApprovalOut(BaseModel):
    """An approval request as an approver reviews it."""

    id: str
    created: float
    status: RequestStatus
    principal: dict[str, Any]
    target: str
    database: str
    session_id: str
    instance: str
    text: str
    protocol: str
    params: list[str | None]
    facts: list[dict[str, Any]]
    fingerprint: str
    reasons: list[str]
    approvers: list[str]
    approvers_required: int
    justification: str
    decision_id: str | None
    audit_record: str | None
    wait_until: float
    decided_at: float | None
    note: str
    votes: list[VoteOut]


class GrantOut(BaseModel):
    id: str
    request_id: str
    kind: Literal["once", "window"]
    subject: str
    target: str
    created: float
    expires: float
    used_at: float | None
    used_by: str | None


class VoteIn(BaseModel):
    note: str = Field(default="", max_length=2000)
    # Approve only: grant the statement's shape for this long instead of this one run.
    window_seconds: float | None = Field(default=None, gt=0, le=7 * 86400)


class DenyIn(BaseModel):
    note: str = Field(default="", max_length=2000)


class DecisionOut(BaseModel):
    """The request after the vote; `decided` when this vote settled it."""

    request: ApprovalOut
    decided: bool
    grant: GrantOut | None


def _out(request: ApprovalRequest) -> ApprovalOut:
    return ApprovalOut.model_validate(request.to_json())


def may_see(
    subject: str, groups: Iterable[str], admins: frozenset[str], r: ApprovalRequest
) -> bool:
    """Who may read a request (the API and the console alike): its requester, an admin, or
    a member of a group it names as approvers (who may then decide it, check_voter says)."""
    mine = set(groups)
    return bool(subject == r.subject or mine & admins or mine.intersection(r.approvers))


def approvals_router(
    desk: ApprovalDesk, verify: TokenCheck, admin_groups: Iterable[str]
) -> APIRouter:
    router = APIRouter(prefix="/approvals", tags=["approvals"])
    admins = frozenset(admin_groups)

    async def caller(request: Request) -> Principal:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
        try:
            return await verify(token.strip())
        except TokenRejected as exc:
            raise HTTPException(
                401, f"token rejected: {exc.check}", {"WWW-Authenticate": "Bearer"}
            ) from None
        except ControlStoreUnavailable as exc:
            # The token's revocation cannot be checked: refused, and said to be temporary.
            raise HTTPException(503, f"the control store cannot be read: {exc}") from None

    Caller = Annotated[Principal, Depends(caller)]

    async def found(request_id: str, who: Principal) -> ApprovalRequest:
        r = await desk.store.request(request_id)
        # Another's request the caller may not decide reads as absent, not as forbidden.
        if r is None or not may_see(who.subject, who.groups, admins, r):
            raise HTTPException(404, f"no approval request {request_id}")
        return r

    @router.get("", response_model=list[ApprovalOut])
    async def list_requests(
        who: Caller,
        status: Annotated[RequestStatus | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[ApprovalOut]:
        """Requests the caller may decide (or made), newest first."""
        requests = await desk.store.requests(status, limit)
        return [_out(r) for r in requests if may_see(who.subject, who.groups, admins, r)]

    @router.get("/grants", response_model=list[GrantOut])
    async def grants(who: Caller, live: Annotated[bool, Query()] = True) -> list[GrantOut]:
        """Grants (live ones: usable now), newest first."""
        rows = await desk.store.grants(time.time() if live else None)
        mine = set(who.groups) & admins
        return [
            GrantOut.model_validate(g.to_json()) for g in rows if mine or g.subject == who.subject
        ]

    @router.get("/{request_id}", response_model=ApprovalOut)
    async def show(request_id: str, who: Caller) -> ApprovalOut:
        return _out(await found(request_id, who))

    async def decide(
        request_id: str, who: Principal, verdict: str, note: str, window: float | None
    ) -> DecisionOut:
        # Not found() first: whoever may not decide is told why (403), as the rules say it.
        try:
            judged = await desk.vote(request_id, who, verdict, note, window)
        except UnknownRequest:
            raise HTTPException(404, f"no approval request {request_id}") from None
        except VoteRefused as exc:
            raise HTTPException(exc.status, str(exc)) from None
        grant = judged.grant
        return DecisionOut(
            request=_out(judged.request),
            decided=judged.decided,
            grant=GrantOut.model_validate(grant.to_json()) if grant is not None else None,
        )

    @router.post("/{request_id}/approve", response_model=DecisionOut)
    async def approve(request_id: str, body: VoteIn, who: Caller) -> DecisionOut:
        """Approve: a held statement runs once enough distinct approvers have; after its
        hold ended, the approval is a one-time grant (or a time window)."""
        return await decide(request_id, who, "approve", body.note, body.window_seconds)

    @router.post("/{request_id}/deny", response_model=DecisionOut)
    async def deny(request_id: str, body: DenyIn, who: Caller) -> DecisionOut:
        """Deny: the held statement ends in an error carrying the note."""
        return await decide(request_id, who, "deny", body.note, None)

    return router
