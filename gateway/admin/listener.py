"""Serves the admin app with uvicorn on the gateway's own event loop, as one more task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI

from gateway.admin.app import is_loopback
from gateway.settings import AdminSettings

log = logging.getLogger("pgwarden.admin")


class AdminConfigError(ValueError):
    """The admin settings are unsafe or unusable; the message says which and why."""


def check_admin_settings(settings: AdminSettings) -> None:
    """Off loopback the listener serves only over TLS with token auth."""
    if is_loopback(settings.host):
        return
    missing = []
    if settings.tls_cert is None or settings.tls_key is None:
        missing.append("admin.tls_cert and admin.tls_key")
    if not settings.token_groups:
        missing.append("admin.token_groups")
    if missing:
        raise AdminConfigError(
            f"admin listener on non-loopback address {settings.host} needs "
            + " and ".join(missing)
            + " (or admin.port = 0 to disable it)"
        )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the gateway's process: the gateway owns the signals (SIGTERM drains,
    SIGHUP reloads), so uvicorn installs no handlers of its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class AdminListener:
    """`await start()` returns the bound address; `await stop()` ends the server task."""

    def __init__(self, app: FastAPI, settings: AdminSettings) -> None:
        check_admin_settings(settings)
        self.settings = settings
        self.app = app
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None

    def _bind(self) -> socket.socket:
        s = self.settings
        try:
            infos = socket.getaddrinfo(s.host, s.port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            # uvicorn would exit the process on a bind failure; the gateway says why instead.
            raise OSError(
                exc.errno,
                f"admin listener cannot listen on {s.host}:{s.port} ({exc.strerror});"
                " choose another admin.port, or 0 to disable it",
            ) from exc
        return sock

    async def start(self) -> tuple[str, int]:
        s = self.settings
        sock = self._bind()
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            ssl_certfile=str(s.tls_cert) if s.tls_cert else None,
            ssl_keyfile=str(s.tls_key) if s.tls_key else None,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="admin-listener")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError("admin listener stopped while starting")
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()[:2]
        self.address = (str(host), int(port))
        log.info(
            "admin listener on %s:%d",
            *self.address,
            extra={"event": "admin_listening", "tls": s.tls_cert is not None},
        )
        return self.address

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = self._task = None
