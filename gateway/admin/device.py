"""pgwarden's own device authorization grant (RFC 8628) on the admin listener, for identity
providers that offer none (SAML): `pgwarden login --via console` asks for a device code
here, the person confirms its user code on the console (/console/device) signed in any way
the console offers, and the CLI's next poll here gets the pgwarden token issued to them.

No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time."""

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from gateway.admin.login import PersonTokens
from gateway.console.web_session import form_fields
from gateway.identity.device_codes import (
    DEVICE_CODE_GRANT,
    DeviceCodes,
    TooManyDeviceCodes,
    shown_user_code,
)


class DeviceAuthorizationOut(BaseModel):
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: int
    interval: float


def _oauth_error(error: str, description: str) -> JSONResponse:
    # RFC 6749 §5.2: errors of the token endpoint are 400 with a JSON body.
    return JSONResponse({"error": error, "error_description": description}, status_code=400)


_DESCRIPTIONS = {
    "invalid_grant": "no such device code (or its token was already handed out)",
    "expired_token": "the device code expired before it was confirmed",
    "access_denied": "the person refused the sign-in on the console",
    "authorization_pending": "not confirmed on the console yet",
    "slow_down": "polled sooner than the interval",
}


def console_base(tokens: PersonTokens, request: Request) -> str:
    """The console's address as browsers reach it."""
    public = tokens.settings.console.public_url.rstrip("/")
    return public or str(request.base_url).rstrip("/")


def device_router(tokens: PersonTokens, codes: DeviceCodes) -> APIRouter:
    router = APIRouter(tags=["login"])
    console = tokens.settings.console

    @router.post("/login/device", response_model=DeviceAuthorizationOut)
    async def device_authorization(request: Request) -> DeviceAuthorizationOut:
        """A device code for `pgwarden login --via console` (no token needed: the person
        proves who they are on the console)."""
        if not console.enabled:
            raise HTTPException(404, "the console is not enabled (console.enabled)")
        try:
            code = codes.new(request.client.host if request.client else "")
        except TooManyDeviceCodes as exc:
            raise HTTPException(503, str(exc)) from None
        page = f"{console_base(tokens, request)}/console/device"
        shown = shown_user_code(code.user_code)
        return DeviceAuthorizationOut(
            device_code=code.device_code,
            user_code=shown,
            verification_uri=page,
            verification_uri_complete=f"{page}?user_code={shown}",
            expires_in=int(codes.lifetime),
            interval=codes.interval,
        )

    @router.post("/login/device/token", response_model=None)
    async def device_token(request: Request) -> Any:
        """Poll with the device code (form fields grant_type and device_code): RFC 8628
        errors until the person confirmed; then the pgwarden token, once."""
        fields = await form_fields(request)
        if fields.get("grant_type") != DEVICE_CODE_GRANT:
            return _oauth_error("unsupported_grant_type", f"grant_type must be {DEVICE_CODE_GRANT}")
        error, issued = codes.poll(fields.get("device_code", ""))
        if error is not None or issued is None:
            assert error is not None
            return _oauth_error(error, _DESCRIPTIONS[error])
        remaining = max(0, int(issued.expires_at - time.time()))
        return JSONResponse(
            issued.model_dump()
            | {"access_token": issued.token, "token_type": "Bearer", "expires_in": remaining}
        )

    return router
