"""The asyncio listener and what every session shares: settings, targets, the ports, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gateway.control.mirror import ControlMirror
from gateway.control.targets import Target
from gateway.guards.rates import RateLimiter
from gateway.guards.rules import SessionRules
from gateway.metrics import GatewayMetrics, group_label
from gateway.proxy.cancel import CancelKeys
from gateway.proxy.gate import Analyzer, Catalog, PreparedRegistry, SessionContext, StatementGate
from gateway.proxy.ports import Approvals, AuditSink, Decider, TokenVerifier
from gateway.proxy.session import ClientSession
from gateway.settings import Settings

log = logging.getLogger("pgwarden.listener")


@dataclass
class GatewayContext:
    """Everything sessions share; built once by the composition root."""

    settings: Settings
    targets: ControlMirror
    verifier: TokenVerifier
    decider: Decider
    audit: AuditSink
    analyzer: Analyzer
    new_prepared: Callable[[], PreparedRegistry]
    # The catalog of one database of a target (each database has its own OIDs and names).
    catalog_for: Callable[[Target, str], Catalog | None]
    environ: Mapping[str, str]
    # Closes pgwarden's own connections to some databases of a target before a statement
    # that needs them free (DROP DATABASE, ...) is forwarded.
    free_databases: Callable[[Target, Sequence[str]], Awaitable[None]] | None = None
    server_tls: ssl.SSLContext | None = None
    # The policy's session rule (enforced settings, rate limits); None: no guards.
    session_rules: SessionRules | None = None
    rates: RateLimiter = field(default_factory=RateLimiter)
    # Key of the `hash` mask method: stable per gateway, never sent anywhere.
    mask_key: bytes = b""
    # The approvals workflow; None refuses what the policy holds for approval at once.
    approvals: Approvals | None = None
    cancel_keys: CancelKeys = field(default_factory=CancelKeys)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    sessions: set[ClientSession] = field(default_factory=set)
    background: set[asyncio.Future[None]] = field(default_factory=set)
    # Set whenever no session is open (the listener's shutdown waits on it).
    all_closed: asyncio.Event = field(default_factory=asyncio.Event)

    def make_gate(self, session: ClientSession, ctx: SessionContext) -> StatementGate:
        target = session.target
        assert target is not None
        free = self.free_databases
        return StatementGate(
            ctx,
            analyzer=self.analyzer,
            prepared=self.new_prepared(),
            catalog=self.catalog_for(target, session.database),
            decider=self.decider,
            audit=self.audit,
            free_databases=None if free is None else functools.partial(free, target),
            metrics=self.metrics,
            approvals=self.approvals,
        )

    def after_ddl(self, session: ClientSession) -> None:
        """DDL may change what `*` means: drop the database's cached catalog entries."""
        if session.target is None:
            return
        catalog = self.catalog_for(session.target, session.database)
        invalidate = getattr(catalog, "invalidate", None)
        if callable(invalidate):
            invalidate()


class Listener:
    """Accepts client connections; each becomes a ClientSession."""

    def __init__(self, gw: GatewayContext) -> None:
        self.gw = gw
        self._server: asyncio.Server | None = None
        self._token_watch: asyncio.Task[None] | None = None
        self._token_sweep: asyncio.Task[None] | None = None

    def open_sessions(self) -> Counter[tuple[str, str]]:
        """(target, group label) -> sessions past login, relaying now."""
        counts: Counter[tuple[str, str]] = Counter()
        for session in self.gw.sessions:
            if session.relaying and session.target is not None and session.principal is not None:
                counts[(session.target.name, group_label(session.principal.groups))] += 1
        return counts

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        s = self.gw.settings.listener
        self._server = await loop.create_server(
            lambda: ClientSession(self.gw), s.host, s.port, reuse_address=True, backlog=1024
        )
        sock = self._server.sockets[0].getsockname()
        self._token_watch = asyncio.ensure_future(self._watch_tokens())
        self._token_sweep = asyncio.ensure_future(self._sweep_tokens())
        return str(sock[0]), int(sock[1])

    async def _watch_tokens(self) -> None:
        """A revocation (`pgwarden tokens revoke`, another process) or a withdrawn signing
        key ends the sessions it concerns within one poll, idle ones included."""
        period = self.gw.settings.identity.revocation_poll_seconds
        while True:
            await asyncio.sleep(period)
            try:
                changed = self.gw.verifier.tokens_changed()
            except Exception as exc:  # a locked or unreadable registry: try again next time
                log.warning("token registry not readable: %s", exc)
                continue
            if changed:
                for session in list(self.gw.sessions):
                    session.recheck_token_now()

    async def _sweep_tokens(self) -> None:
        """The periodic recheck: every open session's token is asked again at least every
        identity.recheck_seconds (read each time: a reload applies to the next sweep), so
        an expired one ends while idle. One timer for the gateway, not one per session."""
        while True:
            await asyncio.sleep(self.gw.settings.identity.recheck_seconds)
            for session in list(self.gw.sessions):
                try:
                    session.recheck_token_now()
                except Exception:  # one session's bug must not end every session's recheck
                    log.exception("token recheck of session %s failed", session.id)

    async def drain(self, seconds: float, cut_short: asyncio.Event | None = None) -> None:
        """Stop accepting (new connections are refused), let every session finish what it
        is running for up to `seconds` (or until `cut_short` is set), then stop."""
        if self._server is not None:
            self._server.close()
        for session in list(self.gw.sessions):
            session.drain()
        if self.gw.sessions:
            waits = [asyncio.ensure_future(self.gw.all_closed.wait())]
            if cut_short is not None:
                waits.append(asyncio.ensure_future(cut_short.wait()))
            try:
                await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            if self.gw.sessions:
                log.warning(
                    "drain: %d session(s) still busy after %.1f s are closed",
                    len(self.gw.sessions),
                    seconds,
                )
        await self.stop()

    async def stop(self) -> None:
        for task in (self._token_watch, self._token_sweep):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._server is not None:
            self._server.close()
            for session in list(self.gw.sessions):
                session.shut_down()
            # Sessions write their session_end records from connection_lost, a later turn
            # of the loop: wait for them before the audit writer is closed.
            if self.gw.sessions:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.gw.all_closed.wait(), 2)
            await self._server.wait_closed()
