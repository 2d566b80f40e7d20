"""`pgwarden serve`: run the gateway until interrupted."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import typer

from cli.context import fail, settings_of
from cli.targets import registry
from gateway.proxy.targets import TargetError
from gateway.runtime import Gateway
from gateway.settings import Settings

app = typer.Typer(help="Run the gateway.")
log = logging.getLogger("pgwarden.serve")


def run_until_signal(settings: Settings, *, banner: bool = True) -> None:
    """Start a gateway on uvloop (when installed) and stop it cleanly on SIGINT/SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        gateway = Gateway(settings, os.environ)
        host, port = await gateway.start()
        if banner:
            typer.echo(f"pgwarden listening on {host}:{port} (Ctrl-C stops it)", err=True)
        try:
            await stop.wait()
        finally:
            await gateway.stop()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def warn_unreadable_credentials(settings: Settings) -> None:
    """Log each registered target whose credential cannot be read here: its clients would be
    refused at connect, so the operator hears of it at start rather than from them."""
    for target in registry(settings).all():
        try:
            target.password(os.environ)
        except TargetError as exc:
            log.warning("%s: clients of this target will be refused until it is fixed", exc)


@app.command()
def serve(ctx: typer.Context) -> None:
    """Run the gateway with the settings from PGWARDEN_* and --config."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings_of(ctx)
    warn_unreadable_credentials(settings)
    try:
        run_until_signal(settings)
    except (OSError, ValueError, RuntimeError) as exc:
        fail(str(exc))
