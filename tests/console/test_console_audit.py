"""The console's audit pages in real Chromium against a real gateway: an agent's masked read
(psycopg, recorded target) is found by the search form, replayed step by step with the
keyboard showing the masked rows under their column names (never the stored values), the
chain panel says verify ok, and a person outside the audit groups is refused."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import psycopg
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.console.a11y import contrast_failures, tab_through, unnamed_controls
from tests.console.conftest import SCREENSHOTS, console_url, sign_in_with_token
from tests.harness import RunningGateway

pytestmark = pytest.mark.server

MASKED_READ = "SELECT id, email, ssn FROM customers ORDER BY id"
# What customers holds (cli/localpg.py): never on an audit page.
RAW_VALUES = ("ada@example.com", "grace@example.org", "123-45-6789", "987-65-4321")


@pytest.fixture(scope="module")
def agent_read(console_gw: RunningGateway, app_database: str) -> dict[str, Any]:
    """An agent reads classified columns on the recorded target (in the sample application
    database, `app_database`); what it was sent."""
    subject = f"agent:console-audit-{time.monotonic_ns()}"
    token = console_gw.token(subject, ("ai-agents",))
    with psycopg.connect(console_gw.dsn(token, target="app_recorded"), autocommit=True) as conn:
        seen = conn.execute(MASKED_READ).fetchall()
    assert all(str(v) not in RAW_VALUES for row in seen for v in row)
    return {"subject": subject, "seen": seen}


def _auditor_page(context: BrowserContext, gw: RunningGateway, groups: tuple[str, ...]) -> Page:
    page = context.new_page()
    sign_in_with_token(page, gw, gw.token(f"person:{'-'.join(groups)}", groups))
    return page


def _no_raw_values(page: Page) -> None:
    html = page.content()
    for raw in RAW_VALUES:
        assert raw not in html


def _keyboard_and_contrast(page: Page) -> None:
    """Every control reached by Tab with a visible focus, named, and readable text."""
    missed, invisible = tab_through(page)
    assert not missed, f"controls Tab never reached: {missed}"
    assert not invisible, f"controls focused without a visible indicator: {invisible}"
    assert not unnamed_controls(page)
    assert contrast_failures(page) == []


def test_the_search_finds_the_agents_masked_read_and_the_replay_shows_masked_rows(
    browser_context: BrowserContext, console_gw: RunningGateway, agent_read: dict[str, Any]
) -> None:
    page = _auditor_page(browser_context, console_gw, ("auditors",))
    page.goto(console_url(console_gw, "/console/audit"))
    page.get_by_label("Subject").fill(agent_read["subject"])
    page.get_by_label("Decision").select_option("mask")
    # The request record reaches the index a moment after the client has its rows: searched
    # again until it is there (a loaded machine indexes later; the deadline is only a bound).
    row = page.locator("table.audit-results tbody tr").filter(has_text=MASKED_READ)
    deadline = time.monotonic() + 60
    while True:
        # The results read are those of the search just made, not of the page before it
        # (a load state waited for at once may still be the old page's).
        page.evaluate("() => { window.__searched = true; }")
        page.get_by_role("button", name="Search").click()
        page.wait_for_function("() => window.__searched === undefined")
        page.wait_for_load_state()
        if row.count() or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    expect(row).to_have_count(1)
    expect(row).to_contain_text("ai-agents")
    expect(row).to_contain_text("public.customers.email")
    # The search is a GET form: its URL holds the filters.
    assert "action=mask" in page.url and "subject=agent" in page.url
    expect(page.locator(".chain-panel .verify-result")).to_have_text("ok")
    expect(page.locator(".chain-panel")).to_contain_text("Head witness")
    _no_raw_values(page)
    page.screenshot(path=str(SCREENSHOTS / "audit.png"), full_page=True)
    _keyboard_and_contrast(page)

    row.get_by_role("link", name=re.compile("Replay")).click()
    expect(page).to_have_url(re.compile(r"/console/audit/sessions/[^/?]+$"))
    expect(page.locator(".position")).to_have_text(re.compile(r"Step 1 of \d+"))
    expect(page.get_by_role("heading", level=2, name=re.compile("Login"))).to_be_visible()

    # Keyboard: Tab reaches Next, Enter follows it; the arrow keys step as well.
    page.get_by_role("link", name="Next →").focus()
    page.keyboard.press("Enter")
    expect(page.locator(".position")).to_have_text(re.compile(r"Step 2 of"))
    # The step arrived at (#step) holds the focus: Tab goes on to its Previous link.
    page.wait_for_load_state("load")
    expect(page.locator("#step")).to_be_focused()
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement.textContent")
    assert "Previous" in focused, focused
    page.keyboard.press("ArrowRight")
    expect(page.locator(".position")).to_have_text(re.compile(r"Step 3 of"))
    # The arrow keys are console.js's: the step's text shows before the script runs, and a
    # key pressed meanwhile did nothing (seen on a loaded machine).
    page.wait_for_load_state("load")
    page.keyboard.press("ArrowLeft")
    expect(page.locator(".position")).to_have_text(re.compile(r"Step 2 of"))

    step = page.locator("#step")
    expect(step.locator("pre.sql")).to_have_text(MASKED_READ)
    expect(step).to_contain_text("allow")
    expect(step.locator(".masks")).to_contain_text("public.customers.email")
    expect(step.locator(".masks")).to_contain_text("redact")
    expect(step).to_contain_text("SELECT 2")
    expect(step).to_contain_text(" ms")
    table = step.locator("table.recorded-rows")
    headers = table.locator("thead th").all_text_contents()
    assert headers == ["id", "email", "ssn"]
    cells = [
        [c.strip() for c in r.locator("td").all_text_contents()]
        for r in table.locator("tbody tr").all()
    ]
    assert cells == [[str(v) for v in row] for row in agent_read["seen"]]
    _no_raw_values(page)
    page.screenshot(path=str(SCREENSHOTS / "audit-replay.png"), full_page=True)
    _keyboard_and_contrast(page)

    # The accessibility tree names the stepper and its links, so a screen reader finds them.
    tree = page.get_by_role("navigation", name="Replay steps").aria_snapshot()
    assert 'link "← Previous"' in tree and 'link "Next →"' in tree, tree


def test_a_person_outside_the_audit_groups_is_refused(
    browser_context: BrowserContext, console_gw: RunningGateway, agent_read: dict[str, Any]
) -> None:
    page = _auditor_page(browser_context, console_gw, ("engineers", "approvers"))
    answer = page.goto(console_url(console_gw, "/console/audit"))
    assert answer is not None and answer.status == 403
    expect(page.get_by_role("alert")).to_contain_text("You may not read the audit trail")
    assert agent_read["subject"] not in page.content()
    answer = page.goto(console_url(console_gw, f"/console/audit?subject={agent_read['subject']}"))
    assert answer is not None and answer.status == 403
    assert MASKED_READ not in page.content()
    # A session's replay is refused alike, whether or not the session exists.
    answer = page.goto(console_url(console_gw, "/console/audit/sessions/anything"))
    assert answer is not None and answer.status == 403


def test_the_audit_pages_need_a_signed_in_person(console_gw: RunningGateway) -> None:
    for path in ("/console/audit", "/console/audit/sessions/anything"):
        answer = httpx.get(console_url(console_gw, path), follow_redirects=False)
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/console/login")


def test_an_auditor_reads_the_audit_api_and_a_bad_search_is_said(
    browser_context: BrowserContext, console_gw: RunningGateway, agent_read: dict[str, Any]
) -> None:
    token = console_gw.token("person:audit-api", ("auditors",))
    answer = httpx.get(
        console_url(console_gw, "/audit/records"),
        params={"subject": agent_read["subject"]},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert answer.status_code == 200 and answer.json()["records"]
    page = _auditor_page(browser_context, console_gw, ("admins",))
    answer_page = page.goto(console_url(console_gw, "/console/audit?since=yesterday-ish"))
    assert answer_page is not None and answer_page.status == 422
    expect(page.get_by_role("alert")).to_contain_text("bad since")
    missing = page.goto(console_url(console_gw, "/console/audit/sessions/no-such-session"))
    assert missing is not None and missing.status == 404
