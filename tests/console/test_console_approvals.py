# ruff: noqa: S608  (tests build SQL around table names of their own)
"""The approvals page in real Chromium against a real gateway, PostgreSQL and OPA: an
agent's statement held by the gateway appears without a reload; approve releases it and the
client gets its rows; deny returns the note to the client; four eyes; who sees buttons, and
the server refusing what the buttons would not offer, and any POST without the session's
CSRF token."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, expect

from tests.console.conftest import (
    SCREENSHOTS,
    agent_holds,
    console_url,
    sign_in_with_oidc,
    sign_in_with_token,
)
from tests.console.idp import CodeFlow
from tests.harness import RunningGateway
from tests.integration import original_rows, refusal_of, simple, table_exists, table_rows
from tests.integration.approvals import Held, agent, own_table, stored, vote

pytestmark = pytest.mark.server


@pytest.fixture
def table(console_gw: RunningGateway) -> Iterator[str]:
    yield from own_table(console_gw)


@pytest.fixture
def ann(browser_context: BrowserContext, console_gw: RunningGateway, code_flow: CodeFlow) -> Page:
    """An engineer, signed in through the identity provider, on the approvals page."""
    page = browser_context.new_page()
    sign_in_with_oidc(
        page,
        console_gw,
        code_flow,
        "ann@example.com",
        ("engineers",),
        "Ann Engineer",
        then="/console/approvals",
    )
    return page


def second_person(
    browser: Browser, gw: RunningGateway, flow: CodeFlow, subject: str, groups: tuple[str, ...]
) -> tuple[BrowserContext, Page]:
    context = browser.new_context()
    page = context.new_page()
    sign_in_with_oidc(page, gw, flow, subject, groups, subject, then="/console/approvals")
    return context, page


def card(page: Page, request_id: str) -> Locator:
    return page.locator(f"#req-{request_id}")


def appears_without_reload(page: Page, request_id: str) -> Locator:
    """The request's card, once the page's refresh brought it (the page is not reloaded:
    a mark left on the window before survives)."""
    found = card(page, request_id)
    expect(found).to_be_visible(timeout=15_000)
    assert page.evaluate("() => window.__not_reloaded === true")
    return found


def mark_page(page: Page) -> None:
    page.evaluate("() => { window.__not_reloaded = true; }")


def test_a_held_statement_appears_without_reload_and_approve_returns_the_rows(
    ann: Page, console_gw: RunningGateway, table: str
) -> None:
    mark_page(ann)
    held = agent_holds(console_gw, f'DELETE FROM "{table}" WHERE id = 2 RETURNING id, v')
    try:
        rid = held.request_id()
        shown = appears_without_reload(ann, rid)
        expect(shown).to_contain_text("agent:bot on app")
        expect(shown).to_contain_text("ai-agents may not write without approval")
        expect(shown.locator("pre.sql .kw").first).to_have_text("DELETE")
        expect(shown.locator("pre.sql")).to_contain_text(f'DELETE FROM "{table}" WHERE id = 2')
        expect(shown.locator("table.facts")).to_contain_text("DELETE")
        expect(shown.locator("table.facts")).to_contain_text(f"public.{table}")
        expect(shown.locator(".progress")).to_have_text("0 of 1 approvals")
        expect(shown.locator("time.waited")).to_have_text(re.compile(r"^\d+ (s|min \d+ s)$"))
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        ann.screenshot(path=str(SCREENSHOTS / "approvals.png"), full_page=True)
        # Held: nothing ran yet.
        assert held.running and table_rows(console_gw, table) == original_rows()
        shown.get_by_label("Note").fill("checked with the owner")
        shown.get_by_role("button", name=f"Approve {rid}").click()
        expect(ann.get_by_role("status").first).to_contain_text(f"Request {rid} is now approved")
        assert held.done() and held.error is None, held.error
        assert held.result == [(2, "v2")]
        assert table_rows(console_gw, table) == [(1, "v1"), (3, "v3")]
        decided = stored(console_gw, rid)
        assert decided.status == "approved"
        assert [(v.subject, v.note) for v in decided.votes] == [
            ("ann@example.com", "checked with the owner")
        ]
    finally:
        held.close()


def test_deny_returns_the_note_to_the_client_and_nothing_runs(
    ann: Page, console_gw: RunningGateway, table: str
) -> None:
    mark_page(ann)
    held = agent_holds(console_gw, f'DELETE FROM "{table}"')
    try:
        rid = held.request_id()
        shown = appears_without_reload(ann, rid)
        # A write with no WHERE is called out.
        expect(shown.locator("table.facts")).to_contain_text("no WHERE: every row")
        shown.get_by_label("Note").fill("not on a Friday")
        shown.get_by_role("button", name=f"Deny {rid}").click()
        expect(ann.get_by_role("status").first).to_contain_text(f"Request {rid} is now denied")
        assert held.done()
        refused = refusal_of(held.error or AssertionError("not refused"))
        assert "denied by ann@example.com: not on a Friday" in refused.message
        assert table_rows(console_gw, table) == original_rows()
        # The client's session goes on.
        assert simple(held.conn, "SELECT 1") == [(1,)]
    finally:
        held.close()


def test_four_eyes_progress_and_who_sees_buttons(
    ann: Page,
    browser: Browser,
    console_gw: RunningGateway,
    code_flow: CodeFlow,
) -> None:
    name = f"four_eyes_{uuid.uuid4().hex[:8]}"
    mark_page(ann)
    held = agent_holds(console_gw, f'CREATE TABLE "{name}" (id int)')
    bob_context, bob = second_person(browser, console_gw, code_flow, "bob@example.com", ("admins",))
    outsider_context, outsider = second_person(
        browser, console_gw, code_flow, "olga@example.com", ("analysts",)
    )
    agent_context = browser.new_context()
    try:
        rid = held.request_id()
        shown = appears_without_reload(ann, rid)
        expect(shown.locator(".progress")).to_have_text("0 of 2 approvals")
        shown.get_by_role("button", name=f"Approve {rid}").click()
        shown = card(ann, rid)
        expect(shown.locator(".progress")).to_have_text("1 of 2 approvals")
        # Ann voted: no buttons for her any more, and the rules' reason instead.
        expect(shown.get_by_role("button")).to_have_count(0)
        expect(shown.locator(".why-not")).to_contain_text("already voted")
        assert held.running and not table_exists(console_gw, name)

        # The requester, signed in with its own token, sees its request and no buttons.
        own = agent_context.new_page()
        sign_in_with_token(own, console_gw, agent(console_gw))
        own.goto(console_url(console_gw, "/console/approvals"))
        mine = card(own, rid)
        expect(mine).to_be_visible()
        expect(mine.get_by_role("button")).to_have_count(0)
        expect(mine.locator(".why-not")).to_contain_text("may not approve or deny its own request")
        # ...and the server refuses its vote all the same (with a valid CSRF token).
        forced = own.request.post(
            console_url(console_gw, f"/console/approvals/{rid}"),
            form={"verdict": "approve", "csrf_token": csrf_of(own)},
            max_redirects=0,
        )
        assert forced.status == 403

        # Someone of no approving group sees nothing of it, and cannot vote either.
        outsider.reload()
        expect(outsider.get_by_text("Nothing is waiting for you.")).to_be_visible()
        expect(card(outsider, rid)).to_have_count(0)
        forced = outsider.request.post(
            console_url(console_gw, f"/console/approvals/{rid}"),
            form={"verdict": "approve", "csrf_token": csrf_of(outsider)},
            max_redirects=0,
        )
        assert forced.status == 403
        assert stored(console_gw, rid).status == "pending"

        # The second approver settles it; the client's statement runs.
        bob.reload()
        bobs = card(bob, rid)
        expect(bobs.locator(".progress")).to_have_text("1 of 2 approvals")
        bobs.get_by_role("button", name=f"Approve {rid}").click()
        expect(bob.get_by_role("status").first).to_contain_text(f"Request {rid} is now approved")
        assert held.done() and held.error is None, held.error
        assert table_exists(console_gw, name)
        # Ann's page follows without a reload.
        expect(card(ann, rid).locator(".status")).to_contain_text("approved", timeout=15_000)
    finally:
        held.close()
        for context in (bob_context, outsider_context, agent_context):
            context.close()


def csrf_of(page: Page) -> str:
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert token
    return token


@pytest.mark.parametrize("forgery", ["no token", "another session's token", "a wrong token"])
def test_a_forged_post_is_refused_and_changes_nothing(
    ann: Page,
    browser: Browser,
    console_gw: RunningGateway,
    table: str,
    forgery: str,
) -> None:
    held = agent_holds(console_gw, f'DELETE FROM "{table}"')
    other = browser.new_context()
    try:
        rid = held.request_id()
        form: dict[str, Any] = {"verdict": "approve", "note": "forged"}
        if forgery == "another session's token":
            page = other.new_page()
            sign_in_with_token(page, console_gw, console_gw.token("user:mallory", ("engineers",)))
            form["csrf_token"] = csrf_of(page)
        elif forgery == "a wrong token":
            form["csrf_token"] = csrf_of(ann)[:-2] + "xx"
        # Sent with Ann's cookie, as a cross-site form would be.
        refused = ann.request.post(
            console_url(console_gw, f"/console/approvals/{rid}"), form=form, max_redirects=0
        )
        assert refused.status == 403
        assert "CSRF" in refused.text()
        assert stored(console_gw, rid).status == "pending"
        assert stored(console_gw, rid).votes == ()
        assert held.running and table_rows(console_gw, table) == original_rows()
        # The same header check: an X-CSRF-Token of another value is refused too.
        refused = ann.request.post(
            console_url(console_gw, f"/console/approvals/{rid}"),
            form={"verdict": "deny"},
            headers={"X-CSRF-Token": "nope"},
            max_redirects=0,
        )
        assert refused.status == 403
        assert stored(console_gw, rid).status == "pending"
    finally:
        other.close()
        held.close()


def test_a_refresh_keeps_a_note_being_typed_and_the_focus(
    ann: Page, console_gw: RunningGateway, table: str
) -> None:
    mark_page(ann)
    first = agent_holds(console_gw, f'DELETE FROM "{table}"')
    second: Held | None = None
    try:
        one = first.request_id()
        note = appears_without_reload(ann, one).get_by_label("Note")
        note.fill("half a thought")
        note.focus()
        # Refreshes that bring nothing new leave the page alone (two poll intervals pass).
        with ann.expect_response(lambda r: r.url.endswith("/console/approvals/pending")):
            pass
        with ann.expect_response(lambda r: r.url.endswith("/console/approvals/pending")):
            pass
        expect(card(ann, one)).to_be_visible()
        expect(note).to_have_value("half a thought")
        expect(note).to_be_focused()
        # Another request arrives: the list changes under the person's hands.
        second = agent_holds(console_gw, f'UPDATE "{table}" SET v = NULL')
        appears_without_reload(ann, second.request_id())
        expect(note).to_have_value("half a thought")
        expect(note).to_be_focused()
    finally:
        first.close()
        if second is not None:
            second.close()


def test_a_card_that_changes_keeps_what_the_person_typed_chose_and_the_keyboard_focus(
    ann: Page, console_gw: RunningGateway
) -> None:
    """Other approvers vote on the request whose note the person is typing: each refresh
    redraws its card (the progress changed, then the request is decided), and the note, the
    window chosen, the caret and the keyboard focus stay where the person left them."""
    name = f"kept_{uuid.uuid4().hex[:8]}"
    mark_page(ann)
    # DDL by an agent: two approvals needed, so a first vote changes the card, not its form.
    held = agent_holds(console_gw, f'CREATE TABLE "{name}" (id int)')
    try:
        rid = held.request_id()
        shown = appears_without_reload(ann, rid)
        expect(shown.locator(".progress")).to_have_text("0 of 2 approvals")
        shown.get_by_label("Approve for").select_option(label="1 hour")
        # Into the note by keyboard, as a keyboard user gets there; the caret left mid-text.
        shown.get_by_label("Approve for").focus()
        ann.keyboard.press("Shift+Tab")
        note = shown.get_by_label("Note")
        expect(note).to_be_focused()
        ann.keyboard.type("half a thought")
        for _ in range(len(" thought")):
            ann.keyboard.press("ArrowLeft")

        vote(console_gw, rid, console_gw.token("user:zed", ("admins",)))
        expect(card(ann, rid).locator(".progress")).to_have_text("1 of 2 approvals", timeout=15_000)
        note = card(ann, rid).get_by_label("Note")
        expect(note).to_have_value("half a thought")
        expect(note).to_be_focused()
        assert note.evaluate("el => el.matches(':focus-visible')")
        expect(card(ann, rid).get_by_label("Approve for")).to_have_value("3600")
        ann.keyboard.type(" more")
        expect(note).to_have_value("half a more thought")

        # Decided by someone else: the form goes, the card keeps the focus (a Tab goes on
        # from there, not from the top of the page).
        vote(console_gw, rid, console_gw.token("user:yan", ("admins",)))
        expect(card(ann, rid).locator(".status")).to_contain_text("approved", timeout=15_000)
        expect(card(ann, rid)).to_be_focused()
        assert ann.evaluate("() => window.__not_reloaded === true")
        assert held.done() and held.error is None, held.error
    finally:
        held.close()
