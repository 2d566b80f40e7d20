"""OIDC login for people: the authorization code flow with PKCE (S256), `state` and `nonce`
against identity.oidc_issuer, the ID token verified by the data path's own OIDC verifier
(signature, iss, aud = the console's client id, exp), groups from identity.oidc_groups_claim.

What the callback must find again (state, nonce, PKCE verifier) is kept in the browser's own
web session and used once: another browser's callback, a changed state and a replayed code
find nothing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlencode

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from gateway.console.deps import ConsoleDeps
from gateway.console.login import login_page, safe_next
from gateway.console.people import Person
from gateway.console.web_session import pending_flow, sign_in
from gateway.identity.oidc import OidcVerifier, _require_secure
from gateway.identity.principal import TokenRejected

log = logging.getLogger("pgwarden.console")

CALLBACK = "/console/oidc/callback"
# A login not finished within this time must start again.
FLOW_SECONDS = 10 * 60
# Logins begun in one browser and not finished (several tabs); the oldest go first.
MAX_FLOWS = 5


class LoginRefused(Exception):
    """The OIDC login failed a check; the message says which (never a token)."""


@dataclass(frozen=True)
class Flow:
    """One login in progress, as the callback must find it again."""

    nonce: str
    verifier: str
    redirect_uri: str
    next: str
    started: float


@dataclass(frozen=True)
class IssuerEndpoints:
    authorization: str
    token: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pkce_challenge(verifier: str) -> str:
    return _b64(hashlib.sha256(verifier.encode()).digest())


async def discover(http: httpx.AsyncClient, issuer: str) -> IssuerEndpoints:
    response = await http.get(
        issuer.rstrip("/") + "/.well-known/openid-configuration",
        headers={"Accept": "application/json"},
    )
    response.raise_for_status()
    document = response.json()
    if not isinstance(document, dict) or document.get("issuer") != issuer:
        raise LoginRefused("the issuer's discovery document names another issuer")
    endpoints = []
    for name in ("authorization_endpoint", "token_endpoint"):
        url = document.get(name)
        if not isinstance(url, str):
            raise LoginRefused(f"the issuer's discovery document has no {name}")
        try:
            _require_secure(url, name)
        except ValueError as exc:
            raise LoginRefused(str(exc)) from None
        endpoints.append(url)
    return IssuerEndpoints(*endpoints)


def redirect_uri(deps: ConsoleDeps, request: Request) -> str:
    base = deps.settings.console.public_url or str(request.base_url)
    return base.rstrip("/") + CALLBACK


def _flows(request: Request) -> dict[str, Flow]:
    flows: dict[str, Flow] = pending_flow(request).setdefault("oidc", {})
    now = time.time()
    for state, flow in list(flows.items()):
        if now - flow.started > FLOW_SECONDS:
            del flows[state]
    return flows


def _take_flow(request: Request, state: str) -> Flow:
    """The flow `state` names, removed: a callback is served once."""
    flows = _flows(request)
    for known in list(flows):
        if hmac.compare_digest(known.encode(), state.encode()):
            return flows.pop(known)
    raise LoginRefused("the login's state is unknown, used already or expired; sign in again")


class OidcLogin:
    """The console's side of the code flow against one issuer, for one client id."""

    def __init__(self, deps: ConsoleDeps) -> None:
        self.deps = deps
        identity = deps.settings.identity
        self.issuer = identity.oidc_issuer
        self.client_id = deps.settings.console.oidc_client_id
        secret_env = deps.settings.console.oidc_client_secret_env
        self.client_secret = deps.environ.get(secret_env, "") if secret_env else ""

    def _verifier(self, http: httpx.AsyncClient) -> OidcVerifier:
        """The data path's verifier, with the console's client id as the audience an ID
        token must name. Its keys are fetched for this login (a person logs in rarely)."""
        identity = self.deps.settings.identity.model_copy(update={"oidc_audience": self.client_id})
        return OidcVerifier.from_settings(identity, http=http)

    async def start(self, request: Request) -> str:
        """Remember a new flow in the browser's session; the authorization URL to go to."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as http:
            endpoints = await discover(http, self.issuer)
        flows = _flows(request)
        while len(flows) >= MAX_FLOWS:
            del flows[min(flows, key=lambda s: flows[s].started)]
        state = secrets.token_urlsafe(32)
        flow = Flow(
            nonce=secrets.token_urlsafe(32),
            verifier=secrets.token_urlsafe(64),
            redirect_uri=redirect_uri(self.deps, request),
            next=safe_next(request.query_params.get("next")),
            started=time.time(),
        )
        flows[state] = flow
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": flow.redirect_uri,
                "scope": " ".join(self.deps.settings.console.oidc_scopes),
                "state": state,
                "nonce": flow.nonce,
                "code_challenge": pkce_challenge(flow.verifier),
                "code_challenge_method": "S256",
            }
        )
        separator = "&" if "?" in endpoints.authorization else "?"
        return endpoints.authorization + separator + query

    async def finish(self, request: Request, state: str, code: str) -> tuple[Person, str]:
        """The signed-in person from the callback's code, and where they wanted to go."""
        flow = _take_flow(request, state)
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as http:
            endpoints = await discover(http, self.issuer)
            form = {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": flow.redirect_uri,
                "code_verifier": flow.verifier,
                "client_id": self.client_id,
            }
            headers = {"Accept": "application/json"}
            if self.client_secret:
                # client_secret_basic: each half form-encoded first (RFC 6749, 2.3.1).
                pair = f"{quote_plus(self.client_id)}:{quote_plus(self.client_secret)}"
                headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            response = await http.post(endpoints.token, data=form, headers=headers)
            if response.status_code != 200:
                raise LoginRefused(
                    f"the issuer refused the code ({_oauth_error(response)}); sign in again"
                )
            id_token = _id_token(response)
            try:
                principal = await self._verifier(http).verify(id_token)
            except TokenRejected as exc:
                raise LoginRefused(f"the ID token was rejected: {exc.check}") from None
        claims = principal.claims
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(
            nonce.encode(), flow.nonce.encode()
        ):
            raise LoginRefused("the ID token was rejected: nonce mismatch")
        azp = claims.get("azp")
        if azp is not None and azp != self.client_id:
            raise LoginRefused("the ID token was rejected: issued to another client (azp)")
        person = Person(
            subject=principal.subject,
            groups=frozenset(principal.groups),
            display_name=_display_name(claims, principal.subject),
            via="oidc",
        )
        return person, flow.next


def _oauth_error(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])[:100]
    return f"HTTP {response.status_code}"


def _id_token(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    token = body.get("id_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise LoginRefused("the issuer's token response carries no ID token")
    return token


def _display_name(claims: dict[str, Any], subject: str) -> str:
    for claim in ("name", "preferred_username", "email"):
        value = claims.get(claim)
        if isinstance(value, str) and value.strip():
            return value.strip()[:200]
    return subject


def oidc_router(deps: ConsoleDeps) -> APIRouter:
    router = APIRouter()
    login = OidcLogin(deps)

    def refused(request: Request, reason: str, status_code: int = 400) -> Response:
        log.warning("console OIDC login refused: %s", reason, extra={"event": "console_login"})
        return login_page(
            request, deps, error=f"Sign-in refused: {reason}", status_code=status_code
        )

    @router.get("/console/login/oidc")
    async def start(request: Request) -> Response:
        try:
            url = await login.start(request)
        except (httpx.HTTPError, ValueError, LoginRefused) as exc:
            reason = str(exc) if isinstance(exc, LoginRefused) else "the issuer cannot be reached"
            return refused(request, reason, 502)
        return RedirectResponse(url, status_code=303)

    @router.get(CALLBACK)
    async def callback(request: Request) -> Response:
        params = request.query_params
        if "error" in params:
            # The IdP said no (the person cancelled, or is not allowed): its words, bounded.
            return refused(request, f"the identity provider answered {params['error'][:100]!r}")
        state, code = params.get("state", ""), params.get("code", "")
        if not state or not code:
            return refused(request, "the callback carries no code or state")
        try:
            person, wanted = await login.finish(request, state, code)
        except LoginRefused as exc:
            return refused(request, str(exc))
        except (httpx.HTTPError, ValueError):
            return refused(request, "the issuer cannot be reached", 502)
        response = RedirectResponse(wanted, status_code=303)
        sign_in(response, person)
        log.info(
            "console sign-in of %s via OIDC",
            person.subject,
            extra={"event": "console_login", "via": "oidc"},
        )
        return response

    return router
