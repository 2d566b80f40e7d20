"""Console browser tests: real headless Chromium from Debian's packages (driven by Playwright
for Python, never a downloaded browser), a real gateway with its admin listener serving the
console, and pages signed in as a person."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from cli.localpg import LocalCluster, free_port
from tests.console.idp import CodeFlow, code_flow_issuer, oidc_settings
from tests.harness import RunningGateway, start_gateway, stop_gateway
from tests.integration import simple
from tests.integration.approvals import Held, agent

CHROMIUM = Path("/usr/bin/chromium")
# Each run saves the pages it drove here (in the state directory, not tracked: request ids
# and times differ per run); docs/screenshots/ holds the copies the README shows.
SCREENSHOTS = Path(__file__).resolve().parents[2] / ".pgwarden" / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium per test module (scripts/ensure-chromium.sh installs it); each
    test has a context of its own (`browser_context`). Not one for the whole package: sync
    Playwright holds the thread's running event loop while it lives, and the asyncio tests
    of test_web_session could not run meanwhile."""
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} missing: run scripts/ensure-chromium.sh (or make test)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            launched.close()


@contextlib.contextmanager
def console_gateway(cluster: LocalCluster, opa: Path, **overrides: Any) -> Iterator[RunningGateway]:
    """A real gateway whose admin listener (plain HTTP on loopback) serves the console;
    `overrides` are settings sections merged over the harness's (console={...} included)."""
    state = Path(tempfile.mkdtemp(prefix="pgwarden-console-"))
    console = {"enabled": True, **overrides.pop("console", {})}
    admin = {"host": "127.0.0.1", "port": free_port(), **overrides.pop("admin", {})}
    gw = start_gateway(state, cluster, opa, console=console, admin=admin, **overrides)
    try:
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="package")
def code_flow() -> Iterator[CodeFlow]:
    """The tests' own OIDC issuer, serving the authorization code flow (shared: a test that
    makes it misbehave puts it right again, see test_console_oidc's `_honest_issuer`)."""
    issuer, flow = code_flow_issuer()
    try:
        yield flow
    finally:
        issuer.stop()


@pytest.fixture(scope="package")
def console_gw(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path, code_flow: CodeFlow
) -> Iterator[RunningGateway]:
    """A gateway serving the console, trusting `code_flow`'s issuer for OIDC sign-in;
    statements the policy holds for approval wait up to 60 s for a person. One for all the
    console modules: no test needs it fresh (each makes its own tables, tokens and
    requests, and looks for those by their ids), and a gateway start is seconds each."""
    with console_gateway(
        pg_cluster, opa_binary, approval={"wait_seconds": 60}, **oidc_settings(code_flow.issuer)
    ) as gw:
        yield gw


def console_url(gw: RunningGateway, path: str = "/console/") -> str:
    assert gw.gateway.admin is not None and gw.gateway.admin.address is not None
    host, port = gw.gateway.admin.address
    return f"http://{host}:{port}{path}"


def sign_in_with_token(page: Page, gw: RunningGateway, token: str) -> None:
    """Sign `page` in through the login page's token form, as a person would."""
    page.goto(console_url(gw, "/console/login"))
    page.get_by_label("Token", exact=True).fill(token)
    page.get_by_role("button", name="Sign in with token").click()
    page.wait_for_url("**/console/**")


def sign_in_with_oidc(
    page: Page,
    gw: RunningGateway,
    flow: CodeFlow,
    subject: str,
    groups: tuple[str, ...],
    name: str,
    then: str = "/console/",
) -> None:
    """Sign `page` in through the test issuer as `subject` (the issuer logs them in at once)."""
    flow.person = {"sub": subject, "name": name}
    flow.groups = list(groups)
    page.goto(console_url(gw, f"/console/login?next={then}"))
    page.get_by_role("link", name="Sign in with your identity provider (OIDC)").click()
    page.wait_for_url(console_url(gw, then))


@pytest.fixture
def browser_context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh context (its own cookies) per test."""
    context = browser.new_context()
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def signed_in_page(browser_context: BrowserContext, console_gw: RunningGateway) -> Page:
    """A page signed in (token login) as person:alice of the approvers and admins groups."""
    page = browser_context.new_page()
    token = console_gw.token("person:alice", ("approvers", "admins"))
    sign_in_with_token(page, console_gw, token)
    return page


def agent_holds(gw: RunningGateway, sql: str) -> Held:
    """An ai-agents client sending `sql`, held for approval (a Query it waits on)."""
    return Held(gw.dsn(agent(gw)), lambda c: simple(c, sql))
