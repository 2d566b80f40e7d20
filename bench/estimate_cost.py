"""What cost estimates (issue 11 item 2) add to an ai-agent's statement, in one run.

Run: .venv/bin/python bench/estimate_cost.py [--calls 500]

Two gateways on one throwaway cluster, both with the reference policy: one with the
reference data (ai-agents' reads are explained first), one with `estimate_seq_scan_rows`
removed from the ai-agents' session rule (no estimates). Through each, as an ai-agent, the
median latency and the gateway's own CPU time (its event loop thread) per statement of:

- `planned`: a prepared parameterized SELECT (psycopg `prepare=True`) run with a new value
  each time: Parse once (its generic plan explained once), then Bind/Execute on the
  planned fast path, which does no estimate work at all; the bench line of issue 11 is
  this row's ratio, estimates on against off, measured in this same run;
- `known text`: the same simple-protocol text again and again: its estimate is kept, so no
  EXPLAIN; what the kept estimate costs (a dictionary lookup, a larger policy input);
- `new text`: a new literal each time: every statement is explained first (one more round
  trip to the target), as for a client that puts literals in its text.

Wall-clock medians are noisy on a shared machine; the CPU column is the steadier one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _stack import opa_binary

from cli.localpg import APP_DB, LocalCluster, free_port
from tests.harness import ROOT, RunningGateway, start_gateway, stop_gateway

TABLE = "CREATE TABLE IF NOT EXISTS bench_estimate AS SELECT generate_series(1, 1000) g"


class _Sample:
    """Median wall time and mean gateway CPU time per statement, in µs."""

    def __init__(self, wall_us: float, cpu_us: float) -> None:
        self.wall_us = wall_us
        self.cpu_us = cpu_us


def _run(
    gw: RunningGateway,
    conn: psycopg.Connection[tuple[int]],
    runs: Sequence[tuple[str, tuple[int, ...]]],
) -> _Sample:
    clock = time.pthread_getcpuclockid(gw.thread.ident or 0)
    samples = []
    cpu0 = time.clock_gettime(clock)
    for text, params in runs:
        t0 = time.perf_counter()
        conn.execute(text, params or None, prepare=bool(params)).fetchall()
        samples.append((time.perf_counter() - t0) * 1e6)
    cpu = (time.clock_gettime(clock) - cpu0) * 1e6 / len(runs)
    return _Sample(statistics.median(samples), cpu)


def _measure(gw: RunningGateway, calls: int) -> dict[str, _Sample]:
    token = gw.token("agent:bench-estimate", groups=("ai-agents",))
    with psycopg.connect(gw.dsn(token), autocommit=True) as conn:
        planned = "SELECT g FROM bench_estimate WHERE g = %s"
        known = "SELECT g FROM bench_estimate WHERE g < 10"
        warm: list[tuple[str, tuple[int, ...]]] = [(planned, (i,)) for i in range(50)]
        warm += [(known, ())] * 50
        _run(gw, conn, warm)  # decision cache, catalog, kept estimates, the prepared plan
        fresh = [f"SELECT g FROM bench_estimate WHERE g < {i}" for i in range(11, 11 + calls)]  # noqa: S608 - numbers of its own
        return {
            "planned": _run(gw, conn, [(planned, (i % 1000,)) for i in range(calls)]),
            "known text": _run(gw, conn, [(known, ())] * calls),
            "new text": _run(gw, conn, [(text, ()) for text in fresh]),
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="pgwarden-bench-est-"))
    base.chmod(0o755)
    cluster = LocalCluster(base / "pg", free_port())
    cluster.start()
    try:
        cluster.create_app_database()
        with psycopg.connect(cluster.dsn(dbname=APP_DB), autocommit=True) as conn:
            conn.execute(TABLE)
            conn.execute("ANALYZE bench_estimate")
        off = base / "bundles-off"
        shutil.copytree(ROOT / "bundles", off, ignore=shutil.ignore_patterns("*.tar.gz"))
        data_file = off / "pgwarden" / "data.json"
        data = json.loads(data_file.read_text())
        del data["session_guards"]["ai-agents"]["estimate_seq_scan_rows"]
        data["session_guards"]["ai-agents"]["statements_per_second"] = 1_000_000
        data["session_guards"]["ai-agents"]["statement_burst"] = 1_000_000
        data_file.write_text(json.dumps(data))
        on = base / "bundles-on"
        shutil.copytree(off, on)
        data["session_guards"]["ai-agents"]["estimate_seq_scan_rows"] = 100000
        (on / "pgwarden" / "data.json").write_text(json.dumps(data))
        results: dict[str, dict[str, _Sample]] = {}
        for name, bundles in (("estimates off", off), ("estimates on", on)):
            gw = start_gateway(
                base / name.replace(" ", "-"), cluster, opa_binary(), policy={"bundle_dir": bundles}
            )
            try:
                results[name] = _measure(gw, args.calls)
            finally:
                stop_gateway(gw)
        print(f"{'':14s}  {'':10s}  {'median µs':>10s}  {'CPU µs':>8s}")
        for name, rows in results.items():
            for row, sample in rows.items():
                print(f"{name:14s}  {row:10s}  {sample.wall_us:10.0f}  {sample.cpu_us:8.0f}")
        for row in ("planned", "known text", "new text"):
            with_, without = results["estimates on"][row], results["estimates off"][row]
            print(
                f"{row}: estimates on / off = {with_.wall_us / without.wall_us:.2f} (median),"
                f" {with_.cpu_us / without.cpu_us:.2f} (gateway CPU)"
            )
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
