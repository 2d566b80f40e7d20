"""The bundle revision of an OPA that pgwarden does not run, watched for the decision cache."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.policy.sidecar import RevisionListener
from gateway.policy.transport import OpaTransport, OpaUnreachable

log = logging.getLogger("pgwarden.policy")


class RevisionWatch:
    """Polls OPA's loaded bundle revision and reports it to the listener.

    The sidecar does this for the OPA it supervises (and also announces its own reloads).
    For an OPA given by URL nothing else would tell the decision cache that the policy
    changed until a cache miss happened to bring back a decision of the new revision:
    decisions kept in memory, and prepared statements' decisions, would outlive the
    policy. With the watch they outlive it by at most `poll_seconds`: the cache trusts a
    revision for `poll_seconds` after it was confirmed, and the watch polls twice as often,
    so that one slow poll does not stop reuse while OPA is healthy.
    """

    def __init__(
        self, transport: OpaTransport, listener: RevisionListener, *, poll_seconds: float = 1.0
    ) -> None:
        self.transport = transport
        self.listener = listener
        self.poll_seconds = poll_seconds
        self._task: asyncio.Task[None] | None = None
        # OPA answered the last poll (pgwarden_opa_up); pgwarden restarts no OPA of its own.
        self.up = False
        self.restarts = 0

    async def start(self) -> None:
        await self.poll()
        self._task = asyncio.create_task(self._run(), name="opa-revision-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def poll(self) -> None:
        try:
            revision = await self.transport.revision()
        except OpaUnreachable as exc:
            # Nothing is served from memory until OPA answers again with a revision.
            if self.up or self._task is None:
                # Once per change, not once a poll.
                log.warning("OPA down: %s", exc, extra={"event": "opa_down"})
            self.up = False
            self.listener.opa_down()
            return
        if not self.up:
            log.info("OPA up at %s", self.transport.url, extra={"event": "opa_up"})
        self.up = True
        self.listener.revision_seen(revision)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds / 2)
            try:
                await self.poll()
            except Exception:  # the watch must outlive any one bad poll
                log.exception("policy revision watch failed")
