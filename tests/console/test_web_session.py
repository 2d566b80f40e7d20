"""The console's web sessions and their CSRF and header middleware, on a small app of their
own (no gateway, no browser): cookies, lifetimes, sign-in under a new id, the CSRF check
before any route runs, the security headers, and where sign-in may send the browser."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse

from gateway.console.login import safe_next
from gateway.console.people import Person
from gateway.console.web_session import (
    CONTENT_SECURITY_POLICY,
    MAX_FORM_BYTES,
    ConsoleMiddleware,
    SignedIn,
    WebSessions,
    csp_posting_to,
    csrf_token,
    sign_in,
    sign_out,
)

ALICE = Person("alice", frozenset({"approvers"}), "Alice", "token")


def app_with(sessions: WebSessions) -> tuple[FastAPI, list[str]]:
    app = FastAPI()
    changes: list[str] = []

    @app.get("/console/form")
    async def form(request: Request) -> Response:
        return PlainTextResponse(csrf_token(request))

    @app.post("/console/sign-in")
    async def signing_in(request: Request) -> Response:
        response = PlainTextResponse("in")
        sign_in(response, ALICE)
        return response

    @app.post("/console/sign-out")
    async def signing_out(request: Request) -> Response:
        response = PlainTextResponse("out")
        sign_out(request, response)
        return response

    @app.get("/console/me")
    async def me(person: SignedIn) -> Response:
        return PlainTextResponse(person.subject)

    @app.post("/console/change")
    async def change(request: Request) -> Response:
        changes.append((await request.body()).decode())
        return PlainTextResponse("changed")

    @app.get("/console/idp-post")
    async def idp_post() -> Response:
        response = PlainTextResponse("form to the IdP")
        response.headers["content-security-policy"] = csp_posting_to("https://idp.example")
        return response

    @app.post("/elsewhere")
    async def elsewhere() -> Response:
        return PlainTextResponse("not the console")

    app.add_middleware(ConsoleMiddleware, sessions=sessions)
    return app, changes


def client(tls: bool = False) -> tuple[httpx.AsyncClient, list[str]]:
    app, changes = app_with(WebSessions(lifetime_seconds=3600, tls=tls))
    return browser_of(app, tls=tls), changes


def browser_of(
    app: FastAPI, tls: bool = False, cookies: dict[str, str] | None = None
) -> httpx.AsyncClient:
    """A browser of the app (its own cookies)."""
    transport = httpx.ASGITransport(app=app)
    base = "https://testserver" if tls else "http://testserver"
    return httpx.AsyncClient(transport=transport, base_url=base, cookies=cookies)


async def test_a_change_without_the_sessions_csrf_token_is_refused_before_the_route_runs() -> None:
    c, changes = client()
    token = (await c.get("/console/form")).text
    assert (await c.post("/console/change", data={"x": "1"})).status_code == 403
    assert (await c.post("/console/change", data={"csrf_token": token + "x"})).status_code == 403
    # The same name twice is no token at all (which one would be checked?).
    both = f"csrf_token={token}&csrf_token=other"
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert (await c.post("/console/change", content=both, headers=form)).status_code == 403
    # A token in a JSON body is not looked for: forms and the header only.
    assert (await c.post("/console/change", json={"csrf_token": token})).status_code == 403
    assert changes == []
    assert (
        await c.post("/console/change", data={"csrf_token": token, "x": "1"})
    ).status_code == 200
    assert (await c.post("/console/change", headers={"X-CSRF-Token": token})).status_code == 200
    assert changes == [f"csrf_token={token}&x=1", ""]


async def test_another_sessions_token_is_refused() -> None:
    app, changes = app_with(WebSessions(lifetime_seconds=3600, tls=False))
    mine, theirs = browser_of(app), browser_of(app)
    await mine.get("/console/form")
    their_token = (await theirs.get("/console/form")).text
    assert (await mine.post("/console/change", data={"csrf_token": their_token})).status_code == 403
    assert changes == []


async def test_a_body_too_large_is_refused_unread() -> None:
    c, changes = client()
    token = (await c.get("/console/form")).text
    big = {"csrf_token": token, "x": "a" * (MAX_FORM_BYTES + 1)}
    assert (await c.post("/console/change", data=big)).status_code == 413
    assert changes == []


async def test_paths_outside_the_console_are_left_alone() -> None:
    c, _ = client()
    response = await c.post("/elsewhere")
    assert response.status_code == 200
    assert "content-security-policy" not in response.headers


async def test_security_headers_and_a_routes_own_form_action() -> None:
    c, _ = client()
    headers = (await c.get("/console/form")).headers
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "same-origin"
    assert headers["cache-control"] == "no-store"
    idp = (await c.get("/console/idp-post")).headers["content-security-policy"]
    assert "form-action 'self' https://idp.example" in idp
    assert "script-src 'self';" in idp
    with pytest.raises(ValueError):
        csp_posting_to("https://x; script-src *")


async def test_sign_in_replaces_the_anonymous_session_and_sign_out_ends_it() -> None:
    app, _ = app_with(WebSessions(lifetime_seconds=3600, tls=False))
    c = browser_of(app)
    token = (await c.get("/console/form")).text
    anonymous = c.cookies["pgwarden_console"]
    assert (await c.post("/console/sign-in", data={"csrf_token": token})).status_code == 200
    signed_in = c.cookies["pgwarden_console"]
    assert signed_in != anonymous  # no session fixation
    assert (await c.get("/console/me")).text == "alice"
    # The anonymous id no longer names a session.
    other = browser_of(app, cookies={"pgwarden_console": anonymous})
    assert (await other.post("/console/change", data={"csrf_token": token})).status_code == 403
    new_token = (await c.get("/console/form")).text
    assert new_token != token
    await c.post("/console/sign-out", data={"csrf_token": new_token})
    replay = browser_of(app, cookies={"pgwarden_console": signed_in})
    assert (await replay.post("/console/change", data={"csrf_token": new_token})).status_code == 403


async def test_over_tls_the_cookie_is_host_prefixed_secure_httponly_lax() -> None:
    c, _ = client(tls=True)
    cookie = (await c.get("/console/form")).headers["set-cookie"]
    assert cookie.startswith("__Host-pgwarden_console=")
    for attribute in ("HttpOnly", "Path=/", "SameSite=lax", "Secure"):
        assert attribute in cookie, cookie
    assert "Domain" not in cookie


def test_a_session_ends_at_its_absolute_lifetime() -> None:
    sessions = WebSessions(lifetime_seconds=3600, tls=False)
    session = sessions.create(ALICE)
    assert sessions.get(session.id) is session
    session.expires = time.time() - 1
    assert sessions.get(session.id) is None
    assert sessions.get(None) is None and sessions.get("unknown") is None


@pytest.mark.parametrize(
    ("wanted", "goes_to"),
    [
        ("/console/approvals", "/console/approvals"),
        ("/console/audit?q=x", "/console/audit?q=x"),
        ("https://evil.example/", "/console/"),
        ("//evil.example/console/", "/console/"),
        ("/console//evil.example", "/console/"),
        ("/console/\\evil", "/console/"),
        ("/metrics", "/console/"),
        (None, "/console/"),
    ],
)
def test_sign_in_sends_the_browser_to_console_paths_only(wanted: str | None, goes_to: str) -> None:
    assert safe_next(wanted) == goes_to
