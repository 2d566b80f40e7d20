"""How CLI commands get the one Settings value and report errors as one clear line."""

from __future__ import annotations

from typing import NoReturn

import typer

from gateway.settings import Settings, load_settings


def settings_of(ctx: typer.Context) -> Settings:
    """The Settings built once by the root callback (or from the environment alone)."""
    root = ctx.find_root()
    if not isinstance(root.obj, Settings):
        root.obj = load_settings()
    return root.obj


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line on stderr and exit non-zero."""
    typer.echo(f"pgwarden: {message}", err=True)
    raise typer.Exit(code)
