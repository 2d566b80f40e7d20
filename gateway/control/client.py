"""The control store from synchronous code (the CLI, the token issuer, tests): the store the
settings select, driven on an event loop of its own in a thread of its own, so that the
caller may be any thread, one running an event loop of its own included (it then waits)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from gateway.control.legacy import import_legacy_files
from gateway.control.store import ControlStore, control_store
from gateway.control.targets import Target
from gateway.identity.registry import TokenRecord
from gateway.settings import Settings

T = TypeVar("T")


async def open_control_store(settings: Settings, *, listen: bool = True) -> ControlStore:
    """The started store, the state directory's old files imported into it once."""
    store = control_store(settings, listen=listen)
    await store.start()
    try:
        await import_legacy_files(store, settings.state_dir)
    except BaseException:
        await store.close()
        raise
    return store


class ControlClient:
    """Targets and the token registry for a command that reads or writes them and ends;
    never used on a running gateway's event loop."""

    def __init__(self, settings: Settings) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pgwarden-control-client", daemon=True
        )
        self._thread.start()
        try:
            self.store = self._run(open_control_store(settings, listen=False))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        try:
            self._run(self.store.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- tokens ----------------------------------------------------------------------------

    def record_token(self, token: TokenRecord) -> None:
        self._run(self.store.record_token(token))

    def revoke_token(self, jti: str, *, at: float | None = None) -> TokenRecord:
        """The token's record after revoking it; UnknownToken if it was never issued."""
        return self._run(self.store.revoke_token(jti, time.time() if at is None else at))

    def token(self, jti: str) -> TokenRecord | None:
        return self._run(self.store.token(jti))

    def tokens(self) -> list[TokenRecord]:
        return self._run(self.store.tokens())

    # -- targets ---------------------------------------------------------------------------

    def target(self, name: str) -> Target | None:
        return self.targets().get(name)

    def targets(self) -> dict[str, Target]:
        return self._run(self.store.targets())

    def add_target(self, target: Target, *, replace: bool = False) -> None:
        self._run(self.store.add_target(target, replace=replace))

    def remove_target(self, name: str) -> None:
        self._run(self.store.remove_target(name))
