"""The console's approvals page: the requests a person may read (the approvals API's
`may_see`), each with its statement highlighted, the policy's reasons and facts, how long it
has waited and its four-eyes progress; approve (once, or a window) or deny with a note.

Buttons appear only where the control store's own rules (`judge`) would take the person's
vote, and the vote itself goes through `ApprovalDesk.vote`, which applies them again: the
page never decides who may vote. The list is refreshed by polling a fragment
(/console/approvals/pending) every POLL_SECONDS: it reads the control store afresh, so a
request made or decided through another gateway sharing the store shows as soon as one made
here, and no response stays open on the admin listener (a stop or drain is not held up)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gateway.admin.approvals import may_see
from gateway.console.deps import ConsoleDeps
from gateway.console.highlight import Span, highlight
from gateway.console.people import Person, acting_principal
from gateway.console.render import flash, flashed, page, store_unavailable, templates
from gateway.console.web_session import SignedIn, csrf_token, form_fields
from gateway.control.models import OPEN_STATUSES, ApprovalRequest
from gateway.control.rules import Ballot, VoteRefused, judge
from gateway.control.store import ControlStoreUnavailable, UnknownRequest

POLL_SECONDS = 2
# Requests read per refresh; decided ones beyond the newest DECIDED_SHOWN are left out.
READ_LIMIT = 200
DECIDED_SHOWN = 10
# "Approve for": once (this run), or a window for the statement's shape, in seconds.
WINDOWS: dict[str, float | None] = {
    "once": None,
    "900": 900.0,
    "3600": 3600.0,
    "28800": 8 * 3600.0,
    "86400": 86400.0,
}
WINDOW_LABELS = {
    "once": "this run only",
    "900": "15 minutes",
    "3600": "1 hour",
    "28800": "8 hours",
    "86400": "24 hours",
}


@dataclass(frozen=True)
class StatementView:
    command: str
    reads: list[str]
    writes: list[str]
    columns: list[str]
    no_where: bool


@dataclass(frozen=True)
class RequestView:
    """One request as the page shows it to one person."""

    request: ApprovalRequest
    statement: list[Span]
    statements: list[StatementView]
    may_decide: bool
    # Why there are no buttons (the rules' own words), when there are none.
    why_not: str
    approvals: int
    # Changes whenever what the card shows changes (the page's refresh swaps such cards).
    version: str

    @property
    def requester(self) -> str:
        return self.request.subject

    @property
    def requester_groups(self) -> list[str]:
        groups = self.request.principal.get("groups", [])
        return [str(g) for g in groups] if isinstance(groups, list) else []


def _names(items: Any, *parts: str) -> list[str]:
    out: list[str] = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            name = ".".join(str(item[p]) for p in parts if item.get(p))
            if name and name not in out:
                out.append(name)
    return out


def statement_views(request: ApprovalRequest) -> list[StatementView]:
    views = []
    for facts in request.facts:
        writes = _names(facts.get("writes"), "schema", "table")
        command = str(facts.get("command", ""))
        views.append(
            StatementView(
                command=command,
                reads=_names(facts.get("reads"), "schema", "table"),
                writes=writes,
                columns=_names(facts.get("columns"), "table", "column"),
                # A write with no WHERE touches every row: the fact approvers look for first.
                no_where=bool(writes) and not facts.get("has_where", False),
            )
        )
    return views


def request_view(request: ApprovalRequest, person: Person, grant_seconds: float) -> RequestView:
    ballot = Ballot(person.subject, tuple(sorted(person.groups)), "approve", "")
    why_not = ""
    try:
        # The store's own rules, as the vote would meet them (pure: nothing is changed).
        judge(request, ballot, time.time(), grant_seconds)
    except VoteRefused as exc:
        why_not = str(exc)
    votes = "|".join(f"{v.subject}:{v.verdict}" for v in request.votes)
    version = hashlib.sha256(f"{request.status}|{votes}|{why_not}".encode()).hexdigest()[:16]
    return RequestView(
        request=request,
        statement=highlight(request.text),
        statements=statement_views(request),
        may_decide=not why_not,
        why_not=why_not,
        approvals=len(request.approvals()),
        version=version,
    )


async def visible_requests(
    deps: ConsoleDeps, person: Person
) -> tuple[list[RequestView], list[RequestView]]:
    """(waiting, recently decided) requests the person may read, newest first."""
    assert deps.approvals is not None
    grant_seconds = deps.approvals.settings.grant_seconds
    waiting: list[RequestView] = []
    decided: list[RequestView] = []
    for r in await deps.approvals.store.requests(None, READ_LIMIT):
        if not may_see(person.subject, person.groups, deps.admin_groups, r):
            continue
        if r.status in OPEN_STATUSES:
            waiting.append(request_view(r, person, grant_seconds))
        elif len(decided) < DECIDED_SHOWN:
            decided.append(request_view(r, person, grant_seconds))
    return waiting, decided


def approvals_router(deps: ConsoleDeps) -> APIRouter:
    router = APIRouter()

    async def context(person: Person) -> dict[str, Any]:
        if deps.approvals is None:
            return {"unavailable": "This gateway holds no statements for approval."}
        try:
            waiting, decided = await visible_requests(deps, person)
        except ControlStoreUnavailable as exc:
            return store_unavailable(exc)
        return {
            "waiting": waiting,
            "decided": decided,
            "now": time.time(),
            "windows": WINDOW_LABELS,
            "poll_seconds": POLL_SECONDS,
        }

    @router.get("/console/approvals", response_class=HTMLResponse)
    async def approvals(request: Request, person: SignedIn) -> Response:
        return page(
            request,
            "approvals.html",
            notice=flashed(request),
            **await context(person),
        )

    @router.get("/console/approvals/pending", response_class=HTMLResponse)
    async def pending(request: Request, person: SignedIn) -> Response:
        return templates.TemplateResponse(
            request,
            "_approval_list.html",
            {"csrf_token": csrf_token(request), "person": person, **await context(person)},
        )

    @router.post("/console/approvals/{request_id}")
    async def decide(request_id: str, request: Request, person: SignedIn) -> Response:
        fields = await form_fields(request)
        verdict = fields.get("verdict")
        note = fields.get("note", "").strip()
        window_choice = fields.get("window", "once")
        problem = None
        if deps.approvals is None:
            problem, status = "This gateway holds no statements for approval.", 404
        elif verdict not in ("approve", "deny"):
            problem, status = "Choose approve or deny.", 400
        elif len(note) > 2000:
            problem, status = "The note is longer than 2000 characters.", 400
        elif window_choice not in WINDOWS:
            problem, status = "Choose how long the approval lasts from the list.", 400
        if problem is None:
            assert deps.approvals is not None and verdict is not None
            window = WINDOWS[window_choice] if verdict == "approve" else None
            try:
                judged = await deps.approvals.vote(
                    request_id, acting_principal(person), verdict, note, window
                )
            except UnknownRequest:
                problem, status = f"No approval request {request_id}.", 404
            except VoteRefused as exc:
                problem, status = f"Your vote was not taken: {exc}.", exc.status
            except ControlStoreUnavailable as exc:
                problem, status = f"The control store cannot be written just now: {exc}", 503
        if problem is not None:
            return page(
                request,
                "approvals.html",
                status_code=status,
                error=problem,
                **await context(person),
            )
        r = judged.request
        if judged.decided:
            said = f"Request {r.id} is now {r.status}."
        else:
            said = (
                f"Your approval of {r.id} counts: {len(r.approvals())} of {r.approvers_required}."
            )
        flash(request, said)
        # Post/redirect/get: a reload does not vote again.
        return RedirectResponse("/console/approvals", status_code=303)

    return router
