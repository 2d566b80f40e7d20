"""The catalog's metadata connection to one database of a target: opened when first
needed, one query at a time, not retried for a while after it failed, closed when unused."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

_T = TypeVar("_T")

Connect = Callable[[], Awaitable[Any]]

log = logging.getLogger("pgwarden.catalog")

# How reading the catalog fails when it is unavailable: the network or the server (refused,
# reset, timed out, the connection closed under a query) or the server's own error (the
# database dropped, a permission revoked, the query cancelled). Anything else raised on the
# way is a bug in pgwarden: it propagates, and is never reported as "catalog_unavailable".
CATALOG_FAILURES: tuple[type[Exception], ...] = (
    OSError,  # ConnectionError and TimeoutError (asyncio's too) included
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


class CatalogConnection:
    """One lazy connection for a Catalog. `on_close` runs whenever it is closed (idle, after
    a failure, on request): what was read over it describes the database it was in."""

    def __init__(
        self,
        connect: Connect | str,
        *,
        timeout: float,
        retry_after: float,
        idle_seconds: float,
        on_close: Callable[[], None],
    ) -> None:
        if isinstance(connect, str):
            dsn = connect

            async def _connect() -> Any:
                # A name operators (and tests) can tell apart in pg_stat_activity.
                return await asyncpg.connect(
                    dsn, timeout=timeout, server_settings={"application_name": "pgwarden-catalog"}
                )

            self._connect: Connect = _connect
        else:
            self._connect = connect
        self.timeout = timeout
        # The role it logged in as (for `$user` in a search_path), once connected.
        self.user: str | None = None
        self._on_close = on_close
        self._retry_after = retry_after
        self._conn: Any = None
        self._failed_at: float | None = None
        self._lock = asyncio.Lock()
        # Closing the connection when unused this long (0: never).
        self._idle_seconds = idle_seconds
        self._used_at = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Future[None]] = set()

    async def release(self) -> None:
        """Close now, once the query in flight (if any) is done."""
        async with self._lock:
            await self.close()

    def lost(self) -> bool:
        """Whether the server ended the connection since it was last used (it is then
        forgotten; the next query opens another)."""
        if self._conn is not None and self._conn.is_closed():
            self._conn = None
            self._disarm_idle()
            return True
        return False

    async def close(self) -> None:
        self._disarm_idle()
        self._on_close()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=self.timeout)
            except CATALOG_FAILURES:
                conn.terminate()

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        async def work(conn: Any) -> list[Any]:
            return list(await conn.fetch(query, *args, timeout=self.timeout))

        return await self.run(work)

    async def run(self, work: Callable[[Any], Awaitable[_T]]) -> _T:
        """`work` on the metadata connection, one at a time; after a dropped connection one
        fresh attempt, then the failure (and no reconnect for a while)."""
        async with self._lock:
            try:
                for attempt in (1, 2):
                    conn = await self._connection()
                    try:
                        return await work(conn)
                    except CATALOG_FAILURES as exc:
                        # A dropped connection: one fresh attempt, then report unavailable.
                        await self.close()
                        if attempt == 2:
                            self._failed_at = time.monotonic()
                            log.warning("catalog unavailable: %s: %s", type(exc).__name__, exc)
                            raise
            finally:
                self._used_at = time.monotonic()
                self._arm_idle()
        raise AssertionError("unreachable")

    # An open connection keeps its database from being dropped, renamed or copied (and
    # takes a server slot): one nobody has used for `idle_seconds` is closed.

    def _arm_idle(self) -> None:
        if self._idle_timer is None and self._conn is not None and self._idle_seconds > 0:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self._idle_seconds, self._idle_due)

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_due(self) -> None:
        self._idle_timer = None
        if self._conn is None:
            return
        left = self._used_at + self._idle_seconds - time.monotonic()
        if left > 0 or self._lock.locked():
            # Used since, or in use now (its end arms the timer again).
            if not self._lock.locked():
                self._idle_timer = asyncio.get_running_loop().call_later(left, self._idle_due)
            return
        task = asyncio.ensure_future(self._close_if_idle())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_if_idle(self) -> None:
        async with self._lock:
            if time.monotonic() - self._used_at >= self._idle_seconds:
                await self.close()
            else:
                self._arm_idle()

    async def _plan_once(self, conn: Any) -> None:
        """Metadata queries are prepared (asyncpg) and take arrays of names: with the
        server's default plan_cache_mode each call was planned again, as its custom plans
        never looked dearer than a generic one, and planning cost more than running (about
        0.3-0.5 ms a lookup, per statement while writes move the snapshot). A generic plan
        over the catalogs' indexes serves every call. PostgreSQL before 12 has no such
        setting: it then plans as it always did."""
        with contextlib.suppress(asyncpg.UndefinedObjectError):
            await conn.execute(
                "SELECT pg_catalog.set_config('plan_cache_mode', 'force_generic_plan', false)",
                timeout=self.timeout,
            )

    async def _connection(self) -> Any:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        if self._failed_at is not None and time.monotonic() - self._failed_at < self._retry_after:
            # Do not make every statement wait a connect timeout while the target is down.
            raise ConnectionError("catalog connection failed recently")
        try:
            self._conn = await asyncio.wait_for(self._connect(), self.timeout)
            self.user = await self._conn.fetchval("SELECT current_user", timeout=self.timeout)
            await self._plan_once(self._conn)
        except CATALOG_FAILURES as exc:
            self._failed_at = time.monotonic()
            self._conn = None
            log.warning("catalog connection failed: %s: %s", type(exc).__name__, exc)
            raise
        self._failed_at = None
        return self._conn
