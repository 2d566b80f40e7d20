"""The `pgwarden` command: one typer app per command group, joined here behind one error
boundary that turns every known bad input into one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import sqlite3
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from cli import approvals, audit, demo, login, policy, serve, sessions, targets, tokens
from gateway.audit import AuditStoreError
from gateway.control.targets import TargetError
from gateway.identity.signing_key import SigningKeyError
from gateway.policy.bundle import BundleError
from gateway.policy.sidecar import SidecarError
from gateway.proxy.ports import AuditUnavailable
from gateway.proxy.upstream import UpstreamError
from gateway.settings import load_settings

# Exit status of a bug (BSD sysexits' EX_SOFTWARE), apart from bad input's 1 and usage's 2.
EXIT_BUG = 70
DEBUG_ENV = "PGWARDEN_DEBUG"

# Errors whose message already says, in one line, what was wrong with the input or the
# environment: shown as they are.
_KNOWN: tuple[type[BaseException], ...] = (
    TargetError,
    AuditStoreError,
    AuditUnavailable,
    SidecarError,
    BundleError,
    SigningKeyError,
    UpstreamError,
    OSError,
)


class ConfigError(Exception):
    """The settings file cannot be read."""


def describe_settings_error(exc: ValidationError) -> str:
    """Every invalid setting with where it may come from, on one line."""
    parts = []
    for error in exc.errors():
        name = ".".join(str(p) for p in error["loc"])
        env = "PGWARDEN_" + "__".join(str(p).upper() for p in error["loc"])
        given = error.get("input")
        shown = "" if isinstance(given, dict) or error["type"] == "missing" else f" = {given!r}"
        parts.append(f"{name}{shown}: {error['msg']} (from {env} or the config file)")
    return "invalid setting " + "; ".join(parts)


def one_line(exc: BaseException) -> str | None:
    """The one line that explains a known error, or None when it is a bug."""
    if isinstance(exc, ValidationError):
        return describe_settings_error(exc)
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, sqlite3.DatabaseError):
        return f"the audit store cannot be read: {exc}"
    if isinstance(exc, _KNOWN):
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


class ErrorBoundary(TyperGroup):
    """Runs the command and maps what escapes it: one line for a known error, a hint to rerun
    with --debug for anything else, the traceback itself with --debug."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            _usage_error(exc)
        except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt):
            raise
        except Exception as exc:
            if ctx.params.get("debug") or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            message = one_line(exc)
            if message is not None:
                typer.echo(f"pgwarden: {message}", err=True)
                raise typer.Exit(1) from None
            detail = " ".join(str(exc).split())[:200]
            typer.echo(
                f"pgwarden: unexpected error {type(exc).__name__}"
                f"{': ' + detail if detail else ''}"
                f" (rerun with --debug or {DEBUG_ENV}=1 for the traceback)",
                err=True,
            )
            raise typer.Exit(EXIT_BUG) from None


def _usage_error(exc: UsageError) -> NoReturn:
    """A usage error as one line that says where the help is; a group or command given no
    arguments still shows its help."""
    if isinstance(exc, NoArgsIsHelpError):
        raise exc
    where = exc.ctx.command_path if exc.ctx is not None else "pgwarden"
    message = " ".join(exc.format_message().split())
    typer.echo(f"pgwarden: {message} (see {where} --help)", err=True)
    raise typer.Exit(exc.exit_code)


app = typer.Typer(
    name="pgwarden",
    help="Policy-as-code gateway for PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=ErrorBoundary,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"pgwarden {version('pgwarden')}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", envvar="PGWARDEN_CONFIG", help="TOML settings file."),
    ] = None,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", help=f"Show the traceback of an unexpected error ({DEBUG_ENV}=1)."),
    ] = False,
) -> None:
    """Settings come from PGWARDEN_* environment variables and an optional TOML file."""
    if config is not None and not config.is_file():
        raise ConfigError(f"config file {config} not found")
    try:
        ctx.obj = load_settings(config)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config} is not valid TOML: {exc}") from None


app.command("serve")(serve.serve)
app.command("demo")(demo.demo)
app.command("login")(login.login)
app.command("logout")(login.logout)
app.add_typer(targets.app, name="targets")
app.add_typer(tokens.app, name="tokens")
app.add_typer(policy.app, name="policy")
app.add_typer(audit.app, name="audit")
app.add_typer(approvals.app, name="approvals")
app.add_typer(sessions.app, name="sessions")
