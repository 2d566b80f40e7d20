# ruff: noqa: S608  (tests build SQL around table names of their own)
"""Keyboard use and contrast of the console's pages in real Chromium: the approvals page
with a held request on it (its buttons and fields), the login, tokens and targets pages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.console.a11y import contrast_failures, tab_through, unnamed_controls
from tests.console.conftest import agent_holds, console_url, sign_in_with_token
from tests.harness import RunningGateway
from tests.integration.approvals import own_table

pytestmark = pytest.mark.server


@pytest.fixture
def held_request(console_gw: RunningGateway) -> Iterator[str]:
    """A statement held for approval while the test runs: its request id."""
    for table in own_table(console_gw):  # dropped once the loop ends
        held = agent_holds(console_gw, f'DELETE FROM "{table}"')
        try:
            yield held.request_id()
        finally:
            held.close()


@pytest.fixture
def approver(browser_context: BrowserContext, console_gw: RunningGateway) -> Page:
    page = browser_context.new_page()
    sign_in_with_token(page, console_gw, console_gw.token("user:kay", ("engineers", "admins")))
    return page


def test_the_approvals_page_is_usable_by_keyboard_and_names_every_control(
    approver: Page, console_gw: RunningGateway, held_request: str
) -> None:
    approver.goto(console_url(console_gw, "/console/approvals"))
    expect(approver.locator(f"#req-{held_request}")).to_be_visible()
    missed, invisible = tab_through(approver)
    assert not missed, f"controls Tab never reached: {missed}"
    assert not invisible, f"controls focused without a visible indicator: {invisible}"
    assert not unnamed_controls(approver)
    tree = approver.locator("main").aria_snapshot()
    for name in (f"Approve {held_request}", f"Deny {held_request}"):
        assert f'button "{name}"' in tree, tree
    assert 'textbox "Note"' in tree and 'combobox "Approve for"' in tree, tree
    assert approver.get_by_role("main").count() == 1
    assert 'button "Sign out"' in approver.locator("body").aria_snapshot()


@pytest.mark.parametrize("path", ["/console/approvals", "/console/tokens", "/console/targets"])
def test_text_and_buttons_have_readable_contrast(
    approver: Page, console_gw: RunningGateway, held_request: str, path: str
) -> None:
    approver.goto(console_url(console_gw, path))
    if path == "/console/approvals":
        expect(approver.locator(f"#req-{held_request}")).to_be_visible()
        # The buttons themselves, and the highlighted statement, are among the text checked.
        expect(approver.get_by_role("button", name=f"Deny {held_request}")).to_be_visible()
    assert contrast_failures(approver) == []


def test_the_login_page_is_usable_by_keyboard_with_readable_contrast(
    browser_context: BrowserContext, console_gw: RunningGateway
) -> None:
    page = browser_context.new_page()
    page.goto(console_url(console_gw, "/console/login"))
    missed, invisible = tab_through(page)
    assert not missed and not invisible, (missed, invisible)
    assert not unnamed_controls(page)
    assert contrast_failures(page) == []
