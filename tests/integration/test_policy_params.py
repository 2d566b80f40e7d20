"""Bind parameters reach the policy input when a statement is executed, for policies that
ask for them at Parse with `"decide_with_params": true` (the reference policy does not)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from cli.localpg import LocalCluster
from gateway.protocol import Bind, Execute, Parse, Sync
from tests.harness import RunningGateway, start_gateway, stop_gateway

from . import REFUSED, RawClient, errors_in

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


def test_each_execution_is_decided_with_its_parameters(params_gateway: RunningGateway) -> None:
    token = params_gateway.token("svc:params", groups=("services",))
    with psycopg.connect(params_gateway.dsn(token), autocommit=True) as conn:
        query = "SELECT id, amount FROM orders WHERE id = %s OR id = 13"
        assert conn.execute(query, [1], prepare=True).fetchall() == [(1, 10.5)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="order 13 is off limits"):
            conn.execute(query, [13], prepare=True)
        # The same prepared statement with another value runs again.
        assert conn.execute(query, [2], prepare=True).fetchall() == [(2, 20)]


async def test_binary_parameters_of_types_the_server_described_are_decided_as_values(
    params_gateway: RunningGateway,
) -> None:
    """asyncpg leaves the parameter types to the server (its Parse declares none, its
    Describe reads them back) and binds values in binary: the policy must see `13`, not the
    bytes of an int4, or the deny on 13 is passed by."""
    token = params_gateway.token("svc:params", groups=("services",))
    conn = await asyncpg.connect(params_gateway.url(token), timeout=10)
    try:
        query = "SELECT id, amount FROM orders WHERE id = $1 OR id = 13"
        assert [tuple(r) for r in await conn.fetch(query, 1)] == [(1, 10.5)]
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="order 13 is off limits"):
            await conn.fetch(query, 13)
        assert [tuple(r) for r in await conn.fetch(query, 2)] == [(2, 20)]
        # Text in binary is its characters, so a policy reading text parameters sees them.
        by_note = "SELECT count(*) FROM orders WHERE $1::text = '13'"
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="order 13 is off limits"):
            await conn.fetchval(by_note, "13")
    finally:
        await conn.close()


def test_a_binary_parameter_of_an_undeclared_type_is_refused_where_values_decide(
    params_gateway: RunningGateway,
) -> None:
    """Bound in binary with a type neither the Parse declared nor a Describe read back, a
    value cannot be shown to the policy as what it is: the execution is refused (fail
    closed), the session carries on, and the same value in text is decided as usual."""
    token = params_gateway.token("svc:params", groups=("services",))
    client = RawClient(params_gateway, token)
    query = b"SELECT id FROM orders WHERE id = $1 OR id = 13"
    thirteen = (13).to_bytes(4, "big")
    try:
        client.send(Parse("p", query, (0,)), Bind("", "p", (1,), (thirteen,), ()), Execute(""))
        client.send(Sync())
        reply = client.until_ready()
        (error,) = errors_in(reply)
        assert error.sqlstate == REFUSED and "binary parameter" in (error.message or ""), error
        assert not [body for code, body in reply if code == "D"], reply
        # The session is usable; in text, 13 meets the policy's own deny, 1 runs.
        client.send(Bind("", "p", (), (b"13",), ()), Execute(""), Sync())
        (error,) = errors_in(client.until_ready())
        assert "order 13 is off limits" in (error.message or ""), error
        client.send(Bind("", "p", (), (b"1",), ()), Execute(""), Sync())
        reply = client.until_ready()
        assert not errors_in(reply) and [c for c, _ in reply].count("D") == 1, reply
    finally:
        client.close()
