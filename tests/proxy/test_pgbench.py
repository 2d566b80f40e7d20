"""pgbench -M simple, extended and prepared via the gateway: no failures, end state as direct."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cli.localpg import SUPERUSER, SUPERUSER_PASSWORD
from tests.harness import RunningGateway

pytestmark = pytest.mark.server

CLIENTS, TRANSACTIONS = 4, 200

# Every transaction writes deterministically: one row and one counter bump. Two statements
# only: each statement through the gateway waits for a durable audit record (an fsync).
SCRIPT = """\
INSERT INTO pgb_rows (run, client) VALUES (:run, :client_id);
UPDATE pgb_count SET n = n + 1 WHERE run = :run RETURNING n;
"""


@pytest.fixture(scope="module")
def bench_tables(gateway: RunningGateway) -> None:
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS pgb_rows, pgb_count")
        conn.execute("CREATE TABLE pgb_rows (run int, client int)")
        conn.execute("CREATE TABLE pgb_count (run int PRIMARY KEY, n int NOT NULL)")


def _pgbench(env: dict[str, str], dbname: str, mode: str, run: int, script: Path) -> str:
    out = subprocess.run(
        [
            "pgbench",
            "-n",
            "-M",
            mode,
            "-t",
            str(TRANSACTIONS),
            "-c",
            str(CLIENTS),
            "-j",
            "2",
            "-D",
            f"run={run}",
            "-f",
            str(script),
            dbname,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10", **env},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _state(gateway: RunningGateway, run: int) -> tuple[Any, ...]:
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as conn:
        per_client = conn.execute(
            "SELECT client, count(*) FROM pgb_rows WHERE run = %s GROUP BY client ORDER BY client",
            (run,),
        ).fetchall()
        counter = conn.execute("SELECT n FROM pgb_count WHERE run = %s", (run,)).fetchone()
    return tuple(per_client), counter


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_through_gateway_matches_direct(
    gateway: RunningGateway, admin_token: str, bench_tables: None, mode: str, tmp_path: Path
) -> None:
    script = tmp_path / "bench.sql"
    script.write_text(SCRIPT)
    via_run, direct_run = {"simple": (1, 2), "extended": (3, 4), "prepared": (5, 6)}[mode]
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO pgb_count VALUES (%s, 0), (%s, 0)", (via_run, direct_run))

    via_env = {
        "PGHOST": gateway.host,
        "PGPORT": str(gateway.port),
        "PGUSER": "bench",
        "PGPASSWORD": admin_token,
        "PGSSLMODE": "disable",
    }
    out = _pgbench(via_env, "app", mode, via_run, script)
    processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", out)
    assert processed is not None, out
    assert processed.group(1) == processed.group(2) == str(CLIENTS * TRANSACTIONS)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert failed is not None and failed.group(1) == "0", out

    c = gateway.cluster
    direct_env = {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(c.port),
        "PGUSER": SUPERUSER,
        "PGPASSWORD": SUPERUSER_PASSWORD,
        "PGSSLMODE": "disable",
    }
    _pgbench(direct_env, "appdb", mode, direct_run, script)

    via_state, direct_state = _state(gateway, via_run), _state(gateway, direct_run)
    assert via_state == direct_state
    assert via_state == (
        tuple((i, TRANSACTIONS) for i in range(CLIENTS)),
        (CLIENTS * TRANSACTIONS,),
    )
