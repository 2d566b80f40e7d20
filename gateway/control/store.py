"""The control-plane store's one interface, and the choice of its backend from settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from gateway.control.models import ApprovalRequest, Grant, RequestStatus
from gateway.control.rules import Ballot, Judgement
from gateway.control.targets import Target
from gateway.identity.registry import TokenRecord

if TYPE_CHECKING:
    from gateway.settings import Settings

# Called with what changed (here or, for a shared store, through another gateway): an
# approval request's id, or one of the names below.
ChangeListener = Callable[[str], None]
# A token was issued or revoked.
TOKENS_CHANGED = "tokens"
# A target was added, replaced or removed.
TARGETS_CHANGED = "targets"
# Anything may have changed unseen (a shared store's notifications were not being received
# for a while): every listener should look again.
ANYTHING_CHANGED = "*"


class ControlStoreUnavailable(Exception):
    """The control store cannot be read or written now (down, unreachable, closed)."""


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

    # -- the token registry: what was issued (never the token itself) and revoked ---------

    async def record_token(self, token: TokenRecord) -> None:
        """Record an issued token; recording the same id again changes nothing."""
        ...

    async def revoke_token(self, jti: str, at: float) -> TokenRecord:
        """The token's record after revoking it (a second revocation keeps the first
        time); raises UnknownToken."""
        ...

    async def token(self, jti: str) -> TokenRecord | None: ...

    async def tokens(self) -> list[TokenRecord]:
        """Every recorded token, oldest first."""
        ...

    async def revoked_tokens(self) -> frozenset[str]: ...

    # -- targets ---------------------------------------------------------------------------

    async def targets(self) -> dict[str, Target]: ...

    async def add_target(self, target: Target, *, replace: bool = False) -> None:
        """TargetError if one of that name exists and not `replace`."""
        ...

    async def remove_target(self, name: str) -> None:
        """TargetError if there is none of that name."""
        ...

    @property
    def notifies_others(self) -> bool:
        """Whether changes made through other processes are told to listeners now (a
        shared store whose notification channel is open); if not, readers poll."""
        ...


def control_store(settings: Settings, *, listen: bool = True) -> ControlStore:
    """The store the settings select, not yet started. `listen`: receive other processes'
    changes (a gateway does; a CLI command that reads or writes once does not)."""
    c = settings.control
    if c.store == "postgres":
        from gateway.control.postgres_store import PostgresControlStore

        if not c.postgres_dsn:
            raise ValueError("control.store = postgres needs control.postgres_dsn")
        return PostgresControlStore(c.postgres_dsn, listen=listen)
    from gateway.control.sqlite_store import SqliteControlStore

    return SqliteControlStore(settings.state_path(c.sqlite_path))
