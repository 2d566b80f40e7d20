"""Device codes of pgwarden's own device authorization grant (RFC 8628): made for a CLI
that asks, confirmed or refused by a signed-in person, polled by that CLI until it gets the
token issued to the person (once). In this gateway's memory: with several replicas, the CLI
and the person's browser must reach the same one (as the console's web sessions must)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.admin.login import LoginTokenOut

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 §6.1: letters only, no vowels (no words), none easily confused; 20^8 codes.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
# Anyone may ask for a code: past this many waiting, new ones are refused.
MAX_PENDING = 1000
# A poll this much sooner than the interval is still taken (clocks, network jitter).
POLL_SLACK = 0.8


def normalised_user_code(text: str) -> str:
    """What a person types, as stored: case, spaces and dashes do not matter."""
    return "".join(ch for ch in text.upper() if ch.isalnum())


def shown_user_code(code: str) -> str:
    half = len(code) // 2
    return f"{code[:half]}-{code[half:]}"


class TooManyDeviceCodes(Exception):
    """Anyone may ask for a code, so how many may wait is bounded."""


@dataclass
class DeviceCode:
    device_code: str
    user_code: str
    created: float
    expires: float
    # Where the CLI asked from, shown to the person who confirms (a phished code would
    # name a stranger's address).
    client_addr: str
    last_poll: float = 0.0
    # Set when the person confirmed (the token their CLI will get) or refused.
    issued: LoginTokenOut | None = None
    denied: bool = False
    confirmed_by: str | None = None


class DeviceCodes:
    """The codes waiting for their person, by device code and by user code."""

    def __init__(
        self,
        *,
        lifetime_seconds: float,
        interval_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lifetime = lifetime_seconds
        self.interval = interval_seconds
        self._clock = clock
        self._by_device: dict[str, DeviceCode] = {}
        self._by_user: dict[str, DeviceCode] = {}

    def _sweep(self, now: float) -> None:
        for code in [c for c in self._by_device.values() if c.expires <= now]:
            self._forget(code)

    def _forget(self, code: DeviceCode) -> None:
        self._by_device.pop(code.device_code, None)
        self._by_user.pop(code.user_code, None)

    def new(self, client_addr: str) -> DeviceCode:
        now = self._clock()
        self._sweep(now)
        if len(self._by_device) >= MAX_PENDING:
            raise TooManyDeviceCodes("too many device codes are waiting; try again shortly")
        user_code = ""
        while not user_code or user_code in self._by_user:
            user_code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
        code = DeviceCode(
            device_code=secrets.token_urlsafe(32),
            user_code=user_code,
            created=now,
            expires=now + self.lifetime,
            client_addr=client_addr,
        )
        self._by_device[code.device_code] = code
        self._by_user[user_code] = code
        return code

    def waiting(self, user_code: str) -> DeviceCode | None:
        """The code a person typed, while it still waits for them."""
        now = self._clock()
        self._sweep(now)
        code = self._by_user.get(normalised_user_code(user_code))
        if code is None or code.issued is not None or code.denied:
            return None
        return code

    def poll(self, device_code: str) -> tuple[str | None, LoginTokenOut | None]:
        """(an RFC 8628 error code, None) or (None, the token): the token is handed out
        once, and the code forgotten with it."""
        now = self._clock()
        code = self._by_device.get(device_code)
        if code is None:
            return "invalid_grant", None
        if code.expires <= now:
            self._forget(code)
            return "expired_token", None
        if code.denied:
            self._forget(code)
            return "access_denied", None
        if code.issued is not None:
            self._forget(code)
            return None, code.issued
        too_soon = now - code.last_poll < self.interval * POLL_SLACK
        code.last_poll = now
        return ("slow_down" if too_soon else "authorization_pending"), None
