"""`pgwarden policy` test/build/eval against the project's reference policy and the real OPA."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from typer.testing import CliRunner

from cli.main import app
from gateway.control.targets import Target
from tests.harness import RunningGateway, StoredTargets

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.server


def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["policy", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def env(opa_binary: Path, tmp_path: Path) -> dict[str, str]:
    rego_dir, bundle_dir = tmp_path / "rego", tmp_path / "bundles"
    shutil.copytree(ROOT / "rego", rego_dir)
    shutil.copytree(ROOT / "bundles", bundle_dir, ignore=shutil.ignore_patterns("*.tar.gz"))
    return {
        "PGWARDEN_STATE_DIR": str(tmp_path / "state"),
        "PGWARDEN_POLICY__OPA_BINARY": str(opa_binary),
        "PGWARDEN_POLICY__REGO_DIR": str(rego_dir),
        "PGWARDEN_POLICY__BUNDLE_DIR": str(bundle_dir),
    }


def manifest_revision(env: dict[str, str]) -> str:
    manifest = Path(env["PGWARDEN_POLICY__BUNDLE_DIR"]) / "pgwarden" / ".manifest"
    return str(orjson.loads(manifest.read_bytes())["revision"])


def eval_documents(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    code, out, err = run(env, "eval", *args)
    assert code == 0, err
    decoder_input = "[" + out.strip().replace("}\n{", "},\n{") + "]"
    documents: list[dict[str, Any]] = orjson.loads(decoder_input)
    return documents


def test_eval_prints_input_and_approve_for_an_agent_write(env: dict[str, str]) -> None:
    args = ("--subject", "agent:ci", "--group", "ai-agents", "--target", "app")
    [document] = eval_documents(env, *args, "DELETE FROM public.orders WHERE id = 1")
    policy_input = document["input"]
    decision = document["decision"]
    assert isinstance(policy_input, dict) and isinstance(decision, dict)
    assert policy_input["version"] == 1
    assert policy_input["principal"]["groups"] == ["ai-agents"]
    assert policy_input["target"] == {
        "name": "app",
        "database": "app",
        "default_database": "app",
        "databases": [],
        "labels": {},
    }
    assert policy_input["statement"]["command"] == "DELETE"
    assert decision["action"] == "approve"
    assert set(decision["approvers"]) == {"engineers", "admins"}
    assert decision["approvers_required"] == 1
    assert str(decision["bundle_revision"]).startswith(f"{manifest_revision(env)}+")


def test_eval_gives_one_decision_per_statement(env: dict[str, str]) -> None:
    args = ("--subject", "bob", "--group", "admins", "--target", "app")
    documents = eval_documents(env, *args, "SELECT 1; DROP TABLE public.t")
    assert [d["decision"]["action"] for d in documents] == ["allow", "allow"]
    assert [d["input"]["statement"]["index"] for d in documents] == [0, 1]


def test_eval_denies_a_principal_in_no_group(env: dict[str, str]) -> None:
    [document] = eval_documents(env, "--subject", "nobody", "--target", "app", "SELECT 1")
    assert document["decision"]["action"] == "deny"


def test_eval_with_a_broken_policy_is_one_line_and_non_zero(env: dict[str, str]) -> None:
    (Path(env["PGWARDEN_POLICY__REGO_DIR"]) / "pgwarden" / "broken.rego").write_text(
        "package pgwarden\n\nx := {\n"
    )
    code, _, err = run(env, "eval", "--subject", "a", "--target", "app", "SELECT 1")
    assert code != 0
    assert err.startswith("pgwarden: policy does not build:")
    assert err.count("\n") == 1


def test_test_passes_and_prints_coverage(env: dict[str, str]) -> None:
    code, out, err = run(env, "test")
    assert code == 0, err
    assert "PASS" in out
    assert "coverage: " in out


def test_test_fails_on_a_failing_policy_test(env: dict[str, str]) -> None:
    (Path(env["PGWARDEN_POLICY__REGO_DIR"]) / "pgwarden" / "zz_failing_test.rego").write_text(
        "package pgwarden_failing_test\n\ntest_never if false\n"
    )
    code, out, err = run(env, "test")
    assert code != 0
    assert "test_never" in out
    assert "pgwarden: policy tests failed" in err


def test_build_writes_the_bundle_with_the_manifest_revision(env: dict[str, str]) -> None:
    code, out, err = run(env, "build")
    assert code == 0, err
    bundle = Path(env["PGWARDEN_POLICY__BUNDLE_DIR"]) / "pgwarden.tar.gz"
    revision = manifest_revision(env)
    assert f"built {bundle} (revision {revision})" in out
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        manifest = tar.extractfile("/.manifest")
        assert manifest is not None
        assert orjson.loads(manifest.read())["revision"] == revision
    assert "/pgwarden/decision.rego" in names
    assert not any(n.endswith("_test.rego") for n in names)


def test_eval_of_another_database_of_the_target(env: dict[str, str]) -> None:
    """`--target TARGET/DATABASE` decides as a session in that database would be decided."""
    args = ("--subject", "agent:ci", "--group", "ai-agents", "--target", "app/reports")
    [document] = eval_documents(env, *args, "SELECT 1")
    policy_input, decision = document["input"], document["decision"]
    assert isinstance(policy_input, dict) and isinstance(decision, dict)
    assert policy_input["target"]["database"] == "reports"
    assert policy_input["target"]["default_database"] == "app"
    assert decision["action"] == "deny"
    assert "target app does not serve database reports" in " ".join(decision["reasons"])


@pytest.fixture
def live(env: dict[str, str], gateway: RunningGateway) -> dict[str, str]:
    """`env` with the running gateway's targets (and the credential they reference)."""
    return {
        **env,
        "PGWARDEN_STATE_DIR": str(gateway.settings.state_dir),
        "PGWARDEN_TEST_UPSTREAM_PW": gateway.environ["PGWARDEN_TEST_UPSTREAM_PW"],
    }


AGENT = ("--subject", "agent:eval", "--group", "ai-agents", "--target", "app")


def test_eval_resolves_names_and_star_against_the_target(live: dict[str, str]) -> None:
    [document] = eval_documents(live, *AGENT, "SELECT * FROM customers")
    statement = document["input"]["statement"]
    assert statement["reads"] == [{"schema": "public", "table": "customers"}]
    assert {"schema": "public", "table": "customers", "column": "email", "usage": "output"} in (
        statement["columns"]
    )
    assert document["decision"]["action"] == "allow"
    # The masks the gateway would apply, by output column.
    applied = document["masks_applied"]
    assert isinstance(applied, list)
    email = [a for a in applied if a["from"] == ["public.customers.email"]]
    assert email and email[0]["method"] == "email" and "its column's mask" in email[0]["how"]
    assert document["unresolved"] == []

    # Engineers may compute on a classified column (ai-agents may not: an oracle); what an
    # expression of it returns is masked whole.
    engineer = ("--subject", "eng:eval", "--group", "engineers", "--target", "app")
    [document] = eval_documents(live, *engineer, "SELECT upper(email) FROM customers")
    [applied] = document["masks_applied"]
    assert applied["output"] == 1 and applied["from"] == ["public.customers.email"]
    assert "the whole value (redact) where it is an expression" in applied["how"]
    # Nothing masked flows into count(email): passed through, as live.
    [document] = eval_documents(live, *engineer, "SELECT count(email) FROM customers")
    assert document["masks_applied"] == []


def test_eval_gives_the_decision_the_gateway_gives(
    live: dict[str, str], gateway: RunningGateway
) -> None:
    # Unqualified, a classified column in a predicate: an oracle, denied live. Without the
    # catalog the column could not be placed in public.customers and the eval said allow.
    text = "SELECT id FROM customers WHERE email = 'ada@example.com'"
    [document] = eval_documents(live, *AGENT, text)
    token = gateway.token("agent:eval", groups=("ai-agents",))
    with (
        psycopg.connect(gateway.dsn(token), autocommit=True) as conn,
        pytest.raises(psycopg.Error) as info,
    ):
        conn.execute(text)
    live_message = info.value.diag.message_primary or ""
    decision = document["decision"]
    assert isinstance(decision, dict)
    assert decision["action"] == "deny" and live_message.startswith("pgwarden: statement denied")
    assert decision["reasons"][0] in live_message


def test_eval_says_what_it_could_not_resolve(live: dict[str, str], gateway: RunningGateway) -> None:
    [document] = eval_documents(live, *AGENT, "SELECT * FROM no_such_table")
    unresolved = document["unresolved"]
    assert isinstance(unresolved, list) and any(
        "not in the target's catalog" in u for u in unresolved
    )
    # A target pgwarden cannot log in to: decided all the same, and said so.
    registry = StoredTargets(gateway.settings)
    if registry.get("eval_nocred") is None:
        registry.add(
            Target(name="eval_nocred", host="127.0.0.1", port=gateway.cluster.port,
                   dbname="postgres", user="postgres", password_env="PGWARDEN_EVAL_UNSET",
                   sslmode="disable")
        )  # fmt: skip
    args = ("--subject", "agent:eval", "--group", "ai-agents", "--target", "eval_nocred")
    [document] = eval_documents(live, *args, "SELECT * FROM customers")
    unresolved = document["unresolved"]
    assert isinstance(unresolved, list)
    assert any("could not log in to target eval_nocred" in u for u in unresolved), unresolved
    assert "PGWARDEN_TEST_UPSTREAM_PW" not in str(document)
