"""A session's timeline over both stores: records in the order written, each request joined
with its own outcome, and a session longer than the cap replayed from its start."""

from __future__ import annotations

import pytest

from gateway.audit import timeline
from gateway.audit.search import UNREADABLE, AuditQuery, search_page
from gateway.audit.timeline import session_timeline

from .conftest import AuditRig, session_event, statement_outcome, statement_request


async def test_steps_join_requests_with_their_outcomes_in_order(rig: AuditRig) -> None:
    async with rig.writer() as writer:
        await writer.session(session_event("session_start"))
        first = await writer.request(statement_request("SELECT 1"))
        second = await writer.request(statement_request("SELECT 2"))
        # Outcomes written out of order still land on their own request.
        await writer.outcome(statement_outcome(second, command_tag="SELECT 22"))
        await writer.outcome(statement_outcome(first, command_tag="SELECT 11"))
        await writer.session(session_event("session_end", "client quit"))
    found = await session_timeline(rig.store(), "sess-1")
    assert found is not None and not found.truncated
    assert [s.kind for s in found.steps] == ["login", "statement", "statement", "end"]
    assert [s.number for s in found.steps] == [1, 2, 3, 4]
    statements = [s.statement for s in found.steps if s.statement is not None]
    assert [(s.text, s.outcome and s.outcome.command_tag) for s in statements] == [
        ("SELECT 1", "SELECT 11"),
        ("SELECT 2", "SELECT 22"),
    ]
    assert statements[0].outcome is not None
    assert statements[0].outcome.recorded_rows == (("1", "j***@example.com"), ("2", None))
    assert found.steps[-1].reason == "client quit"
    assert await session_timeline(rig.store(), "no-such-session") is None


async def test_a_session_longer_than_the_cap_replays_its_start(
    rig: AuditRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(timeline, "MAX_STEPS", 3)
    async with rig.writer() as writer:
        await writer.session(session_event("session_start"))
        for i in range(6):
            rid = await writer.request(statement_request(f"SELECT {i}"))
            await writer.outcome(statement_outcome(rid))
    found = await session_timeline(rig.store(), "sess-1")
    assert found is not None and found.truncated
    assert [s.kind for s in found.steps] == ["login", "statement", "statement"]
    texts = [s.statement.text for s in found.steps if s.statement is not None]
    assert texts == ["SELECT 0", "SELECT 1"]


async def test_a_body_changed_into_no_record_is_shown_as_such_not_failed_on(
    rig: AuditRig,
) -> None:
    async with rig.writer() as writer:
        await writer.session(session_event("session_start"))
        rid = await writer.request(statement_request("SELECT 1"))
        await writer.outcome(statement_outcome(rid))
    await rig.sql("UPDATE audit_record SET body = ? WHERE seq = 2", b"not json")
    found = await session_timeline(rig.store(), "sess-1")
    assert found is not None
    assert [s.kind for s in found.steps] == ["login", "statement"]
    assert found.steps[1].statement is None and found.steps[1].reason == UNREADABLE
    page = await search_page(rig.store(), AuditQuery(session_id="sess-1"))
    assert page.records[0].summary == UNREADABLE  # newest first: the changed one
