"""Mounts the web console on the admin app: its middleware (sessions, CSRF, security
headers), its static files and every console router, by one call, `mount_console`."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from gateway.console.approvals import approvals_router
from gateway.console.audit_pages import audit_pages_router
from gateway.console.deps import ConsoleDeps
from gateway.console.device import device_page_router
from gateway.console.inventory import inventory_router
from gateway.console.login import login_router, oidc_configured
from gateway.console.oidc import oidc_router
from gateway.console.render import STATIC_DIR, page
from gateway.console.saml import saml_configured
from gateway.console.saml_routes import saml_router
from gateway.console.web_session import (
    ConsoleMiddleware,
    SignedIn,
    SignInRequired,
    WebSessions,
)


def home_router() -> APIRouter:
    router = APIRouter()

    @router.get("/console", include_in_schema=False)
    async def bare() -> Response:
        return RedirectResponse("/console/", status_code=308)

    @router.get("/console/", response_class=HTMLResponse)
    async def home(request: Request, person: SignedIn) -> Response:
        return page(request, "home.html")

    return router


def mount_console(app: FastAPI, deps: ConsoleDeps) -> WebSessions:
    """Serve the console under /console on `app`; returns its session store."""
    sessions = WebSessions(
        lifetime_seconds=deps.settings.console.session_hours * 3600,
        tls=deps.tls,
        still_valid=deps.still_valid,
    )

    async def to_login(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInRequired)
        return RedirectResponse(f"/console/login?next={quote(exc.wanted)}", status_code=303)

    app.add_exception_handler(SignInRequired, to_login)
    app.mount("/console/static", StaticFiles(directory=STATIC_DIR), name="console-static")
    routers = [home_router(), login_router(deps), approvals_router(deps), inventory_router(deps)]
    routers.append(device_page_router(deps))
    if oidc_configured(deps):
        routers.append(oidc_router(deps))
    if deps.audit_reader is not None:
        routers.append(audit_pages_router(deps, deps.audit_reader))
    if saml_configured(deps.settings.console):
        routers.append(saml_router(deps))
    for router in routers:
        app.include_router(router, include_in_schema=False)
    app.add_middleware(ConsoleMiddleware, sessions=sessions)
    return sessions
