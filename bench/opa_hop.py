"""Measure one OPA decision hop (p50/p99 per call) with httpx over loopback TCP vs a Unix socket.

Run: uv run python bench/opa_hop.py [--calls N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
from pathlib import Path

from gateway.policy.transport import OpaTransport

ROOT = Path(__file__).resolve().parent.parent
POLICY = """package pgwarden

decision := {"action": "allow", "reasons": ["reads are fine"]} if input.statement.category == "read"
"""
INPUT = {
    "version": 1,
    "principal": {
        "subject": "agent:ci-bot",
        "issuer": "pgwarden",
        "groups": ["ai-agents"],
        "token_id": "t1",
        "claims": {"sub": "agent:ci-bot"},
    },
    "target": {"name": "app", "database": "appdb", "labels": {"env": "prod"}},
    "session": {
        "id": "s1",
        "client_addr": "127.0.0.1",
        "application_name": "psql",
        "user": "x",
        "in_transaction": False,
    },
    "statement": {
        "text": "SELECT 1",
        "fingerprint": "f",
        "protocol": "simple",
        "index": 0,
        "count": 1,
        "command": "SELECT",
        "category": "read",
        "reads": [],
        "writes": [],
        "columns": [],
        "functions": [],
        "has_where": False,
        "flags": [],
        "params": [],
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait(transport: OpaTransport) -> None:
    for _ in range(200):
        if await transport.healthy(bundles=False):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("OPA did not come up")


async def _measure(transport: OpaTransport, calls: int, concurrency: int) -> list[float]:
    for _ in range(200):
        await transport.query(INPUT)
    samples: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            status, _body = await transport.query(INPUT)
            samples.append(time.perf_counter() - t0)
            assert status == 200

    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    return samples


def _report(label: str, samples: list[float]) -> None:
    q = statistics.quantiles(samples, n=100)
    print(f"{label:28s} n={len(samples):6d}  p50={q[49] * 1e6:7.0f} µs  p99={q[98] * 1e6:7.0f} µs")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--opa", type=Path, default=ROOT / ".pgwarden" / "bin" / "opa")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="opa-hop-") as tmp:
        policy = Path(tmp) / "p.rego"
        policy.write_text(POLICY)
        sock = Path(tmp) / "opa.sock"
        port = _free_port()
        proc = await asyncio.create_subprocess_exec(
            str(args.opa),
            "run",
            "--server",
            "--log-level",
            "error",
            "--skip-version-check",
            "--addr",
            f"127.0.0.1:{port}",
            "--addr",
            f"unix://{sock}",
            str(policy),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            for label, url in (
                ("httpx TCP 127.0.0.1", f"http://127.0.0.1:{port}"),
                ("httpx UDS", f"unix://{sock}"),
            ):
                transport = OpaTransport(
                    url, decision_path="pgwarden/decision", timeout_seconds=2.0
                )
                await _wait(transport)
                for c in sorted({1, args.concurrency}):
                    samples = await _measure(transport, args.calls, c)
                    _report(f"{label} c={c}", samples)
                await transport.aclose()
        finally:
            proc.terminate()
            await proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
