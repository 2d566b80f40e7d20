"""The console's audit pages: search the trail (a GET form, a results table, older pages),
replay a session one step at a time, and the chain's state panel. Read-only, for the
admin and auditor groups (console.console_audit_groups)."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from gateway.audit.reader import AuditReader
from gateway.audit.records import RECORD_KINDS
from gateway.audit.search import SEARCH_ACTIONS, AuditQuery, BadSearch, parse_when
from gateway.audit.store import AuditStoreError
from gateway.console.deps import ConsoleDeps
from gateway.console.people import Person
from gateway.console.render import page, utc
from gateway.console.web_session import SignedIn

PAGE_SIZE = 50
# The chain panel reuses a verify this recent: a walk of the whole trail on every page
# view would cost CPU in proportion to the trail; "Verify now" asks for a fresh one.
CHAIN_MAX_AGE = 60.0
# The search form's fields, as GET parameters (a search is a link one can share).
_FIELDS = ("subject", "group", "target", "action", "kind", "session", "since", "until", "text")


@dataclass(frozen=True)
class SearchForm:
    """The form's values as typed (shown back), and the query they make."""

    values: dict[str, str]

    @classmethod
    def of(cls, request: Request) -> SearchForm:
        params = request.query_params
        return cls({f: params.get(f, "").strip() for f in _FIELDS})

    def query(self, now: float) -> AuditQuery:
        v = {k: (value or None) for k, value in self.values.items()}

        def when(name: str) -> float | None:
            text = v[name]
            if text is None:
                return None
            try:
                # A time without an offset is UTC, as the pages show times.
                return parse_when(text, now, dt.UTC)
            except ValueError as exc:
                raise BadSearch(name, str(exc).removeprefix("bad time ")) from None

        return AuditQuery(
            subject=v["subject"], group=v["group"], target=v["target"], action=v["action"],
            kind=v["kind"], session_id=v["session"], since=when("since"), until=when("until"),
            text=v["text"],
        )  # fmt: skip

    def link(self, **extra: Any) -> str:
        """This search's URL, with `extra` parameters (a page's `before`)."""
        kept = {k: value for k, value in self.values.items() if value}
        return "/console/audit?" + urlencode({**kept, **extra})


def audit_pages_router(deps: ConsoleDeps, reader: AuditReader) -> APIRouter:
    router = APIRouter()
    may_read = deps.audit_groups

    def refused(request: Request, person: Person) -> Response | None:
        if may_read & person.groups:
            return None
        return page(
            request,
            "audit_refused.html",
            status_code=403,
            groups=sorted(may_read),
        )

    async def chain_panel(fresh: bool) -> dict[str, Any]:
        try:
            state = await reader.chain(0.0 if fresh else CHAIN_MAX_AGE)
        except AuditStoreError as exc:
            return {"chain": None, "chain_error": str(exc)}
        return {"chain": state, "chain_error": None}

    @router.get("/console/audit", response_class=HTMLResponse)
    async def search(request: Request, person: SignedIn) -> Response:
        no = refused(request, person)
        if no is not None:
            return no
        form = SearchForm.of(request)
        before_text = request.query_params.get("before", "")
        before = int(before_text) if before_text.isdigit() and int(before_text) > 0 else None
        error = None
        results = None
        try:
            results = await reader.search(form.query(time.time()), PAGE_SIZE, before)
        except BadSearch as exc:
            error = str(exc)
        except AuditStoreError as exc:
            error = f"The audit store cannot be read: {exc}"
        fresh = request.query_params.get("verify") == "now"
        return page(
            request,
            "audit.html",
            status_code=422 if error is not None and results is None else 200,
            form=form,
            actions=SEARCH_ACTIONS,
            kinds=RECORD_KINDS,
            results=results,
            error=error,
            paged=before is not None,
            utc=utc,
            **(await chain_panel(fresh)),
        )

    @router.get("/console/audit/sessions/{session_id}", response_class=HTMLResponse)
    async def replay(request: Request, session_id: str, person: SignedIn) -> Response:
        no = refused(request, person)
        if no is not None:
            return no
        try:
            timeline = await reader.session(session_id)
        except AuditStoreError as exc:
            return page(
                request, "audit_session.html", status_code=503, timeline=None,
                session_id=session_id, error=f"The audit store cannot be read: {exc}", utc=utc,
            )  # fmt: skip
        if timeline is None:
            return page(
                request, "audit_session.html", status_code=404, timeline=None,
                session_id=session_id, error="No audit records name this session.", utc=utc,
            )  # fmt: skip
        wanted = request.query_params.get("step", "1")
        count = len(timeline.steps)
        number = min(max(int(wanted), 1), count) if wanted.isdigit() else 1
        return page(
            request,
            "audit_session.html",
            timeline=timeline,
            session_id=session_id,
            step=timeline.steps[number - 1],
            count=count,
            error=None,
            utc=utc,
        )

    return router
