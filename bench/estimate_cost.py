"""What cost estimates (issue 11 item 2) add to an ai-agent's statement, in one run.

Run: .venv/bin/python bench/estimate_cost.py [--calls 500]

Two gateways on one throwaway cluster, both with the reference policy: one with the
reference data (ai-agents' reads are explained first), one with `estimate_seq_scan_rows`
removed from the ai-agents' session rule (no estimates). Median latency of a simple-protocol
`SELECT` through each, as an ai-agent:

- `known`: the same text again and again: its estimate is kept, so no EXPLAIN; what the
  kept estimate costs on the planned path (a dictionary lookup, a larger policy input);
- `new text`: a new literal each time: every statement is explained first (one more round
  trip to the target), as for a client that puts literals in its text.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _stack import opa_binary

from cli.localpg import APP_DB, LocalCluster, free_port
from tests.harness import ROOT, RunningGateway, start_gateway, stop_gateway

TABLE = "CREATE TABLE IF NOT EXISTS bench_estimate AS SELECT generate_series(1, 1000) g"


def _median_us(conn: psycopg.Connection[tuple[int]], texts: list[str]) -> float:
    samples = []
    for text in texts:
        t0 = time.perf_counter()
        conn.execute(text).fetchall()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def _measure(gw: RunningGateway, calls: int) -> tuple[float, float]:
    token = gw.token("agent:bench-estimate", groups=("ai-agents",))
    with psycopg.connect(gw.dsn(token), autocommit=True) as conn:
        known = "SELECT g FROM bench_estimate WHERE g < 10"
        _median_us(conn, [known] * 50)  # warm: decision cache, catalog, kept estimate
        known_us = _median_us(conn, [known] * calls)
        fresh = [f"SELECT g FROM bench_estimate WHERE g < {i}" for i in range(11, 11 + calls)]  # noqa: S608 - numbers of its own
        fresh_us = _median_us(conn, fresh)
    return known_us, fresh_us


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
        results = {}
        for name, bundles in (("estimates off", off), ("estimates on", on)):
            gw = start_gateway(
                base / name.replace(" ", "-"), cluster, opa_binary(), policy={"bundle_dir": bundles}
            )
            try:
                results[name] = _measure(gw, args.calls)
            finally:
                stop_gateway(gw)
        for name, (known_us, fresh_us) in results.items():
            print(f"{name:14s}  known text: {known_us:7.0f} µs   new text: {fresh_us:7.0f} µs")
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
