"""The tokens and targets pages in real Chromium: read-only lists from the control store; an
admin revokes a token (the client using it is refused from then on), anyone else cannot."""

from __future__ import annotations

import jwt
import psycopg
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.console.conftest import console_url, sign_in_with_token
from tests.harness import RunningGateway
from tests.integration import simple

pytestmark = pytest.mark.server


def jti_of(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


def signed_in(context: BrowserContext, gw: RunningGateway, subject: str, *groups: str) -> Page:
    page = context.new_page()
    sign_in_with_token(page, gw, gw.token(subject, groups))
    return page


def test_an_admin_revokes_a_token_and_its_client_is_refused(
    browser_context: BrowserContext, console_gw: RunningGateway
) -> None:
    victim = console_gw.token("agent:leaky", ("ai-agents",))
    jti = jti_of(victim)
    with psycopg.connect(console_gw.dsn(victim), autocommit=True) as conn:
        assert simple(conn, "SELECT 1") == [(1,)]
    page = signed_in(browser_context, console_gw, "user:root", "admins")
    page.goto(console_url(console_gw, "/console/tokens"))
    row = page.locator(f"#token-{jti}")
    expect(row).to_contain_text("agent:leaky")
    expect(row.locator(".status")).to_have_text("active")
    row.get_by_role("button", name=f"Revoke {jti}").click()
    expect(page.get_by_role("status")).to_contain_text(f"Revoked {jti} (agent:leaky)")
    expect(page.locator(f"#token-{jti} .status")).to_contain_text("revoked")
    with pytest.raises(psycopg.OperationalError, match="token revoked"):
        psycopg.connect(console_gw.dsn(victim), autocommit=True, connect_timeout=10).close()


def test_anyone_else_sees_only_their_own_tokens_and_cannot_revoke(
    browser_context: BrowserContext, console_gw: RunningGateway
) -> None:
    other = console_gw.token("agent:other", ("ai-agents",))
    page = signed_in(browser_context, console_gw, "user:plain", "engineers")
    page.goto(console_url(console_gw, "/console/tokens"))
    expect(page.get_by_role("main")).to_contain_text("user:plain")
    expect(page.get_by_role("main")).not_to_contain_text("agent:other")
    expect(page.get_by_role("button", name="Revoke")).to_have_count(0)
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert csrf
    forced = page.request.post(
        console_url(console_gw, f"/console/tokens/{jti_of(other)}/revoke"),
        form={"csrf_token": csrf},
        max_redirects=0,
    )
    assert forced.status == 403
    with psycopg.connect(console_gw.dsn(other), autocommit=True) as conn:
        assert simple(conn, "SELECT 1") == [(1,)]


def test_targets_are_listed_and_only_admins_see_where_they_are(
    browser_context: BrowserContext, console_gw: RunningGateway
) -> None:
    admin = signed_in(browser_context, console_gw, "user:root", "admins")
    admin.goto(console_url(console_gw, "/console/targets"))
    app = admin.locator("#target-app")
    expect(app).to_contain_text("appdb")
    expect(app).to_contain_text("env=test")
    expect(app).to_contain_text(f"127.0.0.1:{console_gw.cluster.port}")
    expect(admin.locator("#target-app_tls")).to_contain_text("verify-full")
    admin.get_by_role("button", name="Sign out").click()

    plain = signed_in(browser_context, console_gw, "user:plain", "engineers")
    plain.goto(console_url(console_gw, "/console/targets"))
    expect(plain.locator("#target-app")).to_contain_text("appdb")
    expect(plain.get_by_role("main")).not_to_contain_text(f":{console_gw.cluster.port}")
