"""The small protocols the proxy core depends on; one composition root wires real ones."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    # Types only: the audit package imports AuditUnavailable from here.
    from gateway.audit.events import (
        ApprovalEvent,
        SessionEvent,
        StatementOutcome,
        StatementRequest,
    )
    from gateway.control.models import ApprovalRequest, Grant
    from gateway.enforce.approvals import HoldEnd
    from gateway.identity.principal import Principal
    from gateway.policy.decision import Decision


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> Principal:
        """The token's principal, or TokenRejected naming the failed check."""
        ...

    def still_valid(self, principal: Principal) -> str | None:
        """None while the principal's token is valid; else why not (expired, revoked)."""
        ...

    def tokens_changed(self) -> bool:
        """Whether revocations (or signing keys) changed since the last call; polled often."""
        ...


class Decider(Protocol):
    async def decide(self, policy_input: dict[str, Any], *, not_after: float | None) -> Decision:
        """The decision for one input; never raises (failures are a deny with a reason)."""
        ...


@runtime_checkable
class PolicyRevision(Protocol):
    """A Decider that knows which policy revision is in force (the decision cache): a
    decision made under another is not reused. Checked once per session, not probed per
    statement."""

    @property
    def revision(self) -> str | None:
        """The revision in force now; None while that is unknown (OPA down, a change loading)."""
        ...


@runtime_checkable
class LiteralReads(Protocol):
    """A Decider that knows which parts of the input a revision's policy reads (the decision
    cache): whether texts that differ only in literals may share one decision."""

    def reads_literals(self, revision: str) -> bool:
        """Whether the policy of `revision` may read what texts of one shape differ in (the
        statement's text or parameters; a cost estimate is the caller's to rule out); True
        where its reads are unknown."""
        ...


class AuditSink(Protocol):
    async def request(self, record: StatementRequest) -> str:
        """Durably store a request record; its id. Raises AuditUnavailable if it cannot."""
        ...

    def request_soon(self, record: StatementRequest) -> asyncio.Future[str]:
        """request() for a caller that is not a coroutine: the record is queued now; the
        future holds its id once durable, or fails with AuditUnavailable."""
        ...

    async def outcome(self, record: StatementOutcome) -> None: ...

    def outcome_nowait(self, record: StatementOutcome) -> None:
        """Queue an outcome record; nobody waits for it (a failure to store it is logged)."""
        ...

    async def session(self, event: SessionEvent) -> None: ...

    async def approval(self, event: ApprovalEvent) -> None: ...


class Approvals(Protocol):
    """The approvals workflow as the session sees it (gateway/enforce/approvals.py)."""

    @property
    def wait_seconds(self) -> float: ...

    async def use_grant(
        self, principal: Principal, target: str, key: str, shape: str, session_id: str
    ) -> Grant | None:
        """A live grant for this statement, taken (a one-time one is used up)."""
        ...

    async def ask(self, request: ApprovalRequest, principal: Principal) -> None: ...

    async def hold(self, request: ApprovalRequest, principal: Principal) -> HoldEnd:
        """Until the request is decided, its wait ends, or it is withdrawn."""
        ...

    def withdraw(self, request_id: str) -> None: ...


class AuditUnavailable(Exception):
    """The audit store could not durably take a record."""
