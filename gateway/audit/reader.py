"""The audit trail as people read it on a running gateway (the admin API, the console): a
store opened for reading beside the writer, searched a page at a time, a session's
timeline, and the chain's state verified off the gateway's event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.audit.chain_state import ChainState, chain_state
from gateway.audit.keys import AuditKeyring, HeadWitness
from gateway.audit.log import AuditLog
from gateway.audit.search import AuditQuery, SearchPage, search_page
from gateway.audit.store import AuditStore
from gateway.audit.timeline import SessionTimeline, session_timeline


class AuditReader:
    """`make_store()` gives a new, unopened store of the trail; one is opened on first use
    and kept, another for each verify (which runs on a thread with its own event loop)."""

    def __init__(
        self,
        make_store: Callable[[], AuditStore],
        keyring: AuditKeyring,
        heads: HeadWitness,
        trail: AuditLog,
        instance: str,
    ) -> None:
        self.make_store = make_store
        self.keyring = keyring
        self.heads = heads
        self.trail = trail
        self.instance = instance
        self._store: AuditStore | None = None
        self._opening = asyncio.Lock()
        # One verify at a time: callers arriving while it runs share its result.
        self._verifying: asyncio.Future[ChainState] | None = None
        self._verified: tuple[float, ChainState] | None = None

    async def _opened(self) -> AuditStore:
        async with self._opening:
            if self._store is None:
                store = self.make_store()
                await store.open()
                self._store = store
            return self._store

    async def search(
        self, query: AuditQuery, limit: int = 50, before: int | None = None
    ) -> SearchPage:
        return await search_page(await self._opened(), query, limit, before)

    async def session(self, session_id: str) -> SessionTimeline | None:
        return await session_timeline(await self._opened(), session_id)

    async def chain(self, max_age: float = 0.0) -> ChainState:
        """The whole trail verified as `pgwarden audit verify` does, or the last result when
        it is at most `max_age` seconds old. Walking every record costs CPU in proportion to
        the trail: done on a thread of its own, so that the gateway's sessions (on this event
        loop) are not held up meanwhile."""
        if self._verified is not None and time.time() - self._verified[0] <= max_age:
            return self._verified[1]
        if self._verifying is None or self._verifying.done():
            self._verifying = asyncio.ensure_future(asyncio.to_thread(self._verify_on_thread))
        state = await asyncio.shield(self._verifying)
        self._verified = (state.checked_at, state)
        return state

    def _verify_on_thread(self) -> ChainState:
        async def work() -> ChainState:
            store = self.make_store()
            await store.open()
            try:
                return await chain_state(store, self.keyring, self.heads, self.trail, self.instance)
            finally:
                await store.close()

        return asyncio.run(work())

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None
