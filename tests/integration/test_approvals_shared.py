# ruff: noqa: S608  (tests build SQL around table names of their own)
"""Two gateways sharing a PostgreSQL control store: a statement held on one is released by
an approval made through the other's admin API (told by NOTIFY: the holder's own polling
is set far too slow to be what releases it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.localpg import LocalCluster, free_port
from gateway.identity.local import LocalTokenIssuer
from tests.harness import (
    RunningGateway,
    gateways_sharing_control,
)

from . import direct, fresh_table, simple, table_rows
from .approvals import Held, stored
from .test_approvals_api import pgwarden

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def pair(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[tuple[RunningGateway, RunningGateway]]:
    # A poll slower than any test: only a notification can release a held statement.
    with gateways_sharing_control(
        pg_cluster,
        opa_binary,
        control={"poll_seconds": 300},
        one={"approval": {"wait_seconds": 60}},
        two={"admin": {"port": free_port()}, "instance": "gw-2"},
    ) as pair:
        yield pair


def token_for_both(one: Any, two: Any, subject: str, groups: tuple[str, ...]) -> str:
    """Issued through the first gateway's settings: the token registry is in the control
    store both share, and both hold the signing key."""
    issuer = LocalTokenIssuer.from_settings(one.settings)
    try:
        return issuer.issue(subject, list(groups), 3600).token
    finally:
        issuer.close()


def test_held_on_one_gateway_released_through_the_other(
    pair: tuple[RunningGateway, RunningGateway],
) -> None:
    one, two = pair
    table = fresh_table(one)
    agent = token_for_both(one, two, "agent:bot", ("ai-agents",))
    approver = token_for_both(one, two, "user:ann", ("engineers",))
    held = Held(
        one.dsn(agent), lambda c: simple(c, f'DELETE FROM "{table}" WHERE id = 2 RETURNING id')
    )
    try:
        rid = held.request_id()
        # The other gateway lists it and approves it.
        listed = pgwarden(two, approver, "list", "--status", "pending", "--json")
        assert rid in listed.stdout, listed.output
        done = pgwarden(two, approver, "approve", rid, "--note", "via gw-2")
        assert done.exit_code == 0, done.output
        assert held.done(30) and held.error is None, held.error
        assert held.result == [(2,)]
        assert table_rows(one, table) == [(1, "v1"), (3, "v3")]
        assert stored(one, rid).status == "approved"
    finally:
        held.close()
        direct(one, f'DROP TABLE IF EXISTS "{table}"')


def test_denied_through_the_other(pair: tuple[RunningGateway, RunningGateway]) -> None:
    one, two = pair
    agent = token_for_both(one, two, "agent:bot", ("ai-agents",))
    approver = token_for_both(one, two, "user:root", ("admins",))
    held = Held(one.dsn(agent), lambda c: simple(c, "DELETE FROM orders WHERE id = -7"))
    try:
        rid = held.request_id()
        assert pgwarden(two, approver, "deny", rid, "--note", "no").exit_code == 0
        assert held.done(30)
        assert "denied by user:root: no" in str(held.error)
    finally:
        held.close()
