"""Session recording: a target labelled pgwarden.record=rows has the rows each client
received (after masking) recorded with the statement's outcome, up to the limits."""

from __future__ import annotations

from typing import Any

import orjson
import psycopg
import pytest

from tests.harness import RunningGateway
from tests.integration.test_audit_support import last_pos, records_after, wait_for

pytestmark = pytest.mark.server


def test_recorded_rows_are_what_the_client_saw_after_masking(gateway: RunningGateway) -> None:
    settings = gateway.settings
    start = last_pos(settings)
    token = gateway.token("agent:recorded", groups=("ai-agents",))
    with psycopg.connect(gateway.dsn(token, target="app_recorded"), autocommit=True) as conn:
        seen = conn.execute("SELECT id, email FROM customers ORDER BY id").fetchall()
        conn.execute("SELECT id FROM orders WHERE id = %s", [1]).fetchall()
    assert seen == [(1, "a***@example.com"), (2, "g***@example.org")]

    def outcomes() -> list[dict[str, Any]] | None:
        found = [r.record() for r in records_after(settings, start) if r.kind == "outcome"]
        return found if len(found) >= 2 else None

    recorded = [o.get("recorded_rows") for o in wait_for(outcomes)]
    assert [["1", "a***@example.com"], ["2", "g***@example.org"]] in recorded
    assert [["1"]] in recorded
    for rows in recorded:  # never the cleartext value
        assert "ada@example.com" not in str(rows)
    # Each recorded row set carries the column names the client saw, simple protocol (the
    # first statement) and extended (the second, with a parameter) alike.
    named = {
        orjson.dumps(o["recorded_rows"]).decode(): o.get("recorded_columns")
        for o in wait_for(outcomes)
    }
    assert named['[["1","a***@example.com"],["2","g***@example.org"]]'] == ["id", "email"]
    assert named['[["1"]]'] == ["id"]


def test_unlabelled_target_records_no_rows(gateway: RunningGateway) -> None:
    settings = gateway.settings
    start = last_pos(settings)
    token = gateway.token("eng:unrecorded", groups=("engineers",))
    with psycopg.connect(gateway.dsn(token), autocommit=True) as conn:
        conn.execute("SELECT id FROM orders ORDER BY id").fetchall()

    def outcomes() -> list[dict[str, Any]] | None:
        found = [r.record() for r in records_after(settings, start) if r.kind == "outcome"]
        return found or None

    assert all(not o.get("recorded_rows") for o in wait_for(outcomes))
