"""`pgwarden serve`: run the gateway until interrupted."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Annotated

import typer

from cli.context import fail, settings_of
from gateway.audit import AuditStoreError
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
def serve(
    ctx: typer.Context,
    accept_audit_gap: Annotated[
        bool,
        typer.Option(
            "--accept-audit-gap",
            help="Start even though the audit store is behind its head witness (records were "
            "lost): the chain goes on after a chain_gap record naming the lost range, which "
            "`audit verify` keeps reporting.",
        ),
    ] = False,
) -> None:
    """Run the gateway with the settings from PGWARDEN_* and --config."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings_of(ctx)
    if accept_audit_gap:
        audit = settings.audit.model_copy(update={"accept_chain_gap": True})
        settings = settings.model_copy(update={"audit": audit})
    try:
        run_until_signal(settings)
    except (OSError, ValueError, RuntimeError, AuditStoreError) as exc:
        fail(str(exc))
