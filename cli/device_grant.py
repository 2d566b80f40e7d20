"""The OAuth 2.0 device authorization grant (RFC 8628) from the client's side: ask for a
device code, show the person where to confirm it, poll the token endpoint as told. Used
against the IdP, and against the gateway's own device codes (confirmed on the console)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 §3.5: without an interval the client waits 5 s; slow_down adds 5 s for good.
DEFAULT_INTERVAL = 5.0
SLOW_DOWN_STEP = 5.0


class DeviceGrantError(Exception):
    """The grant ended without a token; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class DeviceCode:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float


def _json(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise DeviceGrantError(f"{what} answered HTTP {response.status_code} without a JSON object")
    return body


def request_device_code(
    http: httpx.Client, endpoint: str, form: Mapping[str, str], where: str
) -> DeviceCode:
    """Ask `endpoint` (the device authorization endpoint) for a device and user code."""
    response = http.post(endpoint, data=dict(form))
    body = _json(response, f"the device authorization endpoint of {where}")
    if response.status_code != 200:
        raise DeviceGrantError(f"{where} refused a device code: {_error_text(body)}")
    try:
        uri = body.get("verification_uri") or body["verification_url"]  # Google's spelling
        return DeviceCode(
            device_code=str(body["device_code"]),
            user_code=str(body["user_code"]),
            verification_uri=str(uri),
            verification_uri_complete=body.get("verification_uri_complete"),
            expires_in=float(body["expires_in"]),
            interval=float(body.get("interval") or DEFAULT_INTERVAL),
        )
    except (KeyError, TypeError, ValueError):
        raise DeviceGrantError(
            f"{where} sent a device authorization response without device_code, user_code,"
            " verification_uri or expires_in"
        ) from None


def poll_for_token(
    http: httpx.Client,
    token_endpoint: str,
    device: DeviceCode,
    form: Mapping[str, str],
    where: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll until the person confirmed (the token response), or raise DeviceGrantError when
    they refused, the code expired, or the endpoint answered something else."""
    interval = device.interval
    deadline = monotonic() + device.expires_in
    while True:
        sleep(interval)
        if monotonic() > deadline:
            raise _expired(where)
        try:
            response = http.post(
                token_endpoint,
                data={"grant_type": DEVICE_CODE_GRANT, "device_code": device.device_code, **form},
            )
        except httpx.TransportError as exc:
            raise DeviceGrantError(
                f"the token endpoint of {where} cannot be reached: {exc}"
            ) from None
        body = _json(response, f"the token endpoint of {where}")
        if response.status_code == 200:
            return body
        error = body.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += SLOW_DOWN_STEP
            continue
        if error == "expired_token":
            raise _expired(where)
        if error == "access_denied":
            raise DeviceGrantError(
                f"the sign-in was refused at {where} (access_denied): nothing was written"
            )
        raise DeviceGrantError(f"the token endpoint of {where} refused: {_error_text(body)}")


def _expired(where: str) -> DeviceGrantError:
    return DeviceGrantError(
        f"the code expired before it was confirmed at {where} (expired_token): run"
        " pgwarden login again; nothing was written"
    )


def _error_text(body: Mapping[str, Any]) -> str:
    error = str(body.get("error") or body.get("detail") or "no error code")
    description = body.get("error_description")
    return f"{error}: {description}" if description else error
