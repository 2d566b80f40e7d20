"""The control-plane store's one interface, and the choice of its backend from settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from gateway.control.models import ApprovalRequest, Grant, RequestStatus
from gateway.control.rules import Ballot, Judgement

if TYPE_CHECKING:
    from gateway.settings import Settings

# Called with a request id whenever that request changed (here or, for a shared store,
# through another gateway).
ChangeListener = Callable[[str], None]


class UnknownRequest(KeyError):
    """No approval request has that id."""


class ControlStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def on_change(self, listener: ChangeListener) -> None: ...

    async def create_request(self, request: ApprovalRequest) -> None: ...

    async def request(self, request_id: str) -> ApprovalRequest | None: ...

    async def requests(
        self, status: RequestStatus | None = None, limit: int = 100
    ) -> list[ApprovalRequest]: ...

    async def vote(
        self, request_id: str, ballot: Ballot, now: float, grant_seconds: float
    ) -> Judgement:
        """Apply rules.judge() to the request as stored, atomically; raises UnknownRequest or
        VoteRefused."""
        ...

    async def settle(
        self, request_id: str, to: RequestStatus, now: float
    ) -> tuple[ApprovalRequest, bool]:
        """Move a pending request to `to` (timed_out, withdrawn) unless a vote decided it
        first: the request as it now stands, and whether it moved."""
        ...

    async def use_grant(
        self, subject: str, target: str, grant_key: str, fingerprint: str, now: float, used_by: str
    ) -> Grant | None:
        """A live grant for this statement, a one-time one consumed (two sessions racing
        for it: one gets it); a time window's is only looked at."""
        ...

    async def grants(self, live_at: float | None = None) -> list[Grant]: ...

    async def expire_grants(self, now: float) -> list[Grant]:
        """Grants that ended unused (one-time) or whose window closed, each returned once
        (several gateways sweeping: one of them gets it), so that its end is recorded."""
        ...


def control_store(settings: Settings) -> ControlStore:
    c = settings.control
    if c.store == "postgres":
        from gateway.control.postgres_store import PostgresControlStore

        if not c.postgres_dsn:
            raise ValueError("control.store = postgres needs control.postgres_dsn")
        return PostgresControlStore(c.postgres_dsn)
    from gateway.control.sqlite_store import SqliteControlStore

    return SqliteControlStore(settings.state_path(c.sqlite_path))
