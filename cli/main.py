"""The `pgwarden` command: one typer app per command group, joined here."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated

import typer

from gateway.settings import load_settings

app = typer.Typer(
    name="pgwarden",
    help="Policy-as-code gateway for PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Command groups, each a module of this package with its own `app`.
_GROUPS = ("serve", "targets", "tokens", "policy", "audit", "demo")


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", envvar="PGWARDEN_CONFIG", help="TOML settings file."),
    ] = None,
) -> None:
    """Settings come from PGWARDEN_* environment variables and an optional TOML file."""
    ctx.obj = load_settings(config)


for _name in _GROUPS:
    try:
        _module = importlib.import_module(f"cli.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"cli.{_name}":
            raise
        continue
    _group = _module.app
    if _group.registered_commands and len(_group.registered_commands) == 1 and not _group.registered_groups and _name in ("serve", "demo"):
        app.command(_name)(_group.registered_commands[0].callback)  # type: ignore[arg-type]
    else:
        app.add_typer(_group, name=_name)
