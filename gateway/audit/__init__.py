"""Audit trail: events, the keyed hash chain, stores, the group-committing sink and verify."""

from __future__ import annotations

from pathlib import Path

from gateway.audit.chain import Anchor, AuditChain
from gateway.audit.events import SessionEvent, StatementOutcome, StatementRequest
from gateway.audit.index import LogIndexer, index_from_log
from gateway.audit.index_process import IndexProcess
from gateway.audit.keys import AuditKeyring, HeadWitness
from gateway.audit.log import AuditLog, log_directory
from gateway.audit.postgres_store import PostgresAuditStore
from gateway.audit.process import AuditProcess, AuditStartRefused
from gateway.audit.reader import AuditReader
from gateway.audit.sqlite_store import SqliteAuditStore
from gateway.audit.store import AuditStore, AuditStoreError, RecordFilter, StoredRecord
from gateway.audit.verify import ChainProblem, ChainReport, VerifyReport, verify
from gateway.audit.wal import AuditLogBusy, WriteAheadAudit
from gateway.audit.writer import AuditWriter, ChainGap
from gateway.settings import Settings

__all__ = [
    "Anchor",
    "AuditChain",
    "AuditKeyring",
    "AuditLog",
    "AuditLogBusy",
    "AuditProcess",
    "AuditReader",
    "AuditStartRefused",
    "AuditStore",
    "AuditStoreError",
    "AuditWriter",
    "ChainGap",
    "ChainProblem",
    "ChainReport",
    "HeadWitness",
    "LogIndexer",
    "PostgresAuditStore",
    "RecordFilter",
    "SessionEvent",
    "SqliteAuditStore",
    "StatementOutcome",
    "StatementRequest",
    "StoredRecord",
    "VerifyReport",
    "WriteAheadAudit",
    "audit_keyring",
    "audit_log",
    "audit_reader",
    "audit_sink",
    "audit_store",
    "audit_writer",
    "head_witness",
    "index_from_log",
    "log_directory",
    "verify",
    "write_ahead_audit",
]


def audit_store(
    settings: Settings, *, inline: bool = False, synchronous: str | None = None
) -> AuditStore:
    """The store the settings name (not yet opened); `inline` as for SqliteAuditStore,
    `synchronous` (SQLite) in place of the setting."""
    audit = settings.audit
    if audit.store == "postgres":
        if not audit.postgres_dsn:
            raise ValueError("audit.store is postgres but audit.postgres_dsn is empty")
        return PostgresAuditStore(audit.postgres_dsn, timeout=audit.timeout_seconds)
    return SqliteAuditStore(
        settings.state_path(audit.sqlite_path),
        busy_timeout=audit.timeout_seconds,
        synchronous=synchronous or audit.sqlite_synchronous,
        inline=inline,
    )


def audit_keyring(settings: Settings, directory: Path | None = None) -> AuditKeyring:
    return AuditKeyring(directory or settings.state_path(Path("audit-keys")))


def head_witness(settings: Settings) -> HeadWitness:
    return HeadWitness(settings.state_path(Path("audit-head")))


def audit_log(settings: Settings) -> AuditLog:
    """This instance's audit log (not yet opened)."""
    return AuditLog(
        log_directory(settings.state_dir, settings.instance),
        segment_bytes=settings.audit.log_segment_mb * 1024 * 1024,
    )


def audit_reader(settings: Settings) -> AuditReader:
    """The trail as people read it on a running gateway: its own connections to the store,
    beside the writer's."""
    return AuditReader(
        lambda: audit_store(settings),
        audit_keyring(settings),
        head_witness(settings),
        audit_log(settings),
        settings.instance,
    )


def write_ahead_audit(settings: Settings, store: AuditStore | None = None) -> WriteAheadAudit:
    """The audit log as the point of durability, the store as its index: fed by a process of
    its own, or (audit.in_process, or a store given: the CLI) by this one."""
    keyring = audit_keyring(settings)
    epoch, key = keyring.current(settings.instance)
    audit = settings.audit
    own_process = store is None and not audit.in_process
    return WriteAheadAudit(
        audit_log(settings),
        AuditChain(settings.instance, epoch, key),
        # The log is durable: the index need not fsync each commit (a lost tail of it is
        # indexed again from the log at the next start).
        store or audit_store(settings, synchronous="normal"),
        durability=audit.durability,
        fdatasync_in=audit.fdatasync_in,
        index=IndexProcess(settings) if own_process else None,
        keyring=keyring,
        head=head_witness(settings),
        timeout=audit.timeout_seconds,
        rows_limit=audit.record_rows_limit,
        bytes_limit=audit.record_bytes_limit,
        fail_open=audit.fail_open,
        accept_gap=audit.accept_chain_gap,
    )


def audit_sink(settings: Settings) -> WriteAheadAudit | AuditWriter | AuditProcess:
    """What the gateway writes its records to: the audit log (audit.durability disk or os),
    else the audit process, or (audit.in_process) a writer on the gateway's own event loop.
    `await start()` before use."""
    if settings.audit.durability != "store":
        return write_ahead_audit(settings)
    if settings.audit.in_process:
        return audit_writer(settings)
    return AuditProcess(settings)


def audit_writer(settings: Settings, store: AuditStore | None = None) -> AuditWriter:
    """The gateway's AuditSink for this instance's chain; `await start()` before use."""
    keyring = audit_keyring(settings)
    epoch, key = keyring.current(settings.instance)
    return AuditWriter(
        store or audit_store(settings),
        AuditChain(settings.instance, epoch, key),
        keyring=keyring,
        head=head_witness(settings),
        timeout=settings.audit.timeout_seconds,
        rows_limit=settings.audit.record_rows_limit,
        bytes_limit=settings.audit.record_bytes_limit,
        fail_open=settings.audit.fail_open,
        accept_gap=settings.audit.accept_chain_gap,
    )
