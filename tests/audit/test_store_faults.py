"""Fail closed: when a store cannot take a record, request() raises within the timeout."""

from __future__ import annotations

import shutil
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from cli.localpg import LocalCluster, free_port
from gateway.audit import (
    AuditChain,
    AuditKeyring,
    AuditWriter,
    PostgresAuditStore,
    SqliteAuditStore,
)
from gateway.proxy.ports import AuditUnavailable

from .conftest import CHAIN, statement_request

TIMEOUT = 0.5


def _writer(
    store: SqliteAuditStore | PostgresAuditStore, tmp: Path, fail_open: bool = False
) -> AuditWriter:
    keys = AuditKeyring(tmp / "keys")
    epoch, key = keys.current(CHAIN)
    chain = AuditChain(CHAIN, epoch, key)
    return AuditWriter(store, chain, keyring=keys, timeout=TIMEOUT, fail_open=fail_open)


async def _refused_in_time(writer: AuditWriter) -> None:
    start = time.monotonic()
    with pytest.raises(AuditUnavailable):
        await writer.request(statement_request())
    assert time.monotonic() - start < TIMEOUT + 0.4


async def test_sqlite_file_removed_refuses(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    async with _writer(SqliteAuditStore(folder / "audit.sqlite3"), tmp_path) as writer:
        await writer.request(statement_request())
        shutil.rmtree(folder)
        await _refused_in_time(writer)


async def test_sqlite_locked_by_another_writer_refuses_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    async with _writer(SqliteAuditStore(path, busy_timeout=TIMEOUT), tmp_path) as writer:
        await writer.request(statement_request())
        intruder = sqlite3.connect(path, isolation_level=None)
        intruder.execute("BEGIN EXCLUSIVE")
        try:
            await _refused_in_time(writer)
        finally:
            intruder.execute("ROLLBACK")
            intruder.close()
        # The refused record may still land once the lock is gone (the caller was told no,
        # so the trail over-reports, never under-reports); either way the writer recovers.
        rid = await writer.request(statement_request())
        assert rid in (f"{CHAIN}:2", f"{CHAIN}:3")


async def test_sqlite_fail_open_lets_the_statement_through_unaudited(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    async with _writer(SqliteAuditStore(folder / "a.sqlite3"), tmp_path, fail_open=True) as writer:
        shutil.rmtree(folder)
        assert await writer.request(statement_request()) == ""


@pytest.fixture
async def pg_dsn(pg_cluster: LocalCluster) -> AsyncIterator[str]:
    dbname = "audit_fault_" + uuid.uuid4().hex[:10]
    admin = await asyncpg.connect(pg_cluster.dsn())
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    yield pg_cluster.dsn(dbname=dbname)
    await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    await admin.close()


@pytest.mark.server
async def test_postgres_unreachable_refuses(tmp_path: Path) -> None:
    dsn = f"postgresql://postgres:x@127.0.0.1:{free_port()}/postgres"
    async with _writer(PostgresAuditStore(dsn, timeout=TIMEOUT), tmp_path) as writer:
        await _refused_in_time(writer)


@pytest.mark.server
async def test_postgres_database_dropped_refuses(
    tmp_path: Path, pg_cluster: LocalCluster, pg_dsn: str
) -> None:
    async with _writer(PostgresAuditStore(pg_dsn, timeout=TIMEOUT), tmp_path) as writer:
        await writer.request(statement_request())
        dbname = pg_dsn.rsplit("/", 1)[1]
        pg_cluster.psql(f'DROP DATABASE "{dbname}" WITH (FORCE)')
        await _refused_in_time(writer)


@pytest.mark.server
async def test_postgres_terminated_connection_is_replaced(tmp_path: Path, pg_dsn: str) -> None:
    async with _writer(PostgresAuditStore(pg_dsn, timeout=TIMEOUT), tmp_path) as writer:
        await writer.request(statement_request())
        admin = await asyncpg.connect(pg_dsn)
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await admin.close()
        assert killed >= 1
        # A dead idle connection fails before COMMIT is sent, so one retry is safe.
        assert await writer.request(statement_request()) == f"{CHAIN}:2"


@pytest.mark.server
async def test_postgres_locked_table_refuses_then_recovers(tmp_path: Path, pg_dsn: str) -> None:
    async with _writer(PostgresAuditStore(pg_dsn, timeout=TIMEOUT), tmp_path) as writer:
        await writer.request(statement_request())
        intruder = await asyncpg.connect(pg_dsn)
        tr = intruder.transaction()
        await tr.start()
        await intruder.execute("LOCK TABLE audit_record IN ACCESS EXCLUSIVE MODE")
        try:
            await _refused_in_time(writer)
        finally:
            await tr.rollback()
            await intruder.close()
        rid = await writer.request(statement_request())
        assert rid in (f"{CHAIN}:2", f"{CHAIN}:3")
