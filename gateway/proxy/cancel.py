"""The cancel-key map: gateway-made secrets handed to clients, mapped to upstream keys."""

from __future__ import annotations

import asyncio
import hmac
import secrets
from typing import Protocol


class Cancellable(Protocol):
    def cancel_running(self) -> asyncio.Future[None] | None:
        """Forward a cancel upstream if (and only if) a query is running: done once the
        target has closed the cancel connection; None when nothing was forwarded."""
        ...


class CancelKeys:
    """Keys are (real upstream pid, random gateway secret): the pid is kept so that
    pg_backend_pid() and notifications agree with what the client was told."""

    def __init__(self) -> None:
        self._by_pid: dict[int, list[tuple[bytes, Cancellable]]] = {}

    def issue(self, process_id: int, session: Cancellable, length: int = 4) -> bytes:
        secret = secrets.token_bytes(length)
        self._by_pid.setdefault(process_id, []).append((secret, session))
        return secret

    def release(self, process_id: int, session: Cancellable) -> None:
        entries = self._by_pid.get(process_id)
        if not entries:
            return
        entries[:] = [e for e in entries if e[1] is not session]
        if not entries:
            del self._by_pid[process_id]

    def find(self, process_id: int, secret: bytes) -> Cancellable | None:
        found = None
        for key, session in self._by_pid.get(process_id, ()):
            # Constant-time comparison: the secret is the only thing guarding a cancel.
            if hmac.compare_digest(key, secret):
                found = session
        return found

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_pid.values())
