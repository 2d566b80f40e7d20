"""`pgwarden serve` as operators run it: PGWARDEN_LOG__FORMAT=json makes every stderr line
(the gateway's and its audit writer process's) one JSON object, and PGWARDEN_ADMIN__PORT
serves /healthz, /readyz and /metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli.localpg import APP_DB, SUPERUSER, SUPERUSER_PASSWORD, LocalCluster, free_port
from gateway.control.targets import Target
from gateway.identity.local import LocalTokenIssuer
from gateway.settings import load_settings
from tests.harness import StoredTargets

ROOT = Path(__file__).resolve().parents[2]
PGWARDEN = Path(sys.executable).with_name("pgwarden")

pytestmark = [pytest.mark.server, pytest.mark.slow]


T = TypeVar("T")


def _until(check: Callable[[], T | None], what: str, timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (httpx.HTTPError, OSError):
            result = None
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_serve_logs_json_lines_and_serves_the_admin_listener(
    tmp_path: Path, pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> None:
    state = tmp_path / "state"
    StoredTargets(load_settings(state_dir=state)).add(
        Target(
            name="app",
            host="127.0.0.1",
            port=pg_cluster.port,
            dbname=APP_DB,
            user=SUPERUSER,
            password_env="PGWARDEN_OPS_UPSTREAM_PW",
            sslmode="disable",
        )
    )
    port, admin_port = free_port(), free_port()
    env = {
        **os.environ,
        "PGWARDEN_STATE_DIR": str(state),
        "PGWARDEN_LISTENER__PORT": str(port),
        "PGWARDEN_ADMIN__PORT": str(admin_port),
        "PGWARDEN_LOG__FORMAT": "json",
        "PGWARDEN_POLICY__OPA_BINARY": str(opa_binary),
        "PGWARDEN_POLICY__REGO_DIR": str(ROOT / "rego"),
        "PGWARDEN_POLICY__BUNDLE_DIR": str(ROOT / "bundles"),
        "PGWARDEN_OPS_UPSTREAM_PW": SUPERUSER_PASSWORD,
    }
    issuer = LocalTokenIssuer.from_settings(load_settings(state_dir=state))
    try:
        token = issuer.issue("agent:ops", ["engineers"], 600).token
    finally:
        issuer.close()
    stderr = tmp_path / "serve.err"
    with stderr.open("wb") as err:
        proc = subprocess.Popen([str(PGWARDEN), "serve"], env=env, stderr=err)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        _until(lambda: httpx.get(f"{admin}/readyz").status_code == 200, "readyz 200")
        assert httpx.get(f"{admin}/healthz").json() == {"status": "ok"}
        dsn = f"host=127.0.0.1 port={port} dbname=app user=x password={token} sslmode=disable"
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT pg_read_file('/etc/hostname')")
        metrics = httpx.get(f"{admin}/metrics").text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics)
            for s in family.samples
        }
        assert samples[("pgwarden_statements_total", (("action", "deny"), ("target", "app")))] == 1
        assert (
            samples[("pgwarden_sessions_total", (("group", "engineers"), ("target", "app")))] == 1
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0

    lines = [line for line in stderr.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is JSON, or this raises
    for entry in entries:
        assert {"ts", "level", "event", "msg"} <= entry.keys(), entry
    events = [e["event"] for e in entries]
    for wanted in (
        "opa_up",
        "listening",
        "admin_listening",
        "session_start",
        "statement_refused",
        "session_end",
        "audit_writer_stopped",  # the audit log closed after the drain
    ):
        assert wanted in events, (wanted, events)
    # uvicorn's own start and stop lines repeat admin_listening (and say "Press CTRL+C").
    assert not [e for e in entries if e["logger"].startswith(("uvicorn", "httpx"))], entries
    refused = next(e for e in entries if e["event"] == "statement_refused")
    assert refused["decision_id"] and refused["subject"] == "agent:ops"
    assert token not in stderr.read_text()
