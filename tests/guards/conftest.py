"""A gateway whose policy data guards engineers' sessions (enforced settings) and
ai-agents' (rate limits), so that tests can watch the server's own answers to writes and
long statements."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.localpg import LocalCluster
from tests.harness import ROOT, RunningGateway, start_gateway, stop_gateway

# Small on purpose: a statement_timeout of 2 s is seen to cancel a pg_sleep(30).
ENGINEER_GUARDS = {
    "default_transaction_read_only": True,
    "statement_timeout_ms": 2000,
    "idle_in_transaction_session_timeout_ms": 60000,
}
# Per-statement budgets of engineers' decisions (data.pgwarden.statement_limits), and a
# statement timeout for admins' (who have no session guards: the decision's timeout alone).
ENGINEER_LIMITS = {"max_rows": 5, "max_rows_total": 40}
ADMIN_LIMITS = {"statement_timeout_ms": 1000}
AGENT_GUARDS = {
    "statements_per_second": 2,
    "statement_burst": 5,
    "max_sessions_per_principal": 2,
    "max_sessions_per_token": 1,
}


@contextlib.contextmanager
def gateway_with_data(
    cluster: LocalCluster, opa: Path, prefix: str, change: Callable[[dict[str, Any]], None]
) -> Iterator[RunningGateway]:
    """A gateway with the reference policy whose bundle data `change` edited."""
    state = Path(tempfile.mkdtemp(prefix=prefix))
    bundles = state / "bundles"
    shutil.copytree(ROOT / "bundles", bundles, ignore=shutil.ignore_patterns("*.tar.gz"))
    data_file = bundles / "pgwarden" / "data.json"
    data = json.loads(data_file.read_text())
    change(data)
    data_file.write_text(json.dumps(data))
    gw = start_gateway(state, cluster, opa, policy={"bundle_dir": bundles})
    try:
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)


def _guards(data: dict[str, Any]) -> None:
    data["session_guards"] = {"engineers": ENGINEER_GUARDS, "ai-agents": AGENT_GUARDS}
    data["statement_limits"] = {"engineers": ENGINEER_LIMITS, "admins": ADMIN_LIMITS}


@pytest.fixture(scope="session")
def guarded_gateway(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[RunningGateway]:
    with gateway_with_data(pg_cluster, opa_binary, "pgwarden-gw-guards-", _guards) as gw:
        yield gw
