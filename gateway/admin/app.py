"""The admin HTTP app: /healthz, /readyz, /metrics, the approvals API and its OpenAPI
document (/openapi.json)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.admin.approvals import TokenCheck, approvals_router
from gateway.admin.readiness import ReadinessChecks
from gateway.control.store import ControlStoreUnavailable
from gateway.enforce.approvals import ApprovalDesk
from gateway.identity.principal import TokenRejected

# The admin API's version in its OpenAPI document (gateway/admin/openapi.json).
API_VERSION = "1"


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only. Unlike a client's
    address, "" is not: to bind() it means every interface."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class AdminAccess:
    """Who may read what the admin listener serves. On a loopback address: everyone on the
    machine. Elsewhere: a bearer token (the same tokens clients log in with) of one of
    `groups`; health probes excepted (a kubelet or load balancer carries no token)."""

    def __init__(self, *, open_access: bool, verify: TokenCheck, groups: Sequence[str]) -> None:
        self.open_access = open_access
        self.verify = verify
        self.groups = frozenset(groups)

    async def check(self, request: Request) -> None:
        if self.open_access:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
        try:
            principal = await self.verify(token.strip())
        except TokenRejected as exc:
            raise HTTPException(
                401, f"token rejected: {exc.check}", {"WWW-Authenticate": "Bearer"}
            ) from None
        except ControlStoreUnavailable as exc:
            # The token's revocation cannot be checked: refused, and said to be temporary.
            raise HTTPException(503, f"the control store cannot be read: {exc}") from None
        if not self.groups.intersection(principal.groups):
            raise HTTPException(403, "the token's groups may not read the admin listener")


def admin_app(
    *,
    registry: CollectorRegistry,
    readiness: ReadinessChecks,
    access: AdminAccess,
    approvals: ApprovalDesk | None = None,
) -> FastAPI:
    app = FastAPI(
        title="pgwarden admin",
        version=API_VERSION,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        problems = await readiness.problems()
        if problems:
            return JSONResponse({"status": "not ready", "not_ready": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        await access.check(request)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if approvals is not None:
        app.include_router(approvals_router(approvals, access.verify, access.groups))
    return app
