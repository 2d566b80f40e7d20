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

from gateway.audit import AuditProcess, AuditWriter, WriteAheadAudit, audit_sink
from gateway.identity.verifier import IdentityVerifier
from gateway.policy.cache import DecisionCache
from gateway.policy.opa import OpaDecider
from gateway.policy.sidecar import OpaSidecar
from gateway.policy.transport import OpaTransport
from gateway.policy.watch import RevisionWatch
from gateway.proxy.gate import Catalog as CatalogPort
from gateway.proxy.listener import GatewayContext, Listener
from gateway.proxy.targets import Target, TargetRegistry
from gateway.proxy.tls import server_context, upstream_context
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
        self.verifier: IdentityVerifier | None = None
        self.decider: DecisionCache | None = None
        self._transport: OpaTransport | None = None
        self._revision_watch: RevisionWatch | None = None
        self._listener: Listener | None = None
        # One per (target, database): names, OIDs and caches differ from database to database.
        self._catalogs: dict[tuple[str, str], Catalog] = {}
        self.address: tuple[str, int] | None = None

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
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.verifier = IdentityVerifier.from_settings(s)
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
        tls = None
        if s.listener.tls_cert is not None and s.listener.tls_key is not None:
            tls = server_context(Path(s.listener.tls_cert), Path(s.listener.tls_key))
        self.context = GatewayContext(
            settings=s,
            targets=TargetRegistry(s.state_dir / "targets.json"),
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
        )
        self._listener = Listener(self.context)
        self.address = await self._listener.start()
        log.info("pgwarden listening on %s:%d", *self.address)
        return self.address

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
        if self.context is not None and self.context.background:
            await asyncio.wait(list(self.context.background), timeout=2)
        if self.audit is not None:
            await self.audit.close()
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
