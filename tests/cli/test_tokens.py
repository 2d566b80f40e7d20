"""`pgwarden tokens` through the real CLI: issue → verify → list → revoke → refused."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from cli.main import app
from gateway.identity.principal import TokenRejected
from gateway.settings import load_settings
from tests.harness import identity_verifier


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def runner(state_dir: Path) -> CliRunner:
    return CliRunner(env={"PGWARDEN_STATE_DIR": str(state_dir), "PGWARDEN_CONFIG": None})


async def test_issue_list_revoke_round_trip(runner: CliRunner, state_dir: Path) -> None:
    issued = runner.invoke(
        app,
        [
            "tokens",
            "issue",
            "--subject",
            "agent:ci",
            "--group",
            "ai-agents",
            "--group",
            "readers",
            "--ttl",
            "8h",
        ],
    )
    assert issued.exit_code == 0, issued.stderr
    token = issued.stdout.strip()
    assert "\n" not in token and token.count(".") == 2  # the token alone, for $(...)

    async with identity_verifier(load_settings(state_dir=state_dir)) as verifier:
        principal = await verifier.verify(token)
        assert principal.subject == "agent:ci"
        assert principal.groups == ("ai-agents", "readers")
        assert principal.expires_at is not None
        assert 8 * 3600 - 5 < principal.expires_at - time.time() <= 8 * 3600

        listed = runner.invoke(app, ["tokens", "list", "--json"])
        assert listed.exit_code == 0, listed.stderr
        (row,) = orjson.loads(listed.stdout)
        assert row["jti"] == principal.token_id
        assert (row["subject"], row["groups"], row["status"]) == (
            "agent:ci",
            ["ai-agents", "readers"],
            "active",
        )
        table = runner.invoke(app, ["tokens", "list"])
        assert principal.token_id in table.stdout and "active" in table.stdout
        assert token not in table.stdout + listed.stdout

        revoked = runner.invoke(app, ["tokens", "revoke", principal.token_id])
        assert revoked.exit_code == 0, revoked.stderr
        # A login asks the registry afresh: refused as soon as `revoke` returned.
        with pytest.raises(TokenRejected) as caught:
            await verifier.verify(token)
        assert caught.value.check == "token revoked"
        assert verifier.still_valid(principal) == "token revoked"
        (row,) = orjson.loads(runner.invoke(app, ["tokens", "list", "--json"]).stdout)
        assert row["status"] == "revoked" and row["revoked_at"]


@pytest.mark.parametrize("ttl", ["5", "8x", "h", "0s", "400d", "-1h"])
def test_bad_ttl_is_one_clear_line(runner: CliRunner, ttl: str) -> None:
    result = runner.invoke(app, ["tokens", "issue", "--subject", "a", "--ttl", ttl])
    assert result.exit_code != 0
    assert result.stdout == ""
    assert result.stderr.startswith("pgwarden: bad --ttl") and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("ttl", "seconds"), [("90s", 90), ("30m", 1800), ("1h30m", 5400), ("7d", 604800)]
)
def test_ttl_units(runner: CliRunner, ttl: str, seconds: int) -> None:
    result = runner.invoke(app, ["tokens", "issue", "--subject", "svc:a", "--ttl", ttl])
    assert result.exit_code == 0, result.stderr
    (row,) = orjson.loads(runner.invoke(app, ["tokens", "list", "--json"]).stdout)
    issued = datetime.strptime(row["issued_at"], "%Y-%m-%d %H:%M:%SZ")
    expires = datetime.strptime(row["expires_at"], "%Y-%m-%d %H:%M:%SZ")
    assert (expires - issued).total_seconds() == seconds


def test_revoking_an_unknown_id_fails(runner: CliRunner) -> None:
    result = runner.invoke(app, ["tokens", "revoke", "no-such-id"])
    assert result.exit_code == 1
    assert result.stderr == "pgwarden: no token with id no-such-id\n"


def test_empty_subject_fails(runner: CliRunner) -> None:
    result = runner.invoke(app, ["tokens", "issue", "--subject", " "])
    assert result.exit_code == 1
    assert "subject" in result.stderr and result.stdout == ""


ROOT = Path(__file__).resolve().parents[2]


def test_issue_warns_about_a_group_the_policy_does_not_mention(
    runner: CliRunner, tmp_path: Path
) -> None:
    reference = {
        "PGWARDEN_POLICY__REGO_DIR": str(ROOT / "rego"),
        "PGWARDEN_POLICY__BUNDLE_DIR": str(ROOT / "bundles"),
    }
    args = ["tokens", "issue", "--subject", "agent:x"]
    result = runner.invoke(app, [*args, "--group", "engineer", "--group", "pii-readers"],
                           env=reference)  # fmt: skip
    assert result.exit_code == 0 and result.stdout.count(".") == 2  # still issued
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "group 'engineer' (a typo?)" in warnings[0]
    result = runner.invoke(app, [*args, "--group", "engineers", "--group", "ai-agents"],
                           env=reference)  # fmt: skip
    assert result.exit_code == 0 and "warning" not in result.stderr

    # Another policy knows other groups; a group in its data counts as mentioned.
    rego, data = tmp_path / "rego", tmp_path / "bundles"
    rego.mkdir()
    data.mkdir()
    (rego / "p.rego").write_text('package p\n\nallow if "analysts" in input.principal.groups\n')
    (rego / "p_test.rego").write_text(
        'package p\n\ntest_x if allow with input as {"g": "testers"}\n'
    )
    (data / "data.json").write_text('{"teams": {"auditors": ["read"]}}')
    own = {"PGWARDEN_POLICY__REGO_DIR": str(rego), "PGWARDEN_POLICY__BUNDLE_DIR": str(data)}
    result = runner.invoke(app, [*args, "--group", "analysts", "--group", "auditors"], env=own)
    assert result.exit_code == 0 and "warning" not in result.stderr
    # Strings only a test spells out are not the policy's.
    for group in ("engineers", "testers"):
        result = runner.invoke(app, [*args, "--group", group], env=own)
        assert f"does not mention group {group!r}" in result.stderr

    # With the policy elsewhere (your own OPA) there is nothing to compare with.
    result = runner.invoke(
        app, [*args, "--group", "engineer"],
        env={"PGWARDEN_POLICY__REGO_DIR": str(tmp_path / "none")},
    )  # fmt: skip
    assert result.exit_code == 0 and "warning" not in result.stderr
