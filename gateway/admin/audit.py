"""The audit API on the admin listener: search the trail a page at a time, a session's
timeline, the chain's state. Audit records hold statement text (literals may be secrets)
and recorded rows: every call needs a bearer token of an admin or auditor group, even on
loopback, as /sessions does.

No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time."""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel

from gateway.audit.reader import AuditReader
from gateway.audit.search import MAX_PAGE, AuditQuery, BadSearch, RecordSummary
from gateway.audit.store import AuditStoreError
from gateway.audit.timeline import SessionTimeline
from gateway.identity.principal import Principal


class SearchOut(BaseModel):
    records: list[RecordSummary]
    # Pass as `before` for the next (older) page; null on the last page.
    next_before: int | None


class HeadOut(BaseModel):
    chain: str
    seq: int
    link: str


class ChainOut(BaseModel):
    """The trail verified as `pgwarden audit verify --json` reports it (`verify`), the
    newest record indexed, each chain's head witness and how far the index lags the log."""

    ok: bool
    problems: list[str]
    verify: dict[str, Any]
    last_record: dict[str, Any] | None
    heads: list[HeadOut]
    index_lag: int | None
    checked_at: float


def audit_router(
    reader: AuditReader, auditor: Callable[[Request], Awaitable[Principal]]
) -> APIRouter:
    router = APIRouter(prefix="/audit", tags=["audit"])
    Auditor = Annotated[Principal, Depends(auditor)]

    @router.get("/records", response_model=SearchOut)
    async def records(
        who: Auditor,
        subject: Annotated[str | None, Query(max_length=500)] = None,
        group: Annotated[str | None, Query(max_length=500)] = None,
        target: Annotated[str | None, Query(max_length=500)] = None,
        action: Annotated[
            str | None, Query(description="allow, deny, approve, or mask (allowed, masked)")
        ] = None,
        kind: Annotated[str | None, Query(description="Record kind, e.g. request")] = None,
        session: Annotated[str | None, Query(max_length=200)] = None,
        since: Annotated[float | None, Query(description="Unix seconds, inclusive")] = None,
        until: Annotated[float | None, Query(description="Unix seconds, exclusive")] = None,
        text: Annotated[str | None, Query(max_length=2000)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        before: Annotated[
            int | None, Query(ge=1, description="next_before of the page before")
        ] = None,
    ) -> SearchOut:
        """Records matching every filter given, newest first."""
        query = AuditQuery(
            subject=subject, group=group, target=target, action=action, kind=kind,
            session_id=session, since=since, until=until, text=text,
        )  # fmt: skip
        try:
            page = await reader.search(query, limit, before)
        except BadSearch as exc:
            raise HTTPException(422, str(exc)) from None
        except AuditStoreError as exc:
            raise HTTPException(503, f"the audit store cannot be read: {exc}") from None
        return SearchOut(records=list(page.records), next_before=page.next_before)

    @router.get("/sessions/{session_id}", response_model=SessionTimeline)
    async def session(session_id: str, who: Auditor) -> SessionTimeline:
        """The session's timeline: login, each statement with its decision and outcome
        (recorded rows after masking), approvals, kill, end; oldest first."""
        try:
            timeline = await reader.session(session_id)
        except AuditStoreError as exc:
            raise HTTPException(503, f"the audit store cannot be read: {exc}") from None
        if timeline is None:
            raise HTTPException(404, f"no audit records of session {session_id}")
        return timeline

    @router.get("/chain", response_model=ChainOut)
    async def chain(who: Auditor) -> ChainOut:
        """Every chain verified (as `pgwarden audit verify`), the last record, the heads."""
        try:
            state = await reader.chain()
        except AuditStoreError as exc:
            raise HTTPException(503, f"the audit store cannot be read: {exc}") from None
        return ChainOut.model_validate(state.as_json())

    return router
