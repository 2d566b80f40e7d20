"""The `pgwarden` command: one typer app per command group, joined here."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import typer

from cli import audit, demo, policy, serve, targets, tokens
from cli.context import fail
from gateway.settings import load_settings

app = typer.Typer(
    name="pgwarden",
    help="Policy-as-code gateway for PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
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
) -> None:
    """Settings come from PGWARDEN_* environment variables and an optional TOML file."""
    if config is not None and not config.is_file():
        # pydantic-settings would quietly run on defaults without it.
        fail(f"config file {config} not found")
    ctx.obj = load_settings(config)


app.command("serve")(serve.serve)
app.command("demo")(demo.demo)
app.add_typer(targets.app, name="targets")
app.add_typer(tokens.app, name="tokens")
app.add_typer(policy.app, name="policy")
app.add_typer(audit.app, name="audit")
