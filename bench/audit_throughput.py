"""Durable audit request records per second, SQLite and PostgreSQL, with concurrent writers.

    uv run python bench/audit_throughput.py [--dsn postgresql://...] [--writers 50] [--seconds 5]

Without --dsn a throwaway local PostgreSQL cluster (cli/localpg.py) is started for the run.
Each writer awaits one request() at a time, as a gateway session does: a record counts only
once it is committed (SQLite: WAL, synchronous=FULL; PostgreSQL: COMMIT returned). Each store
is measured twice: the AuditWriter in this process, and through the audit process
(AuditProcess -> python -m gateway.audit), the gateway's path with audit.durability=store.
Then the gateway's default path: the audit log (WriteAheadAudit), durability disk and os.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from cli.localpg import LocalCluster, free_port
from gateway.audit import (
    AuditChain,
    AuditKeyring,
    AuditProcess,
    AuditStore,
    AuditWriter,
    HeadWitness,
    PostgresAuditStore,
    SqliteAuditStore,
    audit_keyring,
    audit_log,
    head_witness,
    verify,
    write_ahead_audit,
)
from gateway.audit.events import StatementRequest
from gateway.audit.verify import verify_log
from gateway.identity.principal import Principal
from gateway.policy.decision import Decision
from gateway.settings import Settings, load_settings

PRINCIPAL = Principal("agent:bench", "pgwarden", ("ai-agents",), "jti-bench", None)


STATEMENT = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"


def _request(n: int) -> StatementRequest:
    return StatementRequest(
        time.time(), "bench", f"s-{n % 50}", "127.0.0.1", "pgbench", PRINCIPAL, "app",
        STATEMENT, "fp-1", "extended",
        (str(n),), Decision("allow", decision_id=f"d-{n}", bundle_revision="r1"),
    )  # fmt: skip


async def _warm_up(request: Callable[[StatementRequest], Awaitable[str]]) -> None:
    for i in range(200):  # schema, connections, caches
        await request(_request(i))


async def _load(
    request: Callable[[StatementRequest], Awaitable[str]], writers: int, seconds: float
) -> tuple[int, float]:
    """`writers` sessions each awaiting one request() at a time for `seconds`: records
    committed, and the time taken."""
    done = 0
    stop = time.perf_counter() + seconds

    async def session(k: int) -> None:
        nonlocal done
        n = k
        while time.perf_counter() < stop:
            await request(_request(n))
            n += writers
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(session(k) for k in range(writers)))
    return done, time.perf_counter() - start


async def run(name: str, store: AuditStore, folder: Path, writers: int, seconds: float) -> None:
    keys = AuditKeyring(folder / "keys")
    epoch, key = keys.current("bench")
    heads = HeadWitness(folder / "head")
    writer = AuditWriter(store, AuditChain("bench", epoch, key), keyring=keys, head=heads)
    await writer.start()
    await _warm_up(writer.request)
    commits_before = store.commits
    done, elapsed = await _load(writer.request, writers, seconds)
    commits = store.commits - commits_before
    await writer.close()
    rate = done / elapsed
    print(
        f"{name:10s} {done:8d} records in {elapsed:5.2f}s = {rate:9,.0f} records/s durable"
        f"  ({commits} commits, {done / max(commits, 1):.1f} records/commit, {writers} writers)"
    )
    check_store = store.__class__(**_reopen_args(store))
    t = time.perf_counter()
    report = await verify(check_store, keys, heads)
    print(f"{'':10s} verify: {'ok' if report.ok else report.problems} "
          f"({report.chains[0].records:,} records in {time.perf_counter() - t:.2f}s)")  # fmt: skip
    await check_store.close()


async def run_process(name: str, settings: Settings, writers: int, seconds: float) -> None:
    """The same load through the gateway's own path: AuditProcess feeding the child."""
    sink = AuditProcess(settings)
    await sink.start()
    try:
        await _warm_up(sink.request)
        done, elapsed = await _load(sink.request, writers, seconds)
    finally:
        await sink.close()
    print(
        f"{name:10s} {done:8d} records in {elapsed:5.2f}s = {done / elapsed:9,.0f} records/s"
        f" durable  (through the audit process, {writers} writers)"
    )


async def run_log(name: str, settings: Settings, writers: int, seconds: float) -> None:
    """The same load through the audit log (the gateway's default path): records durable in
    the log (`disk`: fdatasynced, `os`: written), the SQLite index fed beside it. CPU is this
    process's (sealing, writing, the sync thread, the indexer), per record."""
    sink = write_ahead_audit(settings)
    await sink.start()
    try:
        await _warm_up(sink.request)
        cpu = time.process_time()
        done, elapsed = await _load(sink.request, writers, seconds)
        cpu = time.process_time() - cpu
        lag = sink.index_lag
    finally:
        await sink.close()
    print(
        f"{name:10s} {done:8d} records in {elapsed:5.2f}s = {done / elapsed:9,.0f} records/s"
        f" durable  (audit log, durability {settings.audit.durability}, {writers} writers;"
        f" {cpu / max(done, 1) * 1e6:.1f} µs CPU/record in this process, index lag {lag})"
    )
    report = await verify_log(
        audit_log(settings), settings.instance, audit_keyring(settings), head_witness(settings)
    )
    print(f"{'':10s} verify log: {'ok' if report.problem is None else report.problem}")


def _reopen_args(store: AuditStore) -> dict[str, object]:
    if isinstance(store, SqliteAuditStore):
        return {"path": store.path}
    assert isinstance(store, PostgresAuditStore)
    return {"dsn": store.dsn}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dsn", help="PostgreSQL superuser DSN (default: start a local cluster)")
    parser.add_argument("--writers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="pgwarden-audit-bench-"))
    cluster: LocalCluster | None = None
    try:
        await run("sqlite", SqliteAuditStore(folder / "sqlite" / "audit.sqlite3"),
                  folder / "sqlite", args.writers, args.seconds)  # fmt: skip
        await run_process("sqlite", load_settings(state_dir=folder / "sqlite-process"),
                          args.writers, args.seconds)  # fmt: skip
        for durability in ("disk", "os"):
            settings = load_settings(
                state_dir=folder / f"log-{durability}", audit={"durability": durability}
            )
            await run_log(f"log-{durability}", settings, args.writers, args.seconds)
        dsn = args.dsn
        if dsn is None:
            # Its own folder, world-traversable: the server runs as the postgres OS user.
            base = Path(tempfile.mkdtemp(prefix="pgwarden-audit-bench-pg-"))
            os.chmod(base, 0o755)  # noqa: S103 - the postgres OS user must enter it
            cluster = LocalCluster(base, free_port())
            cluster.start()
            dsn = cluster.dsn()
            print("(local cluster: fsync=off, synchronous_commit=off; pass --dsn for real disks)")
        dbname = "audit_bench_" + uuid.uuid4().hex[:8]
        admin = await asyncpg.connect(dsn)
        await admin.execute(f'CREATE DATABASE "{dbname}"')
        try:
            bench_dsn = dsn.rsplit("/", 1)[0] + "/" + dbname
            await run("postgresql", PostgresAuditStore(bench_dsn), folder / "pg-keys",
                      args.writers, args.seconds)  # fmt: skip
            settings = load_settings(
                state_dir=folder / "pg-process",
                audit={"store": "postgres", "postgres_dsn": bench_dsn},
            )
            await run_process("postgresql", settings, args.writers, args.seconds)
        finally:
            await admin.execute(f'DROP DATABASE "{dbname}" WITH (FORCE)')
            await admin.close()
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.base_dir, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
