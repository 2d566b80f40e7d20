"""First light: a psql session through the real gateway, policy and audit."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.harness import RunningGateway

pytestmark = pytest.mark.server


def test_psql_select_through_gateway(gateway: RunningGateway) -> None:
    token = gateway.token(groups=("admins",))
    out = subprocess.run(
        ["psql", "-X", "-At", gateway.dsn(token), "-c", "SELECT count(*) FROM orders; SELECT 2"],
        capture_output=True,
        text=True,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "2"]
