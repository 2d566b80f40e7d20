"""`pgwarden audit` through typer's CliRunner against a temporary state directory."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from cli.audit import app
from gateway.audit import audit_writer
from gateway.audit.events import StatementOutcome, StatementRequest
from gateway.audit.search import parse_age, parse_when
from gateway.identity.principal import Principal
from gateway.policy.decision import Action, Decision, Mask
from gateway.settings import load_settings

BOT = Principal("agent:ci-bot", "pgwarden", ("ai-agents",), "jti-9", None)
ALICE = Principal("alice", "https://idp.example", ("engineers",), "jti-3", None)


def _request(text: str, principal: Principal, action: Action, at: float) -> StatementRequest:
    return StatementRequest(
        at, "gw-1", "s-1", "127.0.0.1", "psql", principal, "app", text, "fp", "simple", (),
        Decision(action, decision_id="d-" + text[:6]),
    )  # fmt: skip


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state dir holding a short trail: an old statement, then three recent ones."""
    settings = load_settings(state_dir=tmp_path, instance="gw-1")

    async def fill() -> None:
        writer = audit_writer(settings)
        await writer.start()
        old = time.time() - 200 * 86400
        await writer.request(_request("SELECT 'ancient'", ALICE, "allow", old))
        rid = await writer.request(
            _request("SELECT email FROM customers", BOT, "allow", time.time())
        )
        await writer.outcome(
            StatementOutcome(rid, time.time(), "SELECT 1", 1, None, None, 2.5, 80,
                             recorded_rows=(("j***@example.com",),))
        )  # fmt: skip
        await writer.request(_request("DELETE FROM orders", BOT, "deny", time.time()))
        await writer.close()

    asyncio.run(fill())
    return tmp_path


def _invoke(state: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(app, list(args), env={"PGWARDEN_STATE_DIR": str(state), **(env or {})})
    return result.exit_code, result.stdout, result.stderr


def _append(
    state: Path, *requests: StatementRequest, outcome: StatementOutcome | None = None
) -> None:
    """More records on the fixture's chain (concurrent requests share group commits)."""
    settings = load_settings(state_dir=state, instance="gw-1")

    async def fill() -> None:
        writer = audit_writer(settings)
        await writer.start()
        ids = await asyncio.gather(*(writer.request(r) for r in requests))
        if outcome is not None:
            await writer.outcome(replace(outcome, request_id=ids[-1]))
        await writer.close()

    asyncio.run(fill())


def _tamper(state: Path, statement: str) -> None:
    """Change the audit store behind pgwarden's back, as an attacker with the file would."""
    db = sqlite3.connect(state / "audit.sqlite3")
    db.execute(statement)
    db.commit()
    db.close()


def _jsonl(out: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


def test_tail_shows_the_latest_records_oldest_first(state: Path) -> None:
    code, out, _ = _invoke(state, "tail", "-n", "2", "--json")
    assert code == 0
    assert [r["id"] for r in _jsonl(out)] == ["gw-1:3", "gw-1:4"]
    code, out, _ = _invoke(state, "tail")
    assert code == 0 and "DELETE FROM orders" in out and "agent:ci-bot" in out


def test_tail_follow_prints_new_records(state: Path) -> None:
    code, out, _ = _invoke(state, "tail", "-n", "1", "-f", "--follow-for", "0.3", "--json")
    assert code == 0 and [r["id"] for r in _jsonl(out)] == ["gw-1:4"]


def test_search_by_subject_action_text_and_time(state: Path) -> None:
    code, out, _ = _invoke(
        state, "search", "--subject", "agent:ci-bot", "--kind", "request", "--json"
    )
    assert code == 0
    assert [r["record"]["text"] for r in _jsonl(out)] == [
        "DELETE FROM orders", "SELECT email FROM customers",
    ]  # fmt: skip
    code, out, _ = _invoke(state, "search", "--action", "deny", "--json")
    assert [r["id"] for r in _jsonl(out)] == ["gw-1:4"]
    code, out, _ = _invoke(state, "search", "--text", "ancient", "--json")
    assert [r["id"] for r in _jsonl(out)] == ["gw-1:1"]
    code, out, _ = _invoke(state, "search", "--until", "100d", "--json")
    assert [r["id"] for r in _jsonl(out)] == ["gw-1:1"]
    code, out, _ = _invoke(state, "search", "--since", "1h", "--target", "app", "--json")
    assert [r["id"] for r in _jsonl(out)] == ["gw-1:4", "gw-1:2"]
    code, _, err = _invoke(state, "search", "--since", "yesterday-ish")
    assert code != 0 and "bad time" in err


def test_search_by_group_and_masked_statements(state: Path) -> None:
    masked = replace(
        _request("SELECT phone FROM customers", BOT, "allow", time.time()),
        masked_columns=("public.customers.phone",),
    )
    _append(state, masked)
    code, out, _ = _invoke(state, "search", "--group", "engineers", "--json")
    assert code == 0 and [r["record"]["text"] for r in _jsonl(out)] == ["SELECT 'ancient'"]
    code, out, _ = _invoke(state, "search", "--action", "mask", "--json")
    assert code == 0 and [r["record"]["text"] for r in _jsonl(out)] == [
        "SELECT phone FROM customers"
    ]
    code, _, err = _invoke(state, "search", "--since", "1h", "--until", "2h")
    assert code == 1 and "bad --since" in err and "empty" in err


def test_show_a_request_with_its_outcome_and_recorded_rows(state: Path) -> None:
    code, out, _ = _invoke(state, "show", "gw-1:2", "--json")
    assert code == 0
    doc = orjson.loads(out)
    assert doc["record"]["principal"]["token_id"] == "jti-9"
    assert [o["record"]["recorded_rows"] for o in doc["outcomes"]] == [[["j***@example.com"]]]
    code, out, _ = _invoke(state, "show", "gw-1:2")
    assert code == 0 and "recorded rows" in out and "j***@example.com" in out
    code, _, err = _invoke(state, "show", "gw-1:99")
    assert code == 1 and "no audit record gw-1:99" in err


def test_verify_passes_then_names_the_tampered_record(state: Path) -> None:
    code, out, _ = _invoke(state, "verify", "--json")
    assert code == 0 and orjson.loads(out)["ok"] is True
    _tamper(state, "UPDATE audit_record SET body = replace(body, 'orders', 'ordurs') WHERE seq = 4")
    code, out, err = _invoke(state, "verify")
    assert code == 1
    assert "changed at gw-1:4" in err


def test_verify_reads_genesis_keys_from_another_folder(state: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "auditor-keys"
    elsewhere.mkdir()
    code, _, err = _invoke(state, "verify", "--keys", str(elsewhere))
    assert code == 1 and "unverifiable" in err
    (elsewhere / "gw-1.genesis").write_bytes((state / "audit-keys" / "gw-1.genesis").read_bytes())
    code, _, _ = _invoke(state, "verify", "--keys", str(elsewhere))
    assert code == 0


def test_export_streams_every_record_as_jsonl(state: Path, tmp_path: Path) -> None:
    code, out, _ = _invoke(state, "export", "--format", "jsonl")
    assert code == 0
    lines = _jsonl(out)
    assert [r["seq"] for r in lines] == [1, 2, 3, 4]
    assert all(isinstance(r["link"], str) and len(r["link"]) == 64 for r in lines)
    target = tmp_path / "trail.jsonl"
    code, _, err = _invoke(state, "export", "-o", str(target))
    assert code == 0 and "exported 4 records" in err
    assert len(target.read_text().splitlines()) == 4
    code, _, err = _invoke(state, "export", "--format", "csv")
    assert code == 1 and "only jsonl" in err


def test_prune_removes_old_records_and_verify_still_passes(state: Path) -> None:
    code, out, _ = _invoke(state, "prune", "--older-than", "90d")
    assert code == 0 and "through seq 1" in out
    code, out, _ = _invoke(state, "export")
    assert [r["seq"] for r in _jsonl(out)] == [2, 3, 4, 5]
    assert _jsonl(out)[-1]["kind"] == "prune"
    code, _, _ = _invoke(state, "verify")
    assert code == 0
    code, out, _ = _invoke(state, "prune", "--older-than", "90d")
    assert code == 0 and "nothing older" in out
    code, _, err = _invoke(state, "prune", "--older-than", "ninety days")
    assert code == 1 and "bad age" in err


def test_ages_and_times() -> None:
    assert parse_age("90d") == 90 * 86400
    assert parse_age("1h30m") == 5400
    assert parse_when("1w", 1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_when("1700000000", 0) == 1_700_000_000.0
    assert parse_when("2024-01-01T00:00:00+00:00", 0) == 1_704_067_200.0
    with pytest.raises(ValueError):
        parse_age("")


def test_prune_takes_days_or_hours_only(state: Path) -> None:
    for age in ("5m", "90m", "7200s", "2w", "1d30m", "-3d"):
        code, _, err = _invoke(state, "prune", "--older-than", age)
        assert code == 1 and "use days or hours" in err, (age, err)
    code, out, _ = _invoke(state, "prune", "--older-than", "2400h")
    assert code == 0 and "removed 1 record(s) through seq 1" in out


def test_prune_refuses_to_go_below_the_retention_floor(state: Path) -> None:
    code, _, err = _invoke(state, "prune", "--older-than", "6d")
    assert code == 1 and "audit.retention_floor_days (7d)" in err
    code, _, err = _invoke(state, "prune", env={"PGWARDEN_AUDIT__RETENTION_DAYS": "3"})
    assert code == 1 and "audit.retention_floor_days (7d)" in err
    code, _, err = _invoke(
        state, "prune", "--older-than", "100d", env={"PGWARDEN_AUDIT__RETENTION_FLOOR_DAYS": "150"}
    )
    assert code == 1 and "(150d)" in err
    # Lowered, the floor lets the recent records go too.
    code, out, _ = _invoke(
        state, "prune", "--older-than", "0h", env={"PGWARDEN_AUDIT__RETENTION_FLOOR_DAYS": "0"}
    )
    assert code == 0 and "removed 4 record(s) through seq 4 (from seq 1," in out
    code, _, _ = _invoke(state, "verify")
    assert code == 0


def test_prune_dry_run_says_what_it_would_remove_and_removes_nothing(state: Path) -> None:
    code, out, _ = _invoke(state, "prune", "--older-than", "90d", "--dry-run")
    assert code == 0 and out.startswith("would remove 1 record(s) through seq 1 (from seq 1,")
    code, out, _ = _invoke(state, "prune", "--older-than", "90d", "--dry-run", "--json")
    doc = orjson.loads(out)
    assert (doc["dry_run"], doc["records"], doc["first_seq"], doc["through_seq"]) == (
        True, 1, 1, 1,
    )  # fmt: skip
    code, out, _ = _invoke(state, "export")
    assert [r["seq"] for r in _jsonl(out)] == [1, 2, 3, 4]
    code, out, _ = _invoke(state, "prune", "--older-than", "90d", "--json")
    doc = orjson.loads(out)
    assert (doc["dry_run"], doc["records"], doc["through_seq"]) == (False, 1, 1)
    code, out, _ = _invoke(state, "prune", "--older-than", "90d", "--dry-run", "--json")
    assert orjson.loads(out)["records"] == 0


def test_verify_fails_when_the_head_witness_is_deleted(state: Path) -> None:
    code, _, _ = _invoke(state, "verify")
    assert code == 0
    # The witness is what exposes a cut tail: without it, cutting the tail is invisible.
    for witness in (state / "audit-head").glob("*.head"):
        witness.unlink()
    _tamper(state, "DELETE FROM audit_record WHERE seq = 4")
    code, out, err = _invoke(state, "verify")
    assert code == 1 and "no head witness for chain 'gw-1'" in err
    code, out, _ = _invoke(state, "verify", "--json")
    assert code == 1 and orjson.loads(out)["chains"][0]["problem"]["kind"] == "unverifiable"
    # Asked for explicitly (a chain written on another host), the walk alone decides.
    code, _, _ = _invoke(state, "verify", "--no-head")
    assert code == 0


def test_ids_and_text_are_printed_literally(state: Path) -> None:
    now = time.time()
    _append(state, *(_request(f"SELECT {i}", BOT, "allow", now) for i in range(96)))
    _append(state, _request("SELECT ':smile: [bold]x[/bold]'", BOT, "allow", now))
    _tamper(
        state, "UPDATE audit_record SET body = replace(body, 'SELECT', 'DELETE') WHERE seq = 100"
    )
    code, out, err = _invoke(state, "verify")
    assert code == 1
    # `gw-1:100:` is not the emoji code :100:, neither in the table nor on stderr.
    assert "gw-1:100:" in out and "changed at gw-1:100:" in err
    assert "\U0001f4af" not in out + err
    code, out, _ = _invoke(state, "tail", "-n", "1")
    assert code == 0 and "SELECT ':smile: [bold]x[/bold]'" in out


def test_show_prints_the_whole_decision_and_named_recorded_rows(state: Path) -> None:
    long_reason = "ai-agents may not use a classified column in a predicate " * 5
    decision = Decision(
        "allow",
        reasons=(long_reason.strip(), "second reason"),
        approvers=("engineers", "admins"),
        masks=(Mask("public", "customers", "email", "email"),),
        decision_id="d-whole",
        bundle_revision="rev-7",
    )
    request = replace(_request("SELECT id, email FROM customers", BOT, "allow", time.time()),
                      decision=decision)  # fmt: skip
    outcome = StatementOutcome("", time.time(), "SELECT 2", 2, None, None, 1.0, 90,
                               recorded_rows=(("1", "a***@example.com"), ("2", None)),
                               recorded_columns=("id", "email"))  # fmt: skip
    _append(state, request, outcome=outcome)
    code, out, _ = _invoke(state, "show", "gw-1:5")
    assert code == 0
    flat = " ".join(out.split())
    assert "decision.reasons[0]" in out and "decision.reasons[1]" in out
    # Every word of the long reason is there, folded over lines but never cut.
    assert out.count("predicate") == 5 and "…" not in out
    for shown in ("second reason", "engineers", "admins", "d-whole", "rev-7",
                  "public.customers.email → email"):  # fmt: skip
        assert shown in flat, shown
    # The recorded rows under the names the client saw.
    assert "recorded rows" in out and "a***@example.com" in out and "NULL" in out
    header = next(line for line in out.splitlines() if "email" in line and "id" in line)
    assert "col 1" not in header
    code, out, _ = _invoke(state, "show", "gw-1:5", "--json")
    assert orjson.loads(out)["outcomes"][0]["record"]["recorded_columns"] == ["id", "email"]


def test_search_takes_only_real_actions_and_kinds(state: Path) -> None:
    for option, value in (("--action", "denied"), ("--action", "DENY"), ("--kind", "requests")):
        code, _, err = _invoke(state, "search", option, value)
        assert code == 1 and f"bad {option} {value!r}" in err, err
    code, out, _ = _invoke(state, "search", "--action", "approve", "--json")
    assert code == 0 and _jsonl(out) == []


def test_tail_rejects_a_negative_count(state: Path) -> None:
    code, _, err = _invoke(state, "tail", "-n", "-1")
    assert code != 0 and "-n" in err
    code, out, _ = _invoke(state, "tail", "-n", "0", "--json")
    assert code == 0 and _jsonl(out) == []
