"""`pgwarden serve`: run the gateway until a signal ends it (SIGTERM, SIGINT: drain;
SIGHUP: reload)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from cli.context import fail, settings_of
from cli.targets import registered
from gateway.audit import AuditStoreError
from gateway.control.store import ControlStoreUnavailable
from gateway.control.targets import TargetError
from gateway.logs import configure_logging, log_format
from gateway.policy.sidecar import SidecarError, opa_binary_of
from gateway.runtime import Gateway
from gateway.settings import Settings, load_settings

app = typer.Typer(help="Run the gateway.")
log = logging.getLogger("pgwarden.serve")


def describe_start(settings: Settings, config: Path | None) -> list[str]:
    """What this gateway runs on, said at start: a gateway started from another folder or
    by a service manager must show which state, settings and policy it took."""
    where = [
        f"state directory {settings.state_dir.resolve()}",
        f"config {config.resolve()}" if config else "config: none (defaults, PGWARDEN_* env)",
    ]
    p = settings.policy
    if p.opa_url:
        where.append(f"policy: the OPA at {p.opa_url}")
    else:
        where.append(f"policy {p.rego_dir.resolve()} with data {p.bundle_dir.resolve()}")
        where.append(f"OPA binary {opa_binary_of(settings)}")
    return where


def run_until_signal(
    settings: Settings, *, banner: bool = True, reread: Callable[[], Settings] | None = None
) -> None:
    """Run a gateway on uvloop (when installed). SIGTERM or SIGINT drains it (a second one
    cuts the drain short); SIGHUP reloads what can change without a restart, with the
    settings `reread` returns."""

    async def main() -> None:
        stop = asyncio.Event()
        hurry = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_stop() -> None:
            (hurry if stop.is_set() else stop).set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_stop)
        gateway = Gateway(settings, os.environ)
        reloads: set[asyncio.Task[list[str]]] = set()

        def on_hup() -> None:
            if stop.is_set():
                return  # draining: nothing to take up any more
            try:
                task = loop.create_task(gateway.reload(reread() if reread else gateway.settings))
            except (OSError, ValueError, ValidationError) as exc:
                task = loop.create_task(gateway.reload(None, _one_line(exc)))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        host, port = await gateway.start()
        if banner:
            typer.echo(f"pgwarden listening on {host}:{port} (Ctrl-C stops it)", err=True)
        drained = False
        try:
            await stop.wait()
            log.info(
                "draining: new connections refused, running statements get up to %.1f s",
                gateway.settings.shutdown.drain_seconds,
                extra={"event": "draining"},
            )
            await gateway.drain(hurry)
            drained = True
        finally:
            if not drained:
                await gateway.stop()
        log.info("pgwarden stopped", extra={"event": "stopped"})

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def warn_unreadable_credentials(settings: Settings) -> None:
    """Log each registered target whose credential cannot be read here: its clients would be
    refused at connect, so the operator hears of it at start rather than from them."""
    for target in registered(settings):
        try:
            target.password(os.environ)
        except TargetError as exc:
            log.warning("%s: clients of this target will be refused until it is fixed", exc)


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
    settings = settings_of(ctx)
    configure_logging(settings.log)
    # JSON logs are for machines: every stderr line is then one JSON object (no banner,
    # and what the gateway starts on is logged rather than printed).
    human = log_format(settings.log) == "human"
    config: Path | None = ctx.find_root().params.get("config")
    if accept_audit_gap:
        audit = settings.audit.model_copy(update={"accept_chain_gap": True})
        settings = settings.model_copy(update={"audit": audit})
    warn_unreadable_credentials(settings)
    try:
        for line in describe_start(settings, config):
            if human:
                typer.echo(f"pgwarden: {line}", err=True)
            else:
                log.info("%s", line, extra={"event": "starting"})
        run_until_signal(settings, banner=human, reread=lambda: load_settings(config))
    except (
        OSError,
        ValueError,
        RuntimeError,
        SidecarError,
        AuditStoreError,
        ControlStoreUnavailable,
        TargetError,
    ) as exc:
        fail(str(exc))
