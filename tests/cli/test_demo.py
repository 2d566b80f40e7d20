"""`pgwarden demo --once`: the README's first command runs end to end on a fresh state dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.localpg import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.server
@pytest.mark.slow
def test_demo_shows_allow_deny_a_held_approval_masks_and_a_verified_trail(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # Admin port 0: the demo picks a free one for its approver's CLI (other test runs on this
    # machine may hold the default port).
    env = {**os.environ, "PGWARDEN_STATE_DIR": str(state), "PGWARDEN_ADMIN__PORT": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--once", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "DDL watch installed in database" in out  # the recommended target set-up
    assert "(3 rows)" in out  # the agent's read of orders
    assert "a***@example.com" in out and "ada@example.com" not in out  # masked
    # Held, approved from the approver's CLI, and the agent gets its row.
    assert "approval requested (apr-" in out
    assert "engineer> pgwarden approvals approve apr-" in out
    assert ": approved" in out and "(1 row)" in out
    # Held and denied from the CLI: the agent reads the note.
    assert "approval denied by user:alice: this deletes every order" in out
    assert "statement denied" in out and "pg_read_file" in out
    assert "a predicate is an oracle" in out
    assert "do not parse" in out
    assert "│ ok" in out  # audit verify
    assert "stopping PostgreSQL" in out
