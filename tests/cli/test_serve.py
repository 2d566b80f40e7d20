"""`pgwarden serve` and the root command: where the gateway finds its policy and OPA
whatever folder it starts from, --config, --version. (The running gateway's signals are in
tests/integration/test_serve_signals.py.)"""

from __future__ import annotations

import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from cli.serve import describe_start
from gateway.install import SOURCE_ROOT, tool_candidates
from gateway.policy.sidecar import SidecarError, opa_binary_of
from gateway.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"pgwarden {version('pgwarden')}"


@pytest.mark.parametrize("command", [["serve"], ["targets", "list"], ["audit", "verify"]])
def test_missing_config_file_is_one_error_line(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "missing.toml"
    state = tmp_path / "state"
    result = CliRunner().invoke(
        app, ["--config", str(missing), *command], env={"PGWARDEN_STATE_DIR": str(state)}
    )
    assert result.exit_code != 0
    assert result.stderr == f"pgwarden: config file {missing} not found\n"
    assert not state.exists(), "a command ran on defaults without its config file"


def test_policy_folders_do_not_depend_on_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(state_dir=tmp_path / "state")
    assert settings.policy.rego_dir == SOURCE_ROOT / "rego" == ROOT / "rego"
    assert settings.policy.bundle_dir == ROOT / "bundles"
    config = tmp_path / "pgwarden.toml"
    lines = describe_start(settings.model_copy(update={"policy": settings.policy.model_copy(
        update={"opa_url": "http://127.0.0.1:8181"})}), config)  # fmt: skip
    assert lines == [
        f"state directory {tmp_path / 'state'}",
        f"config {config}",
        "policy: the OPA at http://127.0.0.1:8181",
    ]


def test_opa_is_found_by_setting_path_or_next_to_the_installation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opa_binary: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    configured = tmp_path / "my-opa"
    shutil.copy(opa_binary, configured)
    settings = load_settings(state_dir=state, policy={"opa_binary": configured})
    assert opa_binary_of(settings) == configured
    # A configured binary that is not there is an error, not a quiet fallback.
    settings = load_settings(state_dir=state, policy={"opa_binary": tmp_path / "nope"})
    with pytest.raises(SidecarError, match="does not exist"):
        opa_binary_of(settings)
    # Not configured: PATH ...
    on_path = tmp_path / "bin"
    on_path.mkdir()
    shutil.copy(opa_binary, on_path / "opa")
    monkeypatch.setenv("PATH", str(on_path))
    assert opa_binary_of(load_settings(state_dir=state)) == on_path / "opa"
    # ... else next to the installation (the project's .pgwarden/bin, the venv's bin).
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    installed = [p for p in tool_candidates("opa") if p.is_file()]
    if installed:
        assert opa_binary_of(load_settings(state_dir=state)) == installed[0].resolve()
    else:
        with pytest.raises(SidecarError, match="OPA binary not found"):
            opa_binary_of(load_settings(state_dir=state))
