"""What the catalog-generation check costs each statement, with and without the DDL watch.

Run: uv run python bench/catalog_generation.py [--calls 2000] [--sessions 50]

Before a statement is resolved the gateway asks the target which catalog generation is
current (Catalog.refresh): one round trip on the catalog connection, shared by the
statements that arrive while it is under way. Measured on a throwaway cluster:

- `SELECT 1` on an asyncpg connection: the round trip every probe costs at least;
- refresh() one at a time, without the watch (the snapshot) and with it (the counter);
- refresh() from `--sessions` concurrent callers: probes sent per statement;
- how often the generation moves under a steady writer: without the watch every commit
  moves it (the cache is refetched), with it only DDL does.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import asyncpg
from _stack import pg_cluster

from cli.localpg import APP_DB, APP_SCHEMA_SQL, LocalCluster
from gateway.policy.decision import Mask
from gateway.sql.catalog import _SNAPSHOT_PROBE, _WATCH_PROBE, WATCH_SQL, Catalog
from gateway.sql.facts import ColumnRef, StatementFacts, TableRef

EMAIL = [Mask("public", "customers", "email", "email")]
FACTS = StatementFacts(
    text="SELECT id, email FROM customers",
    fingerprint="bench",
    command="SELECT",
    category="read",
    reads=(TableRef("", "customers"),),
    columns=(
        ColumnRef("", "customers", "id", "output"),
        ColumnRef("", "customers", "email", "output"),
    ),
)


class CountingCatalog(Catalog):
    probes = 0

    async def _probe(self, conn: object) -> str | None:
        self.probes += 1
        return await super()._probe(conn)


async def _us_per_call(n: int, call: Callable[[], Awaitable[object]]) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


async def _cpu_us_per_call(n: int, call: Callable[[], Awaitable[object]]) -> float:
    """This process's CPU time per call: what the gateway spends, whatever the server and
    other processes on a shared machine do (wall-clock medians are not that)."""
    t0 = time.process_time()
    for _ in range(n):
        await call()
    return (time.process_time() - t0) / n * 1e6


def _probe_query(cat: Catalog) -> str:
    """The query refresh() sends in the catalog's current mode (its first column)."""
    return _WATCH_PROBE if cat.watched else _SNAPSHOT_PROBE


async def _statement(cat: Catalog) -> None:
    """What the gate does for a masked read: probe, resolve, mask targets."""
    await cat.refresh()
    await cat.resolve(FACTS)
    await cat.mask_targets(EMAIL)


async def _mode(dsn: str, label: str, calls: int, sessions: int) -> None:
    conn = await asyncpg.connect(dsn)
    baseline = await _us_per_call(calls, lambda: conn.fetchval("SELECT 1"))
    cat = CountingCatalog(dsn)
    await cat.refresh()
    probe = await _us_per_call(calls, cat.refresh)
    baseline_cpu = await _cpu_us_per_call(calls, lambda: conn.fetchval("SELECT 1"))
    bare_cpu = await _cpu_us_per_call(calls, lambda: conn.fetchval(_probe_query(cat)))
    probe_cpu = await _cpu_us_per_call(calls, cat.refresh)
    statement = await _us_per_call(calls, lambda: _statement(cat))
    cat.probes = 0
    t0 = time.perf_counter()

    async def session() -> None:
        for _ in range(calls // 10):
            await cat.refresh()

    await asyncio.gather(*(session() for _ in range(sessions)))
    elapsed = time.perf_counter() - t0
    total = sessions * (calls // 10)
    shared = cat.probes / total

    # A writer commits all the time; statements probe in between.
    stop = asyncio.Event()

    async def writer() -> None:
        w = await asyncpg.connect(dsn)
        i = 10**6
        while not stop.is_set():
            i += 1
            await w.execute("INSERT INTO orders VALUES ($1, 1, 1) ON CONFLICT DO NOTHING", i)
        await w.close()

    task = asyncio.ensure_future(writer())
    moved = 0
    last = await cat.refresh()
    busy = await _us_per_call(calls // 4, lambda: _statement(cat))
    for _ in range(calls // 4):
        now = await cat.refresh()
        moved += now != last
        last = now
    stop.set()
    await task
    await cat.close()
    await conn.close()
    print(
        f"{label:>9}: SELECT 1 {baseline:6.0f} µs | refresh {probe:6.0f} µs"
        f" | probe+resolve+masks {statement:6.0f} µs (under writes {busy:6.0f} µs)"
        f" | {sessions} sessions: {total / elapsed:7.0f} refresh/s, {shared:.3f} probes each"
        f" | generation moved on {moved}/{calls // 4} statements under writes"
    )
    print(
        f"{label:>9}: CPU per call: SELECT 1 {baseline_cpu:6.1f} µs"
        f" | bare probe query {bare_cpu:6.1f} µs | refresh {probe_cpu:6.1f} µs"
    )


async def _run(cluster: LocalCluster, calls: int, sessions: int) -> None:
    cluster.psql(APP_SCHEMA_SQL, dbname=APP_DB)
    dsn = cluster.dsn(dbname=APP_DB)
    await _mode(dsn, "snapshot", calls, sessions)
    cluster.psql(WATCH_SQL.read_text(), dbname=APP_DB)
    await _mode(dsn, "watch", calls, sessions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=50)
    args = parser.parse_args()
    with pg_cluster() as cluster:
        asyncio.run(_run(cluster, args.calls, args.sessions))


if __name__ == "__main__":
    main()
