"""The admin HTTP app: /healthz, /readyz, /metrics, the approvals API, the kill switch
(/sessions), the audit API (/audit), people's logins (/login, /logout) and its OpenAPI
document (/openapi.json)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field

from gateway.admin.approvals import TokenCheck, approvals_router, bearer_principal
from gateway.admin.audit import audit_router
from gateway.admin.device import device_router
from gateway.admin.login import PersonTokens, login_router
from gateway.admin.readiness import ReadinessChecks
from gateway.audit.reader import AuditReader
from gateway.enforce.approvals import ApprovalDesk
from gateway.guards.kill import SessionDirectory
from gateway.identity.device_codes import DeviceCodes
from gateway.identity.principal import Principal

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
        await self.principal(request)

    async def principal(self, request: Request) -> Principal:
        """The bearer token's principal, of one of `groups`, on any address: what names
        who acted (a kill is audited with it) needs a token even on loopback."""
        principal = await bearer_principal(request, self.verify)
        if not self.groups.intersection(principal.groups):
            raise HTTPException(403, "the token's groups may not read the admin listener")
        return principal


class KillRequest(BaseModel):
    """What `pgwarden sessions kill` sends: one session by id, or every session of a subject."""

    session_id: str | None = None
    subject: str | None = None
    reason: str = Field(default="no reason given", max_length=500)


def admin_app(
    *,
    registry: CollectorRegistry,
    readiness: ReadinessChecks,
    access: AdminAccess,
    approvals: ApprovalDesk | None = None,
    sessions: SessionDirectory | None = None,
    audit: AuditReader | None = None,
    auditors: AdminAccess | None = None,
    logins: PersonTokens | None = None,
    device_codes: DeviceCodes | None = None,
) -> FastAPI:
    """`auditors`: who may read the audit API (default: `access`'s groups)."""
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
    if audit is not None:
        app.include_router(audit_router(audit, (auditors or access).principal))
    if logins is not None:
        app.include_router(login_router(logins))
        if device_codes is not None:
            app.include_router(device_router(logins, device_codes))
    if sessions is not None:
        directory = sessions

        @app.get("/sessions")
        async def list_sessions(request: Request) -> dict[str, Any]:
            # Current statements are client text (literals may be secrets): a token always.
            await access.principal(request)
            return {"sessions": [s.to_json() for s in directory.summaries()]}

        @app.post("/sessions/kill")
        async def kill_sessions(request: Request, wanted: KillRequest) -> JSONResponse:
            principal = await access.principal(request)
            if (wanted.session_id is None) == (wanted.subject is None):
                raise HTTPException(422, "name a session_id or a subject, not both")
            killed = await directory.kill(
                reason=wanted.reason,
                by=principal.subject,
                session_id=wanted.session_id,
                subject=wanted.subject,
            )
            if not killed:
                raise HTTPException(404, "no such session")
            return JSONResponse({"killed": killed})

    return app
