"""Every command given bad input answers with one clear line on stderr and a non-zero exit,
never a traceback: through typer's runner, and through the real `pgwarden` entry point."""

# The table of cases reads one case per line.
# ruff: noqa: E501

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli.targets
from cli.main import EXIT_BUG, app

PGWARDEN = Path(sys.executable).parent / "pgwarden"


@dataclass(frozen=True)
class BadInput:
    name: str
    args: tuple[str, ...]
    # What the one line must say, so that it is the right line and not just any.
    says: str
    env: dict[str, str] = field(default_factory=dict)
    # Prepares the state directory (a damaged file, ...).
    setup: Callable[[Path], None] = lambda state: None


def _write(name: str, content: str) -> Callable[[Path], None]:
    def setup(state: Path) -> None:
        (state / name).write_text(content)

    return setup


_CORRUPT_TARGETS = _write("targets.json", '{"targets": [')
_TARGETS_NOT_A_LIST = _write("targets.json", '{"targets": {"app": 1}}')
_TARGET_PORT_TEXT = _write(
    "targets.json",
    '{"targets": [{"name": "a", "host": "h", "port": "5432", "dbname": "d", "user": "u"}]}',
)
_TARGET_UNKNOWN_KEY = _write(
    "targets.json",
    '{"targets": [{"name": "a", "host": "h", "port": 1, "dbname": "d", "user": "u", "x": 1}]}',
)
_NOT_A_DATABASE = _write("audit.sqlite3", "this is not a database\n" * 100)
_BAD_TOML = _write("bad.toml", "[listener\nport = 1\n")
_WRONG_TOML = _write("wrong.toml", '[listener]\nport = "high"\n')
_UNKNOWN_TOML = _write("unknown.toml", "colour = 'blue'\n")
# A gateway that did start would listen on a free port, not on one another test uses.
_ANY_PORT = {"PGWARDEN_LISTENER__PORT": "0"}
_NO_OPA = {
    "PGWARDEN_POLICY__OPA_BINARY": "/nonexistent/opa",
    "PATH": "/nonexistent",
    **_ANY_PORT,
}

CASES = [
    BadInput("corrupt targets file: list", ("targets", "list"), "not valid JSON", setup=_CORRUPT_TARGETS),
    BadInput("corrupt targets file: add", ("targets", "add", "x"), "not valid JSON", setup=_CORRUPT_TARGETS),
    BadInput("corrupt targets file: remove", ("targets", "remove", "x"), "not valid JSON", setup=_CORRUPT_TARGETS),
    BadInput("corrupt targets file: serve", ("serve",), "not valid JSON", env=_ANY_PORT, setup=_CORRUPT_TARGETS),
    BadInput("targets file of the wrong shape", ("targets", "list"), '{"targets": [...]}', setup=_TARGETS_NOT_A_LIST),
    BadInput("target with a port as text", ("targets", "list"), "port must be a number", setup=_TARGET_PORT_TEXT),
    BadInput("target with an unknown key", ("targets", "list"), "unexpected keyword", setup=_TARGET_UNKNOWN_KEY),
    BadInput("audit verify on a file that is not a database", ("audit", "verify"), "not a database", setup=_NOT_A_DATABASE),
    BadInput("audit tail on a file that is not a database", ("audit", "tail"), "not a database", setup=_NOT_A_DATABASE),
    BadInput("serve without the OPA binary", ("serve",), "OPA binary not found", env=_NO_OPA),
    BadInput("policy test without the OPA binary", ("policy", "test"), "OPA binary not found", env=_NO_OPA),
    BadInput("invalid setting from the environment", ("tokens", "list"), "PGWARDEN_AUDIT__RETENTION_DAYS", env={"PGWARDEN_AUDIT__RETENTION_DAYS": "soon"}),
    BadInput("invalid nested setting from the environment", ("targets", "list"), "listener.port", env={"PGWARDEN_LISTENER": '{"port": "x"}'}),
    BadInput("malformed TOML", ("--config", "{state}/bad.toml", "targets", "list"), "not valid TOML", setup=_BAD_TOML),
    BadInput("invalid setting in TOML", ("--config", "{state}/wrong.toml", "targets", "list"), "listener.port", setup=_WRONG_TOML),
    BadInput("unknown setting in TOML", ("--config", "{state}/unknown.toml", "tokens", "list"), "colour", setup=_UNKNOWN_TOML),
    BadInput("missing config file", ("--config", "{state}/none.toml", "targets", "list"), "not found"),
    BadInput("target password variable unset", ("targets", "add", "x", "--password-env", "PGWARDEN_TEST_UNSET_PW"), "PGWARDEN_TEST_UNSET_PW is not set"),
    BadInput("target password file missing", ("targets", "add", "x", "--password-file", "{state}/none.pw"), "cannot read password file"),
    BadInput("target password variable not a name", ("targets", "add", "x", "--password-env", "A B"), "not an environment variable name"),
    BadInput("target port out of range", ("targets", "add", "x", "--port", "70000"), "not in 1..65535"),
    BadInput("target port zero", ("targets", "add", "x", "--port", "0"), "not in 1..65535"),
    BadInput("target host empty", ("targets", "add", "x", "--host", ""), "host must be"),
    BadInput("target host with a space", ("targets", "add", "x", "--host", "db internal"), "invalid host"),
    BadInput("target sslmode unknown", ("targets", "add", "x", "--sslmode", "sometimes"), "sslmode must be"),
    BadInput("target CA file missing", ("targets", "add", "x", "--sslmode", "verify-full", "--sslrootcert", "{state}/none.pem"), "cannot read --sslrootcert"),
    BadInput("target name invalid", ("targets", "add", "a/b"), "invalid target name"),
    BadInput("target label not k=v", ("targets", "add", "x", "--label", "env"), "label must be k=v"),
    BadInput("remove unknown target", ("targets", "remove", "nobody"), "no target named"),
    BadInput("test unknown target", ("targets", "test", "nobody"), "no target named"),
    BadInput("token ttl bad", ("tokens", "issue", "--subject", "s", "--ttl", "soon"), "bad --ttl"),
    BadInput("revoke unknown token", ("tokens", "revoke", "nope"), "no token with id"),
    BadInput("audit show bad id", ("audit", "show", "42"), "bad record id"),
    BadInput("audit search bad time", ("audit", "search", "--since", "yesterday-ish"), "bad time"),
    BadInput("audit prune bad age", ("audit", "prune", "--older-than", "ninety"), "bad age"),
    BadInput("audit export unknown format", ("audit", "export", "--format", "csv"), "only jsonl"),
    BadInput("audit prune in minutes", ("audit", "prune", "--older-than", "30m"), "use days or hours"),
    BadInput("audit prune below the floor", ("audit", "prune", "--older-than", "1d"), "retention_floor_days"),
    BadInput("audit search unknown action", ("audit", "search", "--action", "denied"), "bad --action"),
    BadInput("audit tail negative count", ("audit", "tail", "-n", "-1"), "greater than or equal to 0"),
    BadInput("unknown option", ("targets", "list", "--colour"), "No such option"),
    BadInput("unknown command", ("targets", "rename"), "No such command"),
    BadInput("missing option", ("tokens", "issue"), "Missing option '--subject'"),
    BadInput("option of the wrong type", ("targets", "add", "x", "--port", "high"), "--port"),
    BadInput("policy eval bad target", ("policy", "eval", "SELECT 1", "--subject", "s", "--target", "app/"), "names no database"),
    BadInput("sessions with the admin listener off", ("sessions", "list"), "admin listener is off", env={"PGWARDEN_ADMIN__PORT": "0"}),
    BadInput("sessions with no admin listener there", ("sessions", "list", "--admin-url", "http://127.0.0.1:1"), "cannot reach the admin listener"),
    BadInput("sessions kill naming nothing", ("sessions", "kill"), "name a session ID or --subject"),
    BadInput("sessions kill naming both", ("sessions", "kill", "x", "--subject", "s"), "name a session ID or --subject"),
]  # fmt: skip


def _prepared(case: BadInput, state: Path) -> tuple[list[str], dict[str, str]]:
    case.setup(state)
    args = [a.replace("{state}", str(state)) for a in case.args]
    env = {"PGWARDEN_STATE_DIR": str(state), **case.env}
    return args, env


def _assert_one_clear_line(case: BadInput, code: int, out: str, err: str) -> None:
    assert code not in (0, EXIT_BUG), (code, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pgwarden: ") and case.says in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line(case: BadInput, tmp_path: Path) -> None:
    args, env = _prepared(case, tmp_path)
    result = CliRunner().invoke(app, args, env=env)
    # Anything but SystemExit here is an exception that escaped the command.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    _assert_one_clear_line(case, result.exit_code, result.stdout, result.stderr)


# Through the installed console script: what a user's shell really shows.
_BY_ENTRY_POINT = {
    "corrupt targets file: list",
    "targets file of the wrong shape",
    "audit verify on a file that is not a database",
    "serve without the OPA binary",
    "invalid setting from the environment",
    "malformed TOML",
    "target password variable unset",
    "target port out of range",
}


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in _BY_ENTRY_POINT], ids=lambda c: c.name
)
def test_bad_input_through_the_entry_point(case: BadInput, tmp_path: Path) -> None:
    args, env = _prepared(case, tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
    run = subprocess.run(
        [str(PGWARDEN), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    _assert_one_clear_line(case, run.returncode, run.stdout, run.stderr)


def test_a_bug_says_how_to_see_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise KeyError("no such thing")

    monkeypatch.setattr(cli.targets, "registered", broken)
    env = {"PGWARDEN_STATE_DIR": str(tmp_path)}
    result = CliRunner().invoke(app, ["targets", "list"], env=env)
    assert result.exit_code == EXIT_BUG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stdout + result.stderr
    assert "unexpected error KeyError" in lines[0] and "--debug" in lines[0]

    # Asked for, the traceback is there: the exception escapes to the runner.
    for args, debug_env in (
        (["--debug", "targets", "list"], {}),
        (["targets", "list"], {"PGWARDEN_DEBUG": "1"}),
    ):
        result = CliRunner().invoke(app, args, env={**env, **debug_env})
        assert isinstance(result.exception, KeyError), repr(result.exception)


def test_a_group_given_no_command_still_shows_its_help(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["targets"], env={"PGWARDEN_STATE_DIR": str(tmp_path)})
    shown = result.stdout + result.stderr
    assert "Usage" in shown and "install-ddl-watch" in shown and "Traceback" not in shown
