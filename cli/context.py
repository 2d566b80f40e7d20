"""How CLI commands get the one Settings value and report errors as one clear line."""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

from gateway.settings import Settings, load_settings

if TYPE_CHECKING:
    from gateway.control.client import ControlClient


def settings_of(ctx: typer.Context) -> Settings:
    """The Settings built once by the root callback (or from the environment alone)."""
    root = ctx.find_root()
    if not isinstance(root.obj, Settings):
        root.obj = load_settings()
    return root.obj


def literal_console(width: int | None = 200) -> Console:
    """A console that prints text as it is: record ids, statements and names come from users
    and the trail, and rich would otherwise read `:100:` as an emoji code and `[b]` as
    markup. Colour goes through styled Text, never through markup in the data."""
    return Console(width=width, emoji=False, markup=False, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line on stderr and exit non-zero."""
    typer.echo(f"pgwarden: {message}", err=True)
    raise typer.Exit(code)


def control_client(settings: Settings) -> ControlClient:
    """The control store the settings select (targets, token registry), or one clear line
    and exit 1 when it cannot be opened: unreachable, or an old file that does not import."""
    from gateway.control.client import ControlClient
    from gateway.control.store import ControlStoreUnavailable
    from gateway.control.targets import TargetError

    try:
        return ControlClient(settings)
    except (ControlStoreUnavailable, TargetError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"the control store cannot be opened: {exc}")
