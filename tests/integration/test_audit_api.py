"""The audit API on a real gateway's admin listener: an agent's session through psycopg (a
masked read on a recorded target, a refused server-side escape, a write held for approval)
is found by every search filter, replayed step by step with what the client received, and
the chain's state is the one `pgwarden audit verify` reports."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from typer.testing import CliRunner

from cli.localpg import LocalCluster, free_port
from cli.main import app
from tests.harness import RunningGateway, start_gateway, stop_gateway

pytestmark = pytest.mark.server

MASKED_READ = "SELECT id, email, ssn FROM customers ORDER BY id"
ESCAPE = "SELECT pg_read_file('/etc/hostname')"
HELD_WRITE = "UPDATE orders SET amount = amount WHERE id = 3"


@pytest.fixture(scope="module")
def audit_gw(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[RunningGateway]:
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-auditapi-"))
    gw = start_gateway(state, pg_cluster, opa_binary, admin={"port": free_port()})
    try:
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)


def _url(gw: RunningGateway, path: str) -> str:
    assert gw.gateway.admin is not None and gw.gateway.admin.address is not None
    host, port = gw.gateway.admin.address
    return f"http://{host}:{port}{path}"


def _get(gw: RunningGateway, path: str, token: str | None, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.get(_url(gw, path), params=params, headers=headers, timeout=30)


def _until(found: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("not found in time")


@pytest.fixture(scope="module")
def agent_session(audit_gw: RunningGateway) -> dict[str, Any]:
    """One agent session on the recorded target; returns its subject and what it saw."""
    subject = f"agent:audited-{time.monotonic_ns()}"
    token = audit_gw.token(subject, groups=("ai-agents",))
    started = time.time()
    with psycopg.connect(audit_gw.dsn(token, target="app_recorded"), autocommit=True) as conn:
        seen = conn.execute(MASKED_READ).fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(ESCAPE)
        with pytest.raises(psycopg.Error):
            conn.execute(HELD_WRITE)
    admin = audit_gw.token("user:auditor", groups=("admins",))

    def ended() -> str | None:
        page = _get(audit_gw, "/audit/records", admin, subject=subject, kind="session_end")
        records = page.json()["records"] if page.status_code == 200 else []
        return records[0]["session_id"] if records else None

    return {
        "subject": subject,
        "seen": seen,
        "admin": admin,
        "session_id": _until(ended),
        "started": started,
    }


def test_search_finds_the_agents_statements_by_every_filter(
    audit_gw: RunningGateway, agent_session: dict[str, Any]
) -> None:
    admin, subject = agent_session["admin"], agent_session["subject"]

    def texts(**params: Any) -> list[str]:
        answer = _get(audit_gw, "/audit/records", admin, **params)
        assert answer.status_code == 200, answer.text
        return [r["summary"] for r in answer.json()["records"] if r["kind"] == "request"]

    assert texts(subject=subject) == [HELD_WRITE, ESCAPE, MASKED_READ]
    assert texts(subject=subject, action="mask") == [MASKED_READ]
    assert texts(subject=subject, action="deny") == [ESCAPE]
    assert texts(subject=subject, action="approve") == [HELD_WRITE]
    assert texts(subject=subject, action="allow") == [MASKED_READ]
    assert texts(group="ai-agents", text="pg_read_file('/etc/hostname')", subject=subject) == [
        ESCAPE
    ]
    assert texts(group="engineers", subject=subject) == []
    assert texts(target="app_recorded", subject=subject, text="customers") == [MASKED_READ]
    assert texts(target="app", subject=subject) == []
    assert texts(subject=subject, since=agent_session["started"] - 1) == [
        HELD_WRITE, ESCAPE, MASKED_READ,
    ]  # fmt: skip
    assert texts(subject=subject, until=agent_session["started"] - 1) == []

    hit = _get(audit_gw, "/audit/records", admin, subject=subject, action="mask").json()
    record = hit["records"][0]
    assert record["groups"] == ["ai-agents"]
    assert record["session_id"] == agent_session["session_id"]
    assert set(record["masked_columns"]) >= {"public.customers.email", "public.customers.ssn"}


def test_search_pages_newest_first_without_gaps(
    audit_gw: RunningGateway, agent_session: dict[str, Any]
) -> None:
    admin, session = agent_session["admin"], agent_session["session_id"]
    every = _get(audit_gw, "/audit/records", admin, session=session, limit=500).json()
    assert every["next_before"] is None
    ids: list[str] = []
    before: int | None = None
    while True:
        params: dict[str, Any] = {"session": session, "limit": 2}
        if before is not None:
            params["before"] = before
        page = _get(audit_gw, "/audit/records", admin, **params).json()
        ids.extend(r["id"] for r in page["records"])
        before = page["next_before"]
        if before is None:
            break
    assert ids == [r["id"] for r in every["records"]]
    assert len(ids) >= 5  # login, three statements, approval records, end


def test_the_session_timeline_replays_what_the_client_received(
    audit_gw: RunningGateway, agent_session: dict[str, Any]
) -> None:
    answer = _get(
        audit_gw, f"/audit/sessions/{agent_session['session_id']}", agent_session["admin"]
    )
    assert answer.status_code == 200, answer.text
    timeline = answer.json()
    steps = timeline["steps"]
    assert timeline["subject"] == agent_session["subject"]
    assert timeline["target"] == "app_recorded"
    assert [s["number"] for s in steps] == list(range(1, len(steps) + 1))
    kinds = [s["kind"] for s in steps]
    assert kinds[0] == "login" and kinds[-1] == "end"
    statements = [s["statement"] for s in steps if s["kind"] == "statement"]
    assert [s["text"] for s in statements] == [MASKED_READ, ESCAPE, HELD_WRITE]

    read, escape, held = statements
    assert read["action"] == "allow"
    masks = {m["column"]: m["method"] for m in read["masks"]}
    assert masks["public.customers.email"] == "email"
    assert masks["public.customers.ssn"] == "redact"
    outcome = read["outcome"]
    assert outcome["command_tag"] == "SELECT 2" and outcome["rows"] == 2
    assert outcome["duration_ms"] >= 0
    assert outcome["recorded_columns"] == ["id", "email", "ssn"]
    # The recorded rows are what the client received: masked, never the stored values.
    seen = agent_session["seen"]
    assert outcome["recorded_rows"] == [[str(v) for v in row] for row in seen]
    assert "ada@example.com" not in answer.text and "123-45-6789" not in answer.text

    assert escape["action"] == "deny" and escape["reasons"]
    assert escape["outcome"] is None or escape["outcome"]["forwarded"] is False
    assert held["action"] == "approve" and held["approvers"]
    approvals = [s for s in steps if s["kind"] == "approval"]
    assert approvals and approvals[0]["approval_event"] == "requested"
    assert held["approval_id"] == approvals[0]["approval_id"]


def test_an_unknown_session_is_404_and_bad_filters_are_422(
    audit_gw: RunningGateway, agent_session: dict[str, Any]
) -> None:
    admin = agent_session["admin"]
    missing = _get(audit_gw, "/audit/sessions/no-such-session", admin)
    assert missing.status_code == 404
    for params in (
        {"action": "masked"},
        {"kind": "statement"},
        {"since": 20, "until": 10},
        {"limit": 0},
    ):
        refused = _get(audit_gw, "/audit/records", admin, **params)
        assert refused.status_code == 422, (params, refused.text)


def test_the_audit_api_needs_a_token_of_an_admin_group_even_on_loopback(
    audit_gw: RunningGateway, agent_session: dict[str, Any]
) -> None:
    session = agent_session["session_id"]
    agent = audit_gw.token("agent:curious", groups=("ai-agents",))
    for path in ("/audit/records", f"/audit/sessions/{session}", "/audit/chain"):
        assert _get(audit_gw, path, None).status_code == 401
        assert _get(audit_gw, path, "not-a-token").status_code == 401
        refused = _get(audit_gw, path, agent)
        assert refused.status_code == 403
        assert "ada" not in refused.text and "SELECT" not in refused.text


def test_the_chain_state_is_what_audit_verify_reports(
    audit_gw: RunningGateway, agent_session: dict[str, Any]
) -> None:
    answer = _get(audit_gw, "/audit/chain", agent_session["admin"])
    assert answer.status_code == 200, answer.text
    state = answer.json()
    assert state["ok"] is True and state["problems"] == []
    instance = audit_gw.settings.instance
    assert [h["chain"] for h in state["heads"]] == [instance]
    assert state["heads"][0]["seq"] >= state["verify"]["chains"][0]["last_seq"] - 1000
    assert state["last_record"]["id"].startswith(f"{instance}:")
    assert state["index_lag"] is not None and state["index_lag"] >= 0
    cli = CliRunner().invoke(
        app,
        ["audit", "verify", "--json"],
        env={"PGWARDEN_STATE_DIR": str(audit_gw.settings.state_dir)},
    )
    assert cli.exit_code == 0, cli.output
    assert '"ok":true' in cli.output
    assert state["verify"]["ok"] is True
    assert state["verify"]["log"]["chain"] == instance


def test_a_killed_session_replays_the_kill_and_its_end(audit_gw: RunningGateway) -> None:
    subject = f"agent:killed-{time.monotonic_ns()}"
    admin = audit_gw.token("user:operator", groups=("admins",))
    conn = psycopg.connect(audit_gw.dsn(audit_gw.token(subject, groups=("ai-agents",))))
    try:
        conn.execute("SELECT 1").fetchall()

        def started() -> str | None:
            page = _get(audit_gw, "/audit/records", admin, subject=subject, kind="session_start")
            records = page.json()["records"] if page.status_code == 200 else []
            return records[0]["session_id"] if records else None

        session = _until(started)
        killed = httpx.post(
            _url(audit_gw, "/sessions/kill"),
            json={"session_id": session, "reason": "runaway agent"},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        )
        assert killed.status_code == 200, killed.text
    finally:
        conn.close()

    def steps() -> list[dict[str, Any]] | None:
        answer = _get(audit_gw, f"/audit/sessions/{session}", admin)
        found = answer.json()["steps"] if answer.status_code == 200 else []
        return found if found and found[-1]["kind"] == "end" else None

    replay = _until(steps)
    kinds = [s["kind"] for s in replay]
    assert kinds[0] == "login" and "statement" in kinds and kinds[-1] == "end"
    kill = next(s for s in replay if s["kind"] == "kill")
    assert "user:operator" in kill["reason"] and "runaway agent" in kill["reason"]
    assert kinds.index("kill") < kinds.index("end")


def test_the_chain_state_names_a_record_changed_in_the_index(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> None:
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-audittamper-"))
    gw = start_gateway(state, pg_cluster, opa_binary, admin={"port": free_port()})
    try:
        admin = gw.token("user:auditor", groups=("admins",))
        with psycopg.connect(gw.dsn(gw.token("eng:tamper", groups=("engineers",)))) as conn:
            conn.execute("SELECT 42").fetchall()

        def indexed() -> bool:
            page = _get(gw, "/audit/records", admin, text="SELECT 42", kind="request")
            return page.status_code == 200 and bool(page.json()["records"])

        _until(indexed)
        assert _get(gw, "/audit/chain", admin).json()["ok"] is True
        db = sqlite3.connect(gw.settings.state_path(gw.settings.audit.sqlite_path))
        db.execute(
            "UPDATE audit_record SET body = CAST(replace(CAST(body AS TEXT), 'SELECT 42',"
            " 'SELECT 43') AS BLOB) WHERE kind = 'request' AND text = 'SELECT 42'"
        )
        db.commit()
        db.close()
        answer = _get(gw, "/audit/chain", admin)
        assert answer.status_code == 200, answer.text
        chain = answer.json()
        assert chain["ok"] is False and chain["verify"]["ok"] is False
        assert any("changed" in p for p in chain["problems"]), chain["problems"]
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)
