"""Audit fixtures: one rig per test over a fresh SQLite file or a fresh PostgreSQL database."""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cli.localpg import LocalCluster
from gateway.audit import (
    AuditChain,
    AuditKeyring,
    AuditStore,
    AuditWriter,
    HeadWitness,
    PostgresAuditStore,
    SqliteAuditStore,
    StatementOutcome,
    StatementRequest,
    verify,
)
from gateway.audit.events import SessionEvent, SessionEventKind
from gateway.audit.verify import VerifyReport
from gateway.identity.principal import Principal
from gateway.policy.decision import Decision, Mask

CHAIN = "gw-test"
PRINCIPAL = Principal("agent:ci-bot", "pgwarden", ("ai-agents",), "jti-1", None)


def statement_request(text: str = "SELECT 1", **changes: Any) -> StatementRequest:
    fields: dict[str, Any] = {
        "time": time.time(),
        "instance": CHAIN,
        "session_id": "sess-1",
        "client_addr": "10.1.2.3",
        "application_name": "psql",
        "principal": PRINCIPAL,
        "target": "app",
        "text": text,
        "fingerprint": "fp-" + text,
        "protocol": "simple",
        "params": ("42", None),
        "decision": Decision(
            "allow",
            reasons=("ai-agents may read",),
            masks=(Mask("public", "customers", "email", "email"),),
            decision_id="dec-1",
            bundle_revision="rev-7",
            cache_hit=True,
        ),
        "approval_id": "appr-1",
        "masked_columns": ("public.customers.email",),
        "record_rows": True,
    }
    fields.update(changes)
    return StatementRequest(**fields)


def statement_outcome(request_id: str, **changes: Any) -> StatementOutcome:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "time": time.time(),
        "command_tag": "SELECT 2",
        "rows": 2,
        "sqlstate": None,
        "error_message": None,
        "duration_ms": 1.5,
        "bytes_out": 120,
        "recorded_rows": (("1", "j***@example.com"), ("2", None)),
    }
    fields.update(changes)
    return StatementOutcome(**fields)


def session_event(kind: SessionEventKind, reason: str = "") -> SessionEvent:
    return SessionEvent(
        kind, time.time(), CHAIN, "sess-1", "10.1.2.3", "psql", "bob", "app",
        None if kind == "auth_failure" else PRINCIPAL, reason,
    )  # fmt: skip


@dataclass
class AuditRig:
    """A store backing, its keys and head witness, and raw access for tampering."""

    kind: str
    tmp: Path
    make_store: Callable[[], AuditStore]
    raw_sql: Callable[[str, tuple[Any, ...]], Any]
    stores: list[AuditStore]

    @property
    def keyring(self) -> AuditKeyring:
        return AuditKeyring(self.tmp / "keys")

    @property
    def heads(self) -> HeadWitness:
        return HeadWitness(self.tmp / "head")

    def writer(self, store: AuditStore | None = None, **options: Any) -> AuditWriter:
        epoch, key = self.keyring.current(CHAIN)
        options.setdefault("timeout", 2.0)
        return AuditWriter(
            store or self.store(),
            AuditChain(CHAIN, epoch, key),
            keyring=self.keyring,
            head=self.heads,
            **options,
        )

    def store(self) -> AuditStore:
        s = self.make_store()
        self.stores.append(s)
        return s

    async def sql(self, sql: str, *args: Any) -> Any:
        """Run SQL (written with ? placeholders) on the backing, as an intruder would."""
        return await self.raw_sql(sql, args)

    async def verify(self) -> VerifyReport:
        store = self.store()
        return await verify(store, self.keyring, self.heads)


def _pg_placeholders(sql: str) -> str:
    parts = sql.split("?")
    return parts[0] + "".join(f"${i}{p}" for i, p in enumerate(parts[1:], 1))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.server)])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AuditRig]:
    stores: list[AuditStore] = []
    if request.param == "sqlite":
        path = tmp_path / "audit.sqlite3"

        async def raw_sqlite(sql: str, args: tuple[Any, ...]) -> Any:
            db = sqlite3.connect(path, isolation_level=None)
            try:
                return db.execute(sql, args).fetchall()
            finally:
                db.close()

        yield AuditRig("sqlite", tmp_path, lambda: SqliteAuditStore(path), raw_sqlite, stores)
    else:
        cluster: LocalCluster = request.getfixturevalue("pg_cluster")
        dbname = "audit_" + uuid.uuid4().hex[:12]
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute(f'CREATE DATABASE "{dbname}"')
        dsn = cluster.dsn(dbname=dbname)

        async def raw_pg(sql: str, args: tuple[Any, ...]) -> Any:
            conn = await asyncpg.connect(dsn)
            try:
                return await conn.fetch(_pg_placeholders(sql), *args)
            finally:
                await conn.close()

        yield AuditRig("postgres", tmp_path, lambda: PostgresAuditStore(dsn), raw_pg, stores)
        for s in stores:
            await s.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()
        return
    for s in stores:
        await s.close()
