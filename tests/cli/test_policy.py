"""`pgwarden policy` test/build/eval against the project's reference policy and the real OPA."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from cli.main import app

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


def eval_documents(env: dict[str, str], *args: str) -> list[dict[str, object]]:
    code, out, err = run(env, "eval", *args)
    assert code == 0, err
    decoder_input = "[" + out.strip().replace("}\n{", "},\n{") + "]"
    documents: list[dict[str, object]] = orjson.loads(decoder_input)
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
    assert str(decision["bundle_revision"]).startswith(f"{manifest_revision(env)}+")


def test_eval_gives_one_decision_per_statement(env: dict[str, str]) -> None:
    args = ("--subject", "bob", "--group", "admins", "--target", "app")
    documents = eval_documents(env, *args, "SELECT 1; DROP TABLE public.t")
    assert [d["decision"]["action"] for d in documents] == ["allow", "allow"]  # type: ignore[index]
    assert [d["input"]["statement"]["index"] for d in documents] == [0, 1]  # type: ignore[index]


def test_eval_denies_a_principal_in_no_group(env: dict[str, str]) -> None:
    [document] = eval_documents(env, "--subject", "nobody", "--target", "app", "SELECT 1")
    assert document["decision"]["action"] == "deny"  # type: ignore[index]


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
