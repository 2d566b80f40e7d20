"""OIDC sign-in to the console (authorization code with PKCE, state and nonce) in real
Chromium, against the test's own issuer; every way a callback can be wrong is refused and
leaves the browser signed out."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.console.conftest import console_url, sign_in_with_oidc
from tests.console.idp import CodeFlow
from tests.harness import RunningGateway


def _be_honest(code_flow: CodeFlow) -> None:
    code_flow.id_token_overrides = {}
    code_flow.state_override = None
    code_flow.replay_last_code = False
    code_flow.issuer.failing = False


@pytest.fixture(autouse=True)
def _honest_issuer(code_flow: CodeFlow) -> Iterator[None]:
    """Each test starts with an issuer that does nothing wrong, and leaves it so for the
    other console modules sharing it."""
    _be_honest(code_flow)
    yield
    _be_honest(code_flow)


def signed_out(page: Page, gw: RunningGateway) -> None:
    page.goto(console_url(gw, "/console/"))
    expect(page).to_have_url(console_url(gw, "/console/login?next=/console/"))


def start_login(page: Page, gw: RunningGateway) -> None:
    page.goto(console_url(gw, "/console/login"))
    page.get_by_role("link", name="Sign in with your identity provider (OIDC)").click()


def test_oidc_login_signs_the_person_in_with_the_issuers_name_and_groups(
    browser_context: BrowserContext, console_gw: RunningGateway, code_flow: CodeFlow
) -> None:
    page = browser_context.new_page()
    sign_in_with_oidc(
        page, console_gw, code_flow, "bob@example.com", ("approvers", "dba"), "Bob Builder"
    )
    expect(page.locator(".person-name")).to_have_text("Bob Builder")
    expect(page.get_by_role("banner")).to_contain_text("via oidc")
    expect(page.get_by_role("main")).to_contain_text("approvers")
    expect(page.get_by_role("main")).to_contain_text("dba")
    assert code_flow.refusals == []


def test_a_callback_replayed_after_sign_in_is_refused(
    browser_context: BrowserContext, console_gw: RunningGateway, code_flow: CodeFlow
) -> None:
    page = browser_context.new_page()
    sign_in_with_oidc(page, console_gw, code_flow, "bob@example.com", ("dba",), "Bob")
    callback = code_flow.last_callback
    assert callback is not None
    page.get_by_role("button", name="Sign out").click()
    page.goto(callback)
    expect(page.get_by_role("alert")).to_contain_text("state is unknown, used already")
    signed_out(page, console_gw)


def test_a_code_the_issuer_already_redeemed_is_refused(
    browser_context: BrowserContext, console_gw: RunningGateway, code_flow: CodeFlow
) -> None:
    page = browser_context.new_page()
    sign_in_with_oidc(page, console_gw, code_flow, "bob@example.com", ("dba",), "Bob")
    page.get_by_role("button", name="Sign out").click()
    # A new login whose callback carries the old, redeemed code (with the new, right state).
    code_flow.replay_last_code = True
    start_login(page, console_gw)
    expect(page.get_by_role("alert")).to_contain_text("the issuer refused the code (invalid_grant)")
    assert code_flow.refusals[-1] == "invalid_grant"
    signed_out(page, console_gw)


@pytest.mark.parametrize(
    ("knob", "said"),
    [
        ("state", "state is unknown"),
        ("nonce", "nonce mismatch"),
        ("aud", "the ID token was rejected: wrong audience"),
        ("azp", "issued to another client"),
        ("expired", "the ID token was rejected: token expired"),
    ],
)
def test_a_wrong_callback_or_id_token_is_refused(
    browser_context: BrowserContext,
    console_gw: RunningGateway,
    code_flow: CodeFlow,
    knob: str,
    said: str,
) -> None:
    if knob == "state":
        code_flow.state_override = "forged-state"
    elif knob == "nonce":
        code_flow.id_token_overrides = {"nonce": "someone-elses-nonce"}
    elif knob == "aud":
        code_flow.id_token_overrides = {"aud": "another-app"}
    elif knob == "azp":
        code_flow.id_token_overrides = {"aud": ["pgwarden-console", "x"], "azp": "x"}
    else:
        code_flow.id_token_overrides = {"exp": 1000}
    page = browser_context.new_page()
    start_login(page, console_gw)
    expect(page.get_by_role("alert")).to_contain_text(said)
    signed_out(page, console_gw)


def test_an_unreachable_issuer_is_said_so_and_signs_no_one_in(
    browser_context: BrowserContext, console_gw: RunningGateway, code_flow: CodeFlow
) -> None:
    page = browser_context.new_page()
    code_flow.issuer.failing = True
    try:
        start_login(page, console_gw)
        expect(page.get_by_role("alert")).to_contain_text("the issuer cannot be reached")
    finally:
        code_flow.issuer.failing = False
    signed_out(page, console_gw)
