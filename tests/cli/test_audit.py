"""`pgwarden audit` through typer's CliRunner against a temporary state directory."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from cli.audit import app, parse_age, parse_when
from gateway.audit import audit_writer
from gateway.audit.events import StatementOutcome, StatementRequest
from gateway.identity.principal import Principal
from gateway.policy.decision import Decision
from gateway.settings import load_settings

BOT = Principal("agent:ci-bot", "pgwarden", ("ai-agents",), "jti-9", None)
ALICE = Principal("alice", "https://idp.example", ("engineers",), "jti-3", None)


def _request(text: str, principal: Principal, action: str, at: float) -> StatementRequest:
    return StatementRequest(
        at, "gw-1", "s-1", "127.0.0.1", "psql", principal, "app", text, "fp", "simple", (),
        Decision(action, decision_id="d-" + text[:6]),  # type: ignore[arg-type]
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


def _invoke(state: Path, *args: str) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(app, list(args), env={"PGWARDEN_STATE_DIR": str(state)})
    return result.exit_code, result.stdout, result.stderr


def _jsonl(out: str) -> list[dict[str, object]]:
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
    assert [r["record"]["text"] for r in _jsonl(out)] == [  # type: ignore[index]
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
    db = sqlite3.connect(state / "audit.sqlite3")
    db.execute("UPDATE audit_record SET body = replace(body, 'orders', 'ordurs') WHERE seq = 4")
    db.commit()
    db.close()
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
