"""A gateway's in-memory copy of the targets and the revoked tokens, read on the login and
statement paths without I/O, and kept fresh from the control store: at once when the store
says something changed (a shared store's NOTIFY, or a change made here), and by polling
while it cannot say (SQLite, or a shared store whose LISTEN connection is being reopened)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.control.store import (
    ANYTHING_CHANGED,
    TARGETS_CHANGED,
    TOKENS_CHANGED,
    ControlStore,
    ControlStoreUnavailable,
)
from gateway.control.targets import Target, TargetError
from gateway.identity.checks import REVOKED, UNKNOWN_TOKEN
from gateway.identity.registry import TokenRecord

log = logging.getLogger("pgwarden.control")

SAFETY_POLL_SECONDS = 30.0


class ControlMirror:
    def __init__(self, store: ControlStore, *, poll_seconds: float) -> None:
        self.store = store
        self._poll_seconds = poll_seconds
        self._targets: dict[str, Target] = {}
        self._revoked: frozenset[str] = frozenset()
        # Why the last look at the store failed; None while it answers.
        self.problem: str | None = None
        # Set when a look finds the revoked set changed; revocations_changed() reports it.
        self._revocations_changed = False
        self._wake = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        store.on_change(self._store_changed)

    async def start(self) -> None:
        """Read everything once (raises if the store cannot be read), then keep watching."""
        await self.refresh()
        if self.problem is not None:
            raise ControlStoreUnavailable(self.problem)
        self._watch = asyncio.ensure_future(self._keep_fresh())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    def _store_changed(self, what: str) -> None:
        if what in (TOKENS_CHANGED, TARGETS_CHANGED, ANYTHING_CHANGED):
            self._wake.set()

    async def _keep_fresh(self) -> None:
        while True:
            # Told of changes: a slow look all the same, in case a connection died without
            # the store noticing (no notification would then arrive, nor news of the loss).
            told = self.store.notifies_others and self.problem is None
            period = max(self._poll_seconds, SAFETY_POLL_SECONDS) if told else self._poll_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), period)
            self._wake.clear()
            await self.refresh()

    async def refresh(self) -> dict[str, Target]:
        """Read the targets and revocations now; the targets by name (the last ones read
        if the store does not answer: `problem` then says why)."""
        try:
            targets = await self.store.targets()
            revoked = await self.store.revoked_tokens()
        except Exception as exc:  # whatever it is, logins cannot be checked: fail closed
            if self.problem is None:
                log.warning(
                    "control store not readable: %s (logins are refused until it is)",
                    exc,
                    exc_info=not isinstance(exc, ControlStoreUnavailable | TargetError | OSError),
                    extra={"event": "control_unavailable"},
                )
            self.problem = str(exc)
            return dict(self._targets)
        if self.problem is not None:
            log.info("control store readable again", extra={"event": "control_available"})
            self.problem = None
        if revoked != self._revoked:
            self._revocations_changed = True
        self._targets, self._revoked = targets, revoked
        return dict(targets)

    # -- targets, as the proxy asks for them -----------------------------------------------

    def get(self, name: str) -> Target | None:
        return self._targets.get(name)

    def all(self) -> list[Target]:
        return sorted(self._targets.values(), key=lambda t: t.name)

    # -- tokens ----------------------------------------------------------------------------

    async def token(self, jti: str) -> TokenRecord | None:
        """The token's record as the store holds it now (a login asks: a token issued or
        revoked a moment ago counts); ControlStoreUnavailable if it cannot be asked."""
        record = await self.store.token(jti)
        if record is not None and record.revoked_at is not None and jti not in self._revoked:
            self._revoked = self._revoked | {jti}
            self._revocations_changed = True
        return record

    async def fresh_rejection(self, jti: str) -> str | None:
        record = await self.token(jti)
        if record is None:
            return UNKNOWN_TOKEN
        return REVOKED if record.revoked_at is not None else None

    def rejection(self, jti: str) -> str | None:
        """A session's token, known at its login, checked against the revocations read
        last (no I/O: every statement asks)."""
        return REVOKED if jti in self._revoked else None

    def revocations_changed(self) -> bool:
        """True once after the revoked set changed, whichever look noticed it."""
        changed, self._revocations_changed = self._revocations_changed, False
        return changed

    def revoked_count(self) -> int:
        return len(self._revoked)
