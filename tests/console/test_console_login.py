"""Signing in to the console with a pasted pgwarden token, and out again, in real Chromium
against a real gateway's admin listener; the security headers every console page carries."""

from __future__ import annotations

import time

import httpx
from playwright.sync_api import BrowserContext, Page, expect

from tests.console.conftest import console_url, sign_in_with_token
from tests.harness import RunningGateway

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'"
)


def test_token_login_shows_the_person_and_sign_out_ends_the_session(
    browser_context: BrowserContext, console_gw: RunningGateway
) -> None:
    page = browser_context.new_page()
    page.goto(console_url(console_gw, "/console/"))
    # Not signed in: the login page, remembering where the person wanted to go.
    expect(page).to_have_url(console_url(console_gw, "/console/login?next=/console/"))
    token = console_gw.token("person:carol", ("engineers",))
    sign_in_with_token(page, console_gw, token)
    page.goto(console_url(console_gw, "/console/"))
    expect(page.locator(".person-name")).to_have_text("person:carol")
    expect(page.get_by_role("main")).to_contain_text("engineers")
    cookies = browser_context.cookies()
    assert [c["name"] for c in cookies] == ["pgwarden_console"]
    assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Lax"
    assert cookies[0]["value"] not in token

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(console_url(console_gw, "/console/login"))
    # The old cookie, replayed, no longer signs anyone in: the session is gone server-side.
    old = httpx.get(
        console_url(console_gw, "/console/"),
        cookies={"pgwarden_console": cookies[0]["value"]},
        follow_redirects=False,
    )
    assert old.status_code == 303 and old.headers["location"].startswith("/console/login")


def test_a_rejected_token_is_refused_with_the_reason_and_no_session(
    browser_context: BrowserContext, console_gw: RunningGateway
) -> None:
    page = browser_context.new_page()
    token = console_gw.token("person:dave", ("engineers",))
    console_gw.revoke(token)
    page.goto(console_url(console_gw, "/console/login"))
    page.get_by_label("Token", exact=True).fill(token)
    page.get_by_role("button", name="Sign in with token").click()
    expect(page.get_by_role("alert")).to_contain_text("Token rejected")
    page.goto(console_url(console_gw, "/console/"))
    expect(page).to_have_url(console_url(console_gw, "/console/login?next=/console/"))


def test_every_console_response_carries_the_security_headers(console_gw: RunningGateway) -> None:
    for path in ("/console/login", "/console/", "/console/static/console.css"):
        response = httpx.get(console_url(console_gw, path), follow_redirects=False)
        assert response.headers["content-security-policy"] == CSP, path
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"


def test_the_login_form_without_its_csrf_token_is_refused(console_gw: RunningGateway) -> None:
    token = console_gw.token("person:erin", ("engineers",))
    with httpx.Client(base_url=console_url(console_gw, "")) as client:
        client.get("/console/login")  # an anonymous session and its cookie
        refused = client.post("/console/login/token", data={"token": token})
        assert refused.status_code == 403
        assert client.get("/console/", follow_redirects=False).status_code == 303


def test_the_csp_stops_an_inline_script(signed_in_page: Page, console_gw: RunningGateway) -> None:
    violations: list[str] = []
    signed_in_page.on("console", lambda m: violations.append(m.text))
    # A script element added to a console page (as an injection would) does not run.
    signed_in_page.evaluate(
        "() => { const s = document.createElement('script');"
        " s.textContent = 'window.__ran = true'; document.body.appendChild(s); }"
    )
    assert signed_in_page.evaluate("() => window.__ran === true") is False
    assert any("Content Security Policy" in v for v in violations)


def test_a_token_session_ends_when_the_token_is_revoked(
    browser_context: BrowserContext, console_gw: RunningGateway
) -> None:
    page = browser_context.new_page()
    token = console_gw.token("person:frank", ("engineers",))
    sign_in_with_token(page, console_gw, token)
    expect(page.locator(".person-name")).to_have_text("person:frank")
    console_gw.revoke(token)
    # The gateway reads revocations every identity.revocation_poll_seconds (0.25 s).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        page.goto(console_url(console_gw, "/console/"))
        if "/console/login" in page.url:
            break
        time.sleep(0.1)
    expect(page).to_have_url(console_url(console_gw, "/console/login?next=/console/"))


def test_the_pages_need_nothing_the_csp_refuses(
    signed_in_page: Page, console_gw: RunningGateway
) -> None:
    """Every page's script and style load from the console's own files: the browser reports
    no CSP violation, the stylesheet applies and the script runs."""
    violations: list[str] = []
    signed_in_page.on("console", lambda m: violations.append(m.text))
    for path in ("/console/", "/console/approvals", "/console/tokens", "/console/targets"):
        signed_in_page.goto(console_url(console_gw, path))
        header = signed_in_page.locator("header.top")
        expect(header).to_have_css("background-color", "rgb(243, 245, 247)")
    signed_in_page.goto(console_url(console_gw, "/console/approvals"))
    # console.js polls the list: its fetches reach the fragment.
    with signed_in_page.expect_response(lambda r: r.url.endswith("/console/approvals/pending")):
        pass
    assert not [v for v in violations if "Content Security Policy" in v], violations
