"""The console's sign-in and sign-out routes: the login page listing the configured ways,
the token login (a pgwarden token pasted once) and logout. OIDC and SAML add their own
routes and a way each (`login_ways`)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gateway.console.deps import ConsoleDeps
from gateway.console.people import Person
from gateway.console.render import page
from gateway.console.saml import LOGIN_PATH, saml_configured
from gateway.console.web_session import form_fields, sign_in, sign_out, web_session
from gateway.control.store import ControlStoreUnavailable
from gateway.identity.principal import TokenRejected

HOME = "/console/"


@dataclass(frozen=True)
class LoginWay:
    """One way to sign in, as the login page lists it."""

    kind: str  # "link": a button that starts a browser flow at `href`
    label: str
    href: str


def oidc_configured(deps: ConsoleDeps) -> bool:
    return bool(deps.settings.console.oidc_client_id and deps.settings.identity.oidc_issuer)


def login_ways(deps: ConsoleDeps) -> list[LoginWay]:
    ways = []
    if oidc_configured(deps):
        ways.append(
            LoginWay("link", "Sign in with your identity provider (OIDC)", "/console/login/oidc")
        )
    if saml_configured(deps.settings.console):
        ways.append(LoginWay("link", "Sign in with your identity provider (SAML)", LOGIN_PATH))
    return ways


def safe_next(wanted: str | None) -> str:
    """Where to go after sign-in: a console path only (never another site: no open redirect)."""
    if wanted and wanted.startswith(HOME) and "//" not in wanted and "\\" not in wanted:
        return wanted
    return HOME


def login_page(
    request: Request,
    deps: ConsoleDeps,
    *,
    error: str | None = None,
    notice: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    return page(
        request,
        "login.html",
        status_code=status_code,
        ways=login_ways(deps),
        token_login=True,
        next=safe_next(request.query_params.get("next")),
        error=error,
        notice=notice,
    )


def login_router(deps: ConsoleDeps) -> APIRouter:
    router = APIRouter()

    @router.get("/console/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        session = web_session(request)
        if session is not None and session.person is not None:
            return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
        return login_page(request, deps)

    @router.post("/console/login/token", response_class=HTMLResponse)
    async def token_login(request: Request) -> Response:
        fields = await form_fields(request)
        token = fields.get("token", "").strip()
        if not token:
            return login_page(request, deps, error="Paste a token.", status_code=400)
        if len(token.encode()) > deps.settings.identity.max_token_bytes:
            return login_page(
                request, deps, error="Token rejected: token too large.", status_code=401
            )
        try:
            principal = await deps.verify(token)
        except TokenRejected as exc:
            return login_page(request, deps, error=f"Token rejected: {exc.check}.", status_code=401)
        except ControlStoreUnavailable:
            # The token's revocation cannot be checked: refused, and said to be temporary.
            return login_page(
                request,
                deps,
                error="The token registry cannot be read just now; try again shortly.",
                status_code=503,
            )
        name = principal.claims.get("name")
        person = Person(
            subject=principal.subject,
            groups=frozenset(principal.groups),
            display_name=name if isinstance(name, str) and name.strip() else principal.subject,
            via="token",
        )
        response = RedirectResponse(safe_next(fields.get("next")), status_code=303)
        # The session ends no later than the token would have, nor outlives its revocation.
        sign_in(response, person, principal.expires_at, principal=principal)
        return response

    @router.post("/console/logout")
    async def logout(request: Request) -> Response:
        response = RedirectResponse("/console/login", status_code=303)
        sign_out(request, response)
        return response

    return router
