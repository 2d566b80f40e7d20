"""Per-statement latency that pgwarden's policy path adds, cold vs warm decision cache.

Run: uv run python bench/policy_latency.py [--queries 2000] [--null-audit] [--warm-first]

One asyncpg client (simple query protocol: `execute()` without arguments) runs `SELECT <k>`
directly against PostgreSQL and through the gateway, alternating one direct and one gateway
query so both see the same machine state. Cold: every gateway statement text is new, so the
analysis (pglast), the catalog step and the OPA hop all happen. Warm: the same text repeats, so
the decision comes from the cache. The added latency of query i is through_i - direct_i; the
table gives its p50/p99 and the p50/p99 of each side. Audit is on (SQLite) unless
--null-audit swaps in the bench-only no-op sink, which isolates the policy path.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import asyncpg
from _stack import GATEWAY_USER, HOST, GatewayProcess, gateway_process, pg_cluster

from cli.localpg import APP_DB, SUPERUSER, SUPERUSER_PASSWORD, LocalCluster


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def _timed(conn: asyncpg.Connection, sql: str) -> float:
    t0 = time.perf_counter()
    await conn.execute(sql)
    return (time.perf_counter() - t0) * 1e6


async def _series(
    direct: asyncpg.Connection,
    through: asyncpg.Connection,
    n: int,
    text_of: Callable[[int], str],
) -> tuple[list[float], list[float]]:
    d: list[float] = []
    t: list[float] = []
    for i in range(n):
        sql = text_of(i)
        if i % 2 == 0:
            d.append(await _timed(direct, sql))
            t.append(await _timed(through, sql))
        else:
            t.append(await _timed(through, sql))
            d.append(await _timed(direct, sql))
    return d, t


async def _run(
    cluster: LocalCluster, gw: GatewayProcess, n: int, warmup: int, warm_first: bool
) -> None:
    direct = await asyncpg.connect(
        host=HOST,
        port=cluster.port,
        user=SUPERUSER,
        password=SUPERUSER_PASSWORD,
        database=APP_DB,
        ssl=False,
    )
    through = await asyncpg.connect(
        host=HOST, port=gw.port, user=GATEWAY_USER, password=gw.token, database="app", ssl=False
    )
    try:
        # Warm both paths (and OPA's JIT-free but cold code paths) with throwaway texts.
        base = 10_000_000
        await _series(direct, through, warmup, lambda i: f"SELECT {base + i}")
        await _series(direct, through, warmup, lambda i: "SELECT 1")

        # Cold: a text never seen before, every time. Warm: one text, decided once above and
        # then served from the cache. --warm-first swaps the order (audit drift shows up).
        async def cold_case() -> tuple[list[float], list[float]]:
            return await _series(direct, through, n, lambda i: f"SELECT {2 * base + i}")

        async def warm_case() -> tuple[list[float], list[float]]:
            return await _series(direct, through, n, lambda i: "SELECT 1")

        if warm_first:
            warm = await warm_case()
            cold = await cold_case()
        else:
            cold = await cold_case()
            warm = await warm_case()
    finally:
        await direct.close()
        await through.close()
    print(f"{n} queries per case, 1 client, simple protocol, SELECT <k>; µs")
    print(
        f"{'cache':<6} {'added p50':>10} {'added p99':>10} {'added mean':>11} "
        f"{'direct p50':>11} {'direct p99':>11} {'gw p50':>9} {'gw p99':>9}"
    )
    summary = []
    for name, (d, t) in (("cold", cold), ("warm", warm)):
        added = [b - a for a, b in zip(d, t, strict=True)]
        p50, p99 = _pct(added, 0.50), _pct(added, 0.99)
        summary.append(f"{name}_p50_us={p50:.0f} {name}_p99_us={p99:.0f}")
        print(
            f"{name:<6} {p50:>10.0f} {p99:>10.0f} {statistics.fmean(added):>11.0f} "
            f"{_pct(d, 0.5):>11.0f} {_pct(d, 0.99):>11.0f} {_pct(t, 0.5):>9.0f} "
            f"{_pct(t, 0.99):>9.0f}"
        )
    print(" ".join(summary))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--queries", type=int, default=2000, help="queries per case (cold, warm)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--warm-first", action="store_true", help="run the warm case first")
    p.add_argument("--null-audit", action="store_true", help="bench-only no-op audit sink")
    args = p.parse_args()
    with pg_cluster() as cluster, gateway_process(cluster, null_audit=args.null_audit) as gw:
        asyncio.run(_run(cluster, gw, args.queries, args.warmup, args.warm_first))
        print(f"audit: {'no-op sink (bench-only)' if args.null_audit else 'SQLite store'}")
    stats = gw.final_stats
    if stats:
        print(f"decision cache: hits={stats['cache_hits']} misses={stats['cache_misses']}")


if __name__ == "__main__":
    main()
