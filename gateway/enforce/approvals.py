"""The approvals workflow: a statement the policy answered `approve` for is asked about,
held until its approvers decide (or its wait ends, or the client withdraws it), and every
step is an audit record; an approval after the hold is a grant the statement runs under."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from pglast import parse_sql
from pglast.stream import RawStream

from gateway.audit.events import ApprovalEvent, ApprovalEventKind
from gateway.control.models import ApprovalRequest, Grant, RequestStatus
from gateway.control.rules import Ballot, Judgement, new_id
from gateway.control.store import ANYTHING_CHANGED, ControlStore, UnknownRequest
from gateway.identity.principal import Principal

if TYPE_CHECKING:
    from gateway.proxy.ports import AuditSink
    from gateway.settings import ApprovalSettings

log = logging.getLogger("pgwarden.approvals")

# Called with the event name ("requested", or the decision) and the request, for the webhook.
Announce = Callable[[str, ApprovalRequest], None]


def normalized_text(text: str) -> str:
    """One spelling of a statement, literals kept: what a one-time grant names. Case and
    spacing of keywords and unquoted names do not matter; where the parser refuses the
    text, its whitespace runs are folded."""
    try:
        return str(RawStream()(parse_sql(text)))
    except Exception:
        return " ".join(text.split())


def grant_key(texts: tuple[str, ...], params: tuple[str | None, ...]) -> str:
    """The key of a one-time grant: the message's normalized statements and its Bind
    parameters (another parameter is another statement)."""
    body = orjson.dumps([[normalized_text(t) for t in texts], list(params)])
    return hashlib.sha256(body).hexdigest()


def shape_key(fingerprints: tuple[str, ...]) -> str:
    """The key of a time-window grant: the statements' shapes (literals left out)."""
    return "\x00".join(fingerprints)


@dataclass(frozen=True, slots=True)
class HoldEnd:
    """How a hold ended: the request as it then stood."""

    request: ApprovalRequest

    @property
    def runs(self) -> bool:
        return self.request.status == "approved"


class ApprovalDesk:
    """One per gateway: asks, holds, takes votes and grants, over the control store."""

    def __init__(
        self,
        store: ControlStore,
        audit: AuditSink,
        settings: ApprovalSettings,
        *,
        instance: str,
        poll_seconds: float,
        announce: Announce | None = None,
    ) -> None:
        self.store = store
        self.audit = audit
        self.settings = settings
        self.instance = instance
        self.poll_seconds = poll_seconds
        self.announce = announce
        # Request id → woken when the store says it changed (here, or through another gateway).
        self._waiting: dict[str, asyncio.Event] = {}
        self._withdrawn: set[str] = set()
        self._background: set[asyncio.Future[HoldEnd]] = set()
        self._sweeper: asyncio.Future[None] | None = None
        store.on_change(self._changed)

    @property
    def wait_seconds(self) -> float:
        return self.settings.wait_seconds

    def _changed(self, request_id: str) -> None:
        if request_id == ANYTHING_CHANGED:
            # Notifications may have been missed (a LISTEN connection reopened): every held
            # statement looks at its request again.
            for waiting in self._waiting.values():
                waiting.set()
            return
        event = self._waiting.get(request_id)
        if event is not None:
            # A shared store's notifications arrive on its connection's callbacks.
            event.set()

    def start(self, sweep_seconds: float = 5.0) -> None:
        """Record the end of grants as they expire (checked every `sweep_seconds`)."""
        self._sweeper = asyncio.ensure_future(self._sweep(sweep_seconds))

    async def _sweep(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.sweep_grants()
            except Exception as exc:  # the store is down: the next sweep records them
                log.warning("approvals: expired grants not swept: %s", exc)

    async def sweep_grants(self) -> list[Grant]:
        """Record each grant that has ended unused (or whose window closed) once."""
        ended = await self.store.expire_grants(time.time())
        for grant in ended:
            await self._record(
                "grant_expired",
                grant.request_id,
                None,
                grant.target,
                "",
                None,
                "expired",
                grant=grant,
            )
        return ended

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._background:
            await asyncio.wait(list(self._background), timeout=2)

    # -- the data path -----------------------------------------------------------------------

    async def use_grant(
        self, principal: Principal, target: str, key: str, shape: str, session_id: str
    ) -> Grant | None:
        """A live grant for this statement, taken (a one-time one is used up); recorded."""
        grant = await self.store.use_grant(
            principal.subject, target, key, shape, time.time(), session_id
        )
        if grant is not None:
            await self._record(
                "grant_used",
                grant.request_id,
                principal,
                target,
                session_id,
                None,
                "used",
                grant=grant,
            )
        return grant

    async def ask(self, request: ApprovalRequest, principal: Principal) -> None:
        """Store the request, record it, and tell the webhook."""
        await self.store.create_request(request)
        await self._record(
            "requested",
            request.id,
            principal,
            request.target,
            request.session_id,
            request.audit_record,
            request.status,
            note=request.justification,
        )
        self._announce("requested", request)

    def withdraw(self, request_id: str) -> None:
        """The client cancelled the held statement (a CancelRequest)."""
        self._withdrawn.add(request_id)
        self._changed(request_id)

    async def hold(self, request: ApprovalRequest, principal: Principal) -> HoldEnd:
        """Wait until the request is decided, its wait ends, or it is withdrawn (a
        CancelRequest); a disconnect (the task cancelled) withdraws it too."""
        changed = self._waiting.setdefault(request.id, asyncio.Event())
        try:
            while True:
                changed.clear()
                current = await self.store.request(request.id)
                if current is None:
                    raise UnknownRequest(request.id)
                if current.status != "pending":
                    return HoldEnd(current)
                if request.id in self._withdrawn:
                    return await self._settle(current, principal, "withdrawn")
                remaining = current.wait_until - time.time()
                if remaining <= 0:
                    return await self._settle(current, principal, "timed_out")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(remaining, self.poll_seconds))
        except asyncio.CancelledError:
            # The client went away: the request is withdrawn, in a task of its own (this
            # one is being cancelled).
            self._spawn(self._settle(request, principal, "withdrawn"))
            raise
        finally:
            self._waiting.pop(request.id, None)
            self._withdrawn.discard(request.id)

    async def _settle(
        self, request: ApprovalRequest, principal: Principal, to: RequestStatus
    ) -> HoldEnd:
        after, moved = await self.store.settle(request.id, to, time.time())
        if moved:
            await self._record(
                to,  # type: ignore[arg-type]
                request.id,
                principal,
                request.target,
                request.session_id,
                request.audit_record,
                to,
            )
            self._announce(to, after)
        return HoldEnd(after)

    # -- approvers ---------------------------------------------------------------------------

    async def vote(
        self,
        request_id: str,
        approver: Principal,
        verdict: str,
        note: str,
        window_seconds: float | None = None,
    ) -> Judgement:
        """One approver's vote; raises UnknownRequest or VoteRefused (controls.rules)."""
        ballot = Ballot(
            approver.subject,
            approver.groups,
            "deny" if verdict == "deny" else "approve",
            note,
            window_seconds,
        )
        judged = await self.store.vote(request_id, ballot, time.time(), self.settings.grant_seconds)
        r = judged.request
        await self._record(
            "vote", r.id, approver, r.target, r.session_id, r.audit_record, r.status, note=note
        )
        if judged.decided:
            await self._record(
                r.status,  # type: ignore[arg-type]
                r.id,
                approver,
                r.target,
                r.session_id,
                r.audit_record,
                r.status,
                note=note,
                grant=judged.grant,
            )
            self._announce(r.status, r)
        return judged

    # -- records -----------------------------------------------------------------------------

    async def _record(
        self,
        event: ApprovalEventKind,
        approval_id: str,
        principal: Principal | None,
        target: str,
        session_id: str,
        request_id: str | None,
        status: str,
        *,
        note: str = "",
        grant: Grant | None = None,
    ) -> None:
        await self.audit.approval(
            ApprovalEvent(
                event=event,
                time=time.time(),
                instance=self.instance,
                approval_id=approval_id,
                principal=principal,
                target=target,
                session_id=session_id,
                request_id=request_id,
                status=status,
                note=note,
                grant_id=grant.id if grant is not None else None,
                grant_kind=grant.kind if grant is not None else None,
                grant_expires=grant.expires if grant is not None else None,
            )
        )

    def _announce(self, event: str, request: ApprovalRequest) -> None:
        if self.announce is not None:
            try:
                self.announce(event, request)
            except Exception:
                log.exception("approvals: the webhook could not take event %s", event)

    def _spawn(self, coro: Coroutine[Any, Any, HoldEnd]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def new_request_id() -> str:
    return new_id("apr")
