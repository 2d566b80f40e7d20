"""The kill switch: the gateway's live sessions as an operator sees them, and ending them
(the upstream query cancelled, the client told why with a FATAL, the kill audited)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

# How long a kill waits for the target to take the cancel before it answers anyway.
CANCEL_WAIT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class SessionSummary:
    id: str
    subject: str
    groups: tuple[str, ...]
    token_id: str
    target: str
    database: str
    client_addr: str
    application_name: str
    # Unix time the session started.
    since: float
    # Statements recorded so far (refused ones included), and rows relayed to the client.
    statements: int
    rows: int
    # The text of the statement the server is running for it now (None: idle).
    current_statement: str | None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["groups"] = list(self.groups)
        return out


class LiveSession(Protocol):
    def summary(self) -> SessionSummary | None:
        """None while the session is not relaying (not logged in yet, or closing)."""
        ...

    def kill(self, reason: str, by: str) -> asyncio.Future[None] | None:
        """End the session now; the cancel of its running query when one was sent."""
        ...


class SessionDirectory:
    """Lists and ends the sessions of one gateway."""

    def __init__(self, sessions: Callable[[], Iterable[LiveSession]]) -> None:
        self._sessions = sessions

    def summaries(self) -> list[SessionSummary]:
        summaries = [s.summary() for s in list(self._sessions())]
        return sorted((s for s in summaries if s is not None), key=lambda s: s.since)

    async def kill(
        self, *, reason: str, by: str, session_id: str | None = None, subject: str | None = None
    ) -> list[str]:
        """End the sessions with this id, or of this subject; the ids ended. Returns once
        the target has taken each running query's cancel (or CANCEL_WAIT_SECONDS passed)."""
        if (session_id is None) == (subject is None):
            raise ValueError("name a session id or a subject, not both")
        killed: list[str] = []
        cancels: list[asyncio.Future[None]] = []
        for session in list(self._sessions()):
            summary = session.summary()
            if summary is None:
                continue
            if summary.id != session_id and summary.subject != subject:
                continue
            cancel = session.kill(reason, by)
            killed.append(summary.id)
            if cancel is not None:
                cancels.append(cancel)
        if cancels:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*cancels, return_exceptions=True), CANCEL_WAIT_SECONDS
                )
        return killed
