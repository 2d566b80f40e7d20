"""`pgwarden login --via console`: the gateway's own device grant for identity providers
without one (SAML). The CLI runs as a person runs it; the person confirms its code on
/console/device in real Chromium, signed in to the console (the token login standing in
for SAML: the page takes whoever the console signed in); then psql connects with
`service=app` alone. A refusal gives the CLI nothing; a forged confirmation without the CSRF
token issues no token."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from playwright.sync_api import Browser

from cli.localpg import LocalCluster
from tests.cli.test_login import PGWARDEN, marked_passwords, mode, person_env, psql
from tests.console.conftest import console_gateway, console_url, sign_in_with_token
from tests.harness import RunningGateway

pytestmark = pytest.mark.server

# Short, so the CLI polls several times in well under a second each (the CLI's own tests).
INTERVAL = 0.2


@pytest.fixture(scope="module")
def device_gw(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[RunningGateway]:
    with console_gateway(pg_cluster, opa_binary, console={"device_poll_seconds": INTERVAL}) as gw:
        yield gw


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


class WaitingLogin:
    """`pgwarden login app --via console` running; `shown()` waits for the code it shows
    (the CLI takes seconds to start: the browser signs in meanwhile)."""

    def __init__(self, gw: RunningGateway, home: Path) -> None:
        self.process = subprocess.Popen(
            [
                str(PGWARDEN),
                "login",
                "app",
                "--via",
                "console",
                "--gateway-url",
                console_url(gw, "").rstrip("/"),
                "--sslrootcert",
                str(gw.certs.ca_cert),
            ],
            env=person_env(home),
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def shown(self) -> tuple[str, str]:
        """The URL and the code the CLI shows the person."""
        assert self.process.stdout is not None
        shown = self.process.stdout.readline() + self.process.stdout.readline()
        found = re.search(r"open (\S+)\s+and confirm the code (\S+)", shown)
        assert found is not None, shown
        return found.group(1), found.group(2)

    def finish(self) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=60)
        return self.process.returncode, out, err


def test_a_person_confirms_on_the_console_and_psql_connects(
    device_gw: RunningGateway, browser: Browser, home: Path
) -> None:
    waiting = WaitingLogin(device_gw, home)
    context = browser.new_context()
    try:
        page = context.new_page()
        # A pasted token living 30 minutes: what it confirms may not live longer.
        pasted = device_gw.token("person:alice", ("engineers",), ttl=1800)
        sign_in_with_token(page, device_gw, pasted)
        url, user_code = waiting.shown()
        assert url == console_url(device_gw, f"/console/device?user_code={user_code}")
        page.goto(url)
        assert user_code in page.locator("main").inner_text()
        page.get_by_role("button", name="Confirm sign-in").click()
        page.get_by_role("status").wait_for()
        assert "Confirmed" in page.get_by_role("status").inner_text()
    finally:
        context.close()
    code, out, err = waiting.finish()
    assert code == 0, err
    assert "signed in as person:alice (engineers)" in out
    services, pgpass = home / ".pg_service.conf", home / ".pgpass"
    assert mode(services) == 0o600 and mode(pgpass) == 0o600
    [line] = marked_passwords(pgpass)
    claims = jwt.decode(line.rsplit(":", 1)[1], options={"verify_signature": False})
    assert (claims["sub"], claims["groups"]) == ("person:alice", ["engineers"])
    pasted_expiry = jwt.decode(pasted, options={"verify_signature": False})["exp"]
    assert pasted_expiry - 60 <= claims["exp"] <= pasted_expiry
    ran = psql(home, "service=app")
    assert (ran.returncode, ran.stdout.strip()) == (0, "42"), ran.stderr


def test_refused_on_the_console_the_cli_gets_nothing(
    device_gw: RunningGateway, browser: Browser, home: Path
) -> None:
    waiting = WaitingLogin(device_gw, home)
    context = browser.new_context()
    try:
        page = context.new_page()
        sign_in_with_token(page, device_gw, device_gw.token("person:alice", ("engineers",)))
        url, _ = waiting.shown()
        page.goto(url)
        page.get_by_role("button", name="Refuse").click()
        page.get_by_role("status").wait_for()
    finally:
        context.close()
    code, _, err = waiting.finish()
    assert code == 1
    assert "the sign-in was refused at the pgwarden console (access_denied)" in err
    assert not (home / ".pg_service.conf").exists() and not (home / ".pgpass").exists()


def test_a_confirmation_without_the_csrf_token_is_refused(console_gw: RunningGateway) -> None:
    """Asked for a code as the CLI asks (its own tests run the CLI): a forged confirmation
    leaves the code waiting, and its device code is still given no token."""
    grant = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code"}
    with httpx.Client(base_url=console_url(console_gw, ""), timeout=10) as http:
        device = http.post("/login/device").json()
        # Signed in (the session cookie), but the form lacks the session's CSRF token:
        # what another site could make the person's browser send.
        page = http.get("/console/login")
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert csrf is not None
        token = console_gw.token("person:mallory", ("engineers",))
        signed = http.post(
            "/console/login/token", data={"token": token, "csrf_token": csrf.group(1)}
        )
        assert signed.status_code == 303
        forged = http.post(
            "/console/device", data={"user_code": device["user_code"], "decision": "confirm"}
        )
        assert forged.status_code == 403
        # The code still waits: no token was issued by the forged request.
        shown = http.get("/console/device", params={"user_code": device["user_code"]})
        assert shown.status_code == 200 and "Confirm sign-in" in shown.text
        polled = http.post(
            "/login/device/token", data=grant | {"device_code": device["device_code"]}
        )
        assert (polled.status_code, polled.json()["error"]) == (400, "authorization_pending")
        assert "access_token" not in polled.json() and "token" not in polled.json()


def test_the_token_endpoint_speaks_rfc_8628(console_gw: RunningGateway) -> None:
    """On a gateway with the default interval (5 s): a poll "at once" is sooner than that
    however loaded the machine (with the CLI tests' 0.2 s, a slow second request was not)."""
    base = console_url(console_gw, "").rstrip("/")
    interval = console_gw.settings.console.device_poll_seconds
    assert interval >= 5
    with httpx.Client(base_url=base, timeout=10) as http:
        device = http.post("/login/device").json()
        assert re.fullmatch(r"[B-Z]{4}-[B-Z]{4}", device["user_code"])
        assert device["interval"] == interval
        grant = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code"}
        first = http.post(
            "/login/device/token", data=grant | {"device_code": device["device_code"]}
        )
        assert (first.status_code, first.json()["error"]) == (400, "authorization_pending")
        # Asked again at once: sooner than the interval.
        again = http.post(
            "/login/device/token", data=grant | {"device_code": device["device_code"]}
        )
        assert again.json()["error"] == "slow_down"
        unknown = http.post("/login/device/token", data=grant | {"device_code": "nope"})
        assert unknown.json()["error"] == "invalid_grant"
        wrong = http.post("/login/device/token", data={"device_code": device["device_code"]})
        assert wrong.json()["error"] == "unsupported_grant_type"
