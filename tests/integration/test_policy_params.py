"""Bind parameters reach the policy input when a statement is executed, for policies that
ask for them at Parse with `"decide_with_params": true` (the reference policy does not)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cli.localpg import LocalCluster
from tests.harness import RunningGateway, start_gateway, stop_gateway

pytestmark = pytest.mark.server

POLICY = """package pgwarden

base := {"approvers": [], "masks": [], "decide_with_params": true}

decision := object.union(base, {"action": "deny", "reasons": ["order 13 is off limits"]}) if {
	"13" in input.statement.params
} else := object.union(base, {"action": "allow", "reasons": ["parameters checked"]})
"""


@pytest.fixture(scope="module")
def params_gateway(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[RunningGateway]:
    work = Path(tempfile.mkdtemp(prefix="pgwarden-params-"))
    rego, bundle = work / "rego" / "pgwarden", work / "bundles" / "pgwarden"
    rego.mkdir(parents=True)
    bundle.mkdir(parents=True)
    (rego / "policy.rego").write_text(POLICY)
    (bundle / ".manifest").write_text('{"roots": ["pgwarden"], "revision": "params-1"}')
    (bundle / "data.json").write_text("{}")
    gw = start_gateway(
        work / "state", pg_cluster, opa_binary,
        policy={"rego_dir": work / "rego", "bundle_dir": work / "bundles"},
    )  # fmt: skip
    try:
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(work, ignore_errors=True)


def test_each_execution_is_decided_with_its_parameters(params_gateway: Any) -> None:
    token = params_gateway.token("svc:params", groups=("services",))
    with psycopg.connect(params_gateway.dsn(token), autocommit=True) as conn:
        query = "SELECT id, amount FROM orders WHERE id = %s OR id = 13"
        assert conn.execute(query, [1], prepare=True).fetchall() == [(1, 10.5)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="order 13 is off limits"):
            conn.execute(query, [13], prepare=True)
        # The same prepared statement with another value runs again.
        assert conn.execute(query, [2], prepare=True).fetchall() == [(2, 20)]
