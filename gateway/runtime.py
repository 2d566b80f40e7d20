"""The composition root: builds the real identity, policy, audit and catalog parts from
Settings, wires them into the listener, and tears them down in order."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from gateway.admin import AdminListener, admin_app, check_admin_settings, gateway_registry
from gateway.admin.app import AdminAccess, is_loopback
from gateway.admin.exposition import GatewayState
from gateway.admin.readiness import ReadinessChecks
from gateway.audit import AuditProcess, AuditWriter, WriteAheadAudit, audit_sink
from gateway.console import ConsoleDeps, mount_console
from gateway.control import ControlStore
from gateway.control.client import open_control_store
from gateway.control.mirror import ControlMirror
from gateway.control.targets import Target
from gateway.enforce.approvals import ApprovalDesk
from gateway.enforce.webhook import Webhook
from gateway.guards.kill import SessionDirectory
from gateway.guards.rules import OpaSessionRules
from gateway.identity.verifier import IdentityVerifier
from gateway.policy.cache import DecisionCache
from gateway.policy.opa import OpaDecider
from gateway.policy.sidecar import OpaSidecar
from gateway.policy.transport import OpaTransport
from gateway.policy.watch import RevisionWatch
from gateway.proxy.gate import Catalog as CatalogPort
from gateway.proxy.listener import GatewayContext, Listener
from gateway.proxy.tls import server_context, upstream_context
from gateway.reload import settings_change, targets_change
from gateway.settings import Settings
from gateway.sql.analyzer import StatementAnalyzer
from gateway.sql.catalog import Catalog
from gateway.sql.prepared import PreparedStatements

log = logging.getLogger("pgwarden")


def catalog_connector(target: Target, database: str, environ: Mapping[str, str]) -> Any:
    async def connect() -> Any:
        return await asyncpg.connect(
            host=target.host,
            port=target.port,
            user=target.user,
            password=target.password(environ),
            database=database,
            ssl=upstream_context(target) or False,
            timeout=5,
            server_settings={"application_name": "pgwarden-catalog"},
        )

    return connect


def load_or_create_key(path: Path) -> bytes:
    """A 32-byte secret kept in the state directory (0600), made on first use."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class Gateway:
    """One running gateway: `await start()` returns the listening address; `await stop()`."""

    def __init__(self, settings: Settings, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.environ = environ
        self.context: GatewayContext | None = None
        self.sidecar: OpaSidecar | None = None
        self.audit: WriteAheadAudit | AuditWriter | AuditProcess | None = None
        self.control: ControlStore | None = None
        self.mirror: ControlMirror | None = None
        self.approvals: ApprovalDesk | None = None
        self.webhook: Webhook | None = None
        self.verifier: IdentityVerifier | None = None
        self.decider: DecisionCache | None = None
        self._transport: OpaTransport | None = None
        self._revision_watch: RevisionWatch | None = None
        self._listener: Listener | None = None
        self.admin: AdminListener | None = None
        # One per (target, database): names, OIDs and caches differ from database to database.
        self._catalogs: dict[tuple[str, str], Catalog] = {}
        self.address: tuple[str, int] | None = None
        # Set once a drain begins: no new connections; readiness should say not ready.
        self.draining = False
        # The targets as the last start or reload saw them, to say what a reload changed.
        self._targets_seen: dict[str, Target] = {}

    def _catalog_for(self, target: Target, database: str) -> CatalogPort | None:
        catalog = self._catalogs.get((target.name, database))
        if catalog is None:
            catalog = Catalog(
                catalog_connector(target, database, self.environ),
                idle_seconds=self.settings.catalog.idle_seconds,
            )
            self._catalogs[(target.name, database)] = catalog
        return catalog

    async def _free_databases(self, target: Target, databases: Sequence[str]) -> None:
        """Close pgwarden's own connections to `databases` (a statement about to be
        forwarded through `target` drops, renames or copies them); the sessions' are the
        clients' own. Every target's catalog of such a name is released, not only
        `target`'s: several targets may name the same server (by other host names, as other
        roles), and releasing one on another server costs only a reconnect."""
        wanted = set(databases)
        for (_, database), catalog in list(self._catalogs.items()):
            if database in wanted:
                await catalog.release()

    async def start(self) -> tuple[str, int]:
        """Start every part; if one fails, stop those already started (OPA, the audit
        writer, ...) and raise."""
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> tuple[str, int]:
        s = self.settings
        if s.admin.port:
            # Before anything starts: an unsafe admin address is a configuration error.
            check_admin_settings(s.admin)
        s.state_dir.mkdir(parents=True, exist_ok=True)
        # The targets and the token registry first: no login is checked without them.
        control = await open_control_store(s)
        self.control = control
        self.mirror = ControlMirror(control, poll_seconds=s.identity.revocation_poll_seconds)
        await self.mirror.start()
        self.verifier = IdentityVerifier.from_settings(s, self.mirror)
        self.verifier.start()
        opa_url = s.policy.opa_url
        if not opa_url:
            self.sidecar = OpaSidecar.from_settings(s)
            await self.sidecar.start()
            opa_url = self.sidecar.url
        self._transport = OpaTransport(
            opa_url, decision_path=s.policy.decision_path, timeout_seconds=s.policy.timeout_seconds
        )
        self.decider = DecisionCache(
            OpaDecider(self._transport, timeout_seconds=s.policy.timeout_seconds),
            max_entries=s.policy.cache_size,
            # An OPA given by URL: its revision is trusted one poll interval after a poll.
            confirm_within=None if self.sidecar is not None else s.policy.revision_poll_seconds,
            opa_alive=self.sidecar.alive if self.sidecar is not None else None,
        )
        if self.sidecar is not None:
            self.sidecar.listen(self.decider)
        else:
            self._revision_watch = RevisionWatch(
                self._transport, self.decider, poll_seconds=s.policy.revision_poll_seconds
            )
            await self._revision_watch.start()
        self.audit = audit_sink(s)
        await self.audit.start()
        self.webhook = self._webhook()
        self.approvals = ApprovalDesk(
            control,
            self.audit,
            s.approval,
            instance=s.instance,
            poll_seconds=s.control.poll_seconds,
            announce=self.webhook.announce if self.webhook is not None else None,
        )
        self.approvals.start()
        tls = None
        if s.listener.tls_cert is not None and s.listener.tls_key is not None:
            tls = server_context(Path(s.listener.tls_cert), Path(s.listener.tls_key))
        self.context = GatewayContext(
            settings=s,
            targets=self.mirror,
            verifier=self.verifier,
            decider=self.decider,
            audit=self.audit,
            analyzer=StatementAnalyzer(),
            new_prepared=PreparedStatements,
            catalog_for=self._catalog_for,
            free_databases=self._free_databases,
            environ=self.environ,
            server_tls=tls,
            mask_key=load_or_create_key(s.state_dir / "mask.key"),
            approvals=self.approvals,
            session_rules=OpaSessionRules(
                self._transport,
                path=s.policy.session_path,
                timeout_seconds=s.policy.timeout_seconds,
                fresh_seconds=s.policy.revision_poll_seconds,
            ),
        )
        self._targets_seen = {t.name: t for t in self.mirror.all()}
        self._listener = Listener(self.context)
        self.address = await self._listener.start()
        log.info("pgwarden listening on %s:%d", *self.address, extra={"event": "listening"})
        if s.admin.port:
            self.admin = self._admin_listener()
            await self.admin.start()
        return self.address

    def _webhook(self) -> Webhook | None:
        a = self.settings.approval
        if not a.webhook_url:
            return None
        key = self.environ.get(a.webhook_secret_env, "")
        if not key:
            # Unsigned, a receiver could not tell the gateway's events from anyone's.
            raise ValueError(
                f"approval.webhook_url is set but ${a.webhook_secret_env} holds no signing key"
            )
        return Webhook(
            a.webhook_url, key.encode(), fmt=a.webhook_format, attempts=a.webhook_attempts
        )

    async def drain(self, cut_short: asyncio.Event | None = None) -> None:
        """Shut down without cutting a statement short: refuse new connections, let the
        sessions finish what runs (up to shutdown.drain_seconds, or until `cut_short`),
        then stop, which flushes the audit trail."""
        self.draining = True
        if self._listener is not None:
            await self._listener.drain(self.settings.shutdown.drain_seconds, cut_short)
        await self.stop()

    async def reload(self, reread: Settings | None, problem: str | None = None) -> list[str]:
        """Take up what can change without a restart: `reread` settings (None: they could
        not be read again, `problem` says why, the running ones stay), the control store's
        targets and revocations, the policy folders. Logs and returns one line per part:
        what changed, and which changed settings wait for a restart."""
        lines: list[str] = []
        if reread is None:
            lines.append(f"settings: not read again, the running ones stay: {problem}")
        else:
            change = settings_change(self.settings, reread)
            self.settings = change.settings
            if self.context is not None:
                self.context.settings = change.settings
            applied = ", ".join(change.applied)
            lines.append(f"settings: applied {applied}" if applied else "settings: unchanged")
            if change.needs_restart:
                lines.append("settings needing a restart: " + ", ".join(change.needs_restart))
        if self.mirror is not None:
            seen = await self.mirror.refresh()
            if self.mirror.problem is not None:  # keep serving the last targets read
                lines.append(f"targets: control store not read: {self.mirror.problem}")
            else:
                lines.append(f"targets: {targets_change(self._targets_seen, seen) or 'unchanged'}")
                self._targets_seen = seen
            lines.append(f"tokens: registry read again ({self.mirror.revoked_count()} revoked)")
        if self.sidecar is not None:
            lines.append(f"policy: {await self.sidecar.reload_now()}")
        elif self.settings.policy.opa_url:
            lines.append(f"policy: served by the OPA at {self.settings.policy.opa_url}")
        for line in lines:
            log.info("reload: %s", line, extra={"event": "reload"})
        return lines

    def _admin_listener(self) -> AdminListener:
        assert self.context is not None and self._listener is not None
        assert self.decider is not None and self._transport is not None
        assert self.audit is not None and self.verifier is not None
        assert self.mirror is not None
        opa = self.sidecar if self.sidecar is not None else self._revision_watch
        assert opa is not None
        state = GatewayState(
            metrics=self.context.metrics,
            open_sessions=self._listener.open_sessions,
            decisions=self.decider,
            opa=opa,
            audit=self.audit,
        )
        transport = self._transport
        readiness = ReadinessChecks(
            opa_serves_bundle=lambda: transport.healthy(bundles=True),
            audit=self.audit,
            targets=self.mirror,
            draining=lambda: self.draining,
        )
        admin = self.settings.admin
        access = AdminAccess(
            open_access=is_loopback(admin.host),
            verify=self.verifier.verify,
            groups=admin.token_groups,
        )
        context = self.context
        app = admin_app(
            registry=gateway_registry(state),
            readiness=readiness,
            access=access,
            approvals=self.approvals,
            sessions=SessionDirectory(lambda: context.sessions),
        )
        if self.settings.console.enabled:
            mount_console(
                app,
                ConsoleDeps(
                    settings=self.settings,
                    verify=self.verifier.verify,
                    still_valid=self.verifier.still_valid,
                    control=self.control,
                    approvals=self.approvals,
                    audit=self.audit,
                    environ=self.environ,
                ),
            )
        return AdminListener(app, admin)

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        if self._listener is not None:
            await self._listener.stop()
        if self.context is not None and self.context.background:
            await asyncio.wait(list(self.context.background), timeout=2)
        if self.approvals is not None:
            await self.approvals.close()
        if self.webhook is not None:
            await self.webhook.aclose()
        if self.audit is not None:
            await self.audit.close()
        if self.mirror is not None:
            await self.mirror.close()
        if self.control is not None:
            await self.control.close()
        for catalog in self._catalogs.values():
            await catalog.close()
        if self._revision_watch is not None:
            await self._revision_watch.stop()
        if self._transport is not None:
            await self._transport.aclose()
        if self.sidecar is not None:
            await self.sidecar.stop()
        if self.verifier is not None:
            await self.verifier.aclose()


async def serve(settings: Settings, environ: Mapping[str, str], stop: asyncio.Event) -> None:
    """Run a gateway until `stop` is set."""
    gateway = Gateway(settings, environ)
    await gateway.start()
    try:
        await stop.wait()
    finally:
        await gateway.stop()
