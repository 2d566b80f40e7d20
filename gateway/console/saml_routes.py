"""The console's SAML routes: /console/login/saml (redirect to the IdP with an AuthnRequest),
/console/saml/acs (the IdP's HTTP-POST Response; signs the person in) and
/console/saml/metadata (our SP metadata for the IdP's administrator).

The ACS is a cross-site POST sent by the IdP's page, so it cannot carry the session's CSRF
token (it is exempt from the console's check). What protects it instead: the Response must
answer an AuthnRequest id we issued, stored server-side against a random pre-login cookie of
the browser that started the login, and used once. A response to a login started in another
browser (login CSRF), an unsolicited one or a replayed one signs nobody in.

That pre-login cookie must reach the ACS on the IdP's cross-site POST, which a SameSite=Lax
cookie (the console session's) does not: over TLS it is SameSite=None; Secure. On plain
HTTP (loopback only) browsers refuse SameSite=None without Secure, so it is Lax there, which
works while the IdP is on the same site (another port of 127.0.0.1, as in the tests)."""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from gateway.console.deps import ConsoleDeps
from gateway.console.login import login_page, safe_next
from gateway.console.saml import (
    ACS_PATH,
    LOGIN_PATH,
    METADATA_PATH,
    REQUEST_LIFETIME_SECONDS,
    SamlConfigError,
    SamlLoginRefused,
    SamlServiceProvider,
    SamlSpSettings,
    new_browser_key,
)
from gateway.console.web_session import CSRF_EXEMPT, form_fields, sign_in

log = logging.getLogger("pgwarden.console")

SECURE_COOKIE = "__Host-pgwarden_saml"
PLAIN_COOKIE = "pgwarden_saml"
# An IdP's Response is a few kB (more with many groups); anything far larger is refused
# before it is read in full.
MAX_RESPONSE_BYTES = 512 * 1024


def console_base_url(deps: ConsoleDeps, request: Request) -> str:
    """Where browsers reach the console: console.public_url, else the admin listener's own
    address (from the socket, never from the request's Host header, which a client sets)."""
    if deps.settings.console.public_url:
        return deps.settings.console.public_url.rstrip("/")
    host, port = request.scope.get("server") or ("127.0.0.1", deps.settings.admin.port)
    host = f"[{host}]" if ":" in str(host) else str(host)
    return f"{'https' if deps.tls else 'http'}://{host}:{port}"


class SamlLogin:
    """The console's one service provider, made on first use (the IdP's metadata may be a
    URL to fetch) for the console's base URL."""

    def __init__(self, deps: ConsoleDeps) -> None:
        self.deps = deps
        self._sp: SamlServiceProvider | None = None
        self.cookie = SECURE_COOKIE if deps.tls else PLAIN_COOKIE
        self.same_site: Literal["none", "lax"] = "none" if deps.tls else "lax"

    def provider(self, request: Request) -> SamlServiceProvider:
        if self._sp is None:
            base = console_base_url(self.deps, request)
            self._sp = SamlServiceProvider(SamlSpSettings.of(self.deps.settings.console, base))
        return self._sp

    def set_browser_cookie(self, response: Response, key: str) -> None:
        response.set_cookie(
            self.cookie,
            key,
            max_age=int(REQUEST_LIFETIME_SECONDS),
            path="/",
            secure=self.deps.tls,
            httponly=True,
            samesite=self.same_site,
        )

    def clear_browser_cookie(self, response: Response) -> None:
        response.delete_cookie(
            self.cookie, path="/", secure=self.deps.tls, httponly=True, samesite=self.same_site
        )


async def _posted_response(request: Request) -> str | None:
    """The form's SAMLResponse field ("" when absent), or None when the body is too large.
    HTTP framing holds the body to its Content-Length, so that is checked before reading."""
    try:
        length = int(request.headers.get("content-length", ""))
    except ValueError:
        return None
    if length > MAX_RESPONSE_BYTES:
        return None
    return (await form_fields(request)).get("SAMLResponse", "")


def saml_router(deps: ConsoleDeps) -> APIRouter:
    router = APIRouter()
    login = SamlLogin(deps)
    # The IdP's POST cannot carry our CSRF token; InResponseTo binds it instead (above).
    CSRF_EXEMPT.add(ACS_PATH)

    def refused(request: Request, reason: str, status_code: int) -> Response:
        log.warning("console SAML login refused: %s", reason, extra={"event": "console_login"})
        response = login_page(
            request, deps, error=f"Sign-in refused: {reason}", status_code=status_code
        )
        login.clear_browser_cookie(response)
        return response

    @router.get(LOGIN_PATH)
    async def start(request: Request) -> Response:
        key = request.cookies.get(login.cookie) or new_browser_key()
        then = safe_next(request.query_params.get("next"))
        try:
            url = await asyncio.to_thread(login.provider(request).begin_login, key, then)
        except SamlConfigError as exc:
            return refused(request, f"SAML is not set up correctly: {exc}", 500)
        response = RedirectResponse(url, status_code=303)
        login.set_browser_cookie(response, key)
        return response

    @router.post(ACS_PATH)
    async def acs(request: Request) -> Response:
        posted = await _posted_response(request)
        if posted is None:
            return refused(request, "the SAML response is too large (or has no length)", 413)
        key = request.cookies.get(login.cookie, "")
        try:
            person, then = await asyncio.to_thread(
                login.provider(request).finish_login, key, posted
            )
        except SamlLoginRefused as exc:
            return refused(request, exc.reason, 403)
        except SamlConfigError as exc:
            return refused(request, f"SAML is not set up correctly: {exc}", 500)
        response = RedirectResponse(then, status_code=303)
        sign_in(response, person)
        login.clear_browser_cookie(response)
        log.info(
            "console sign-in of %s via SAML",
            person.subject,
            extra={"event": "console_login", "via": "saml"},
        )
        return response

    @router.get(METADATA_PATH)
    async def metadata(request: Request) -> Response:
        try:
            xml = await asyncio.to_thread(login.provider(request).metadata_xml)
        except SamlConfigError as exc:
            return Response(f"SAML is not set up correctly: {exc}\n", 500, media_type="text/plain")
        return Response(xml, media_type="application/samlmetadata+xml")

    return router
