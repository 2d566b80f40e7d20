"""`pgwarden serve`: run the gateway until interrupted."""

from __future__ import annotations

import asyncio
import os
import signal

import typer

from cli.context import fail, settings_of
from gateway.logs import configure_logging, log_format
from gateway.runtime import Gateway
from gateway.settings import Settings

app = typer.Typer(help="Run the gateway.")


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


@app.command()
def serve(ctx: typer.Context) -> None:
    """Run the gateway with the settings from PGWARDEN_* and --config."""
    settings = settings_of(ctx)
    configure_logging(settings.log)
    try:
        # JSON logs are for machines: every stderr line is then one JSON object.
        run_until_signal(settings, banner=log_format(settings.log) == "human")
    except (OSError, ValueError, RuntimeError) as exc:
        fail(str(exc))
