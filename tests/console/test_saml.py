"""SAML login: the console's service provider against a real pysaml2 IdP with its own key,
directly, over HTTP through a real gateway's admin listener, and in Debian's Chromium."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import Response
from playwright.sync_api import BrowserContext, expect

from cli.localpg import LocalCluster
from gateway.console.deps import ConsoleDeps
from gateway.console.saml import (
    ACS_PATH,
    LOGIN_PATH,
    METADATA_PATH,
    REQUEST_LIFETIME_SECONDS,
    AuthnRequestLedger,
    SamlConfigError,
    SamlLoginRefused,
    SamlServiceProvider,
    SamlSpSettings,
)
from gateway.console.saml_routes import SamlLogin
from gateway.identity.principal import Principal
from gateway.settings import ConsoleSettings, Settings
from tests.console.conftest import console_gateway, console_url
from tests.console.saml_idp import Answer, Fault, TestIdentityProvider, User, make_key_pair
from tests.harness import RunningGateway

SP_URL = "http://127.0.0.1:8/console"
BROWSER = "browser-cookie-1"
SAML_WAY = "Sign in with your identity provider (SAML)"


@pytest.fixture(scope="module")
def served_idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestIdentityProvider]:
    idp = TestIdentityProvider(tmp_path_factory.mktemp("saml-idp"))
    with idp.serve():
        yield idp


@pytest.fixture
def idp(served_idp: TestIdentityProvider) -> Iterator[TestIdentityProvider]:
    """The IdP, honest again after each test."""
    yield served_idp
    served_idp.fault = "none"
    served_idp.sign_response_only = False
    served_idp.user = User()


@pytest.fixture(scope="module")
def saml_gw(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path, served_idp: TestIdentityProvider
) -> Iterator[RunningGateway]:
    """A gateway whose console trusts the test IdP; the IdP trusts it back (its metadata)."""
    console = {"saml_idp_metadata_file": str(served_idp.write_metadata())}
    with console_gateway(pg_cluster, opa_binary, console=console) as gw:
        metadata = httpx.get(console_url(gw, METADATA_PATH))
        assert metadata.status_code == 200
        assert metadata.headers["content-type"].startswith("application/samlmetadata+xml")
        served_idp.register_sp(metadata.text)
        yield gw


@pytest.fixture
def client(saml_gw: RunningGateway) -> Iterator[httpx.Client]:
    """A browser-like client of the console: its own cookies, redirects not followed."""
    with httpx.Client(base_url=console_url(saml_gw, "")) as c:
        yield c


def service_provider(
    idp: TestIdentityProvider,
    *,
    groups_attribute: str = "groups",
    ledger: AuthnRequestLedger | None = None,
) -> SamlServiceProvider:
    sp = SamlServiceProvider(
        SamlSpSettings(
            sp_entity_id=f"{SP_URL}/saml/metadata",
            acs_url=f"{SP_URL}/saml/acs",
            idp_metadata_file=idp.write_metadata(),
            groups_attribute=groups_attribute,
        ),
        ledger,
    )
    idp.register_sp(sp.metadata_xml())
    return sp


@pytest.fixture
def sp(idp: TestIdentityProvider) -> SamlServiceProvider:
    return service_provider(idp)


def test_good_assertion_signs_in_with_groups_from_the_attribute(
    idp: TestIdentityProvider, sp: SamlServiceProvider
) -> None:
    answer = idp.answer(sp.begin_login(BROWSER, "/console/approvals"))
    assert answer.acs_url == f"{SP_URL}/saml/acs"
    person, then = sp.finish_login(BROWSER, answer.saml_response)
    assert then == "/console/approvals"
    assert person.subject == "alice@example.com"
    assert person.groups == frozenset({"engineers", "approvers"})
    assert person.display_name == "Alice Example"
    assert person.via == "saml"


def test_groups_come_from_the_configured_attribute(idp: TestIdentityProvider) -> None:
    sp = service_provider(idp, groups_attribute="displayName")
    person, _ = sp.finish_login(BROWSER, idp.answer(sp.begin_login(BROWSER)).saml_response)
    assert person.groups == frozenset({"Alice Example"})
    sp = service_provider(idp, groups_attribute="memberOf")
    person, _ = sp.finish_login(BROWSER, idp.answer(sp.begin_login(BROWSER)).saml_response)
    assert person.groups == frozenset()


def test_a_signed_response_around_an_unsigned_assertion_is_accepted(
    idp: TestIdentityProvider, sp: SamlServiceProvider
) -> None:
    idp.sign_response_only = True
    person, _ = sp.finish_login(BROWSER, idp.answer(sp.begin_login(BROWSER)).saml_response)
    assert person.subject == "alice@example.com"


def test_idp_metadata_from_a_url_and_signed_authn_requests(
    idp: TestIdentityProvider, tmp_path: Path
) -> None:
    """The IdP's metadata fetched from its URL; with our own key, AuthnRequests are signed
    (HTTP-Redirect's Signature and SigAlg) and our metadata publishes the certificate."""
    keys = make_key_pair(tmp_path, "sp")
    sp = SamlServiceProvider(
        SamlSpSettings(
            sp_entity_id=f"{SP_URL}/saml/metadata",
            acs_url=f"{SP_URL}/saml/acs",
            idp_metadata_url=f"{idp.base_url}/metadata",
            sp_key_file=keys.key_file,
            sp_cert_file=keys.cert_file,
        )
    )
    metadata = sp.metadata_xml()
    assert 'AuthnRequestsSigned="true"' in metadata
    certificate = "".join(keys.cert_file.read_text().splitlines()[1:-1])
    assert certificate in "".join(metadata.split())
    idp.register_sp(metadata)
    location = sp.begin_login(BROWSER)
    query = parse_qs(urlsplit(location).query)
    assert query["SigAlg"] == ["http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"]
    assert query["Signature"][0]
    person, _ = sp.finish_login(BROWSER, idp.answer(location).saml_response)
    assert person.subject == "alice@example.com"


def _signs_in(sp: SamlServiceProvider, idp: TestIdentityProvider) -> bool:
    try:
        sp.finish_login(BROWSER, idp.answer(sp.begin_login(BROWSER)).saml_response)
    except SamlLoginRefused as refused:
        assert "signature" in refused.reason, refused.reason
        return False
    return True


def test_an_idp_metadata_file_rewritten_with_a_rolled_over_certificate_is_read_again(
    tmp_path: Path,
) -> None:
    """The IdP rolls its signing key over and its metadata file is replaced: the next login
    is checked against the new certificate, without a restart; a response signed with the
    old key is refused from then on."""
    idp = TestIdentityProvider(tmp_path)
    sp = service_provider(idp)
    assert _signs_in(sp, idp)
    signed_before = idp.answer(sp.begin_login(BROWSER))
    idp.roll_over_keys()
    assert not _signs_in(sp, idp)  # the file still names the old certificate
    idp.write_metadata()
    assert _signs_in(sp, idp)
    with pytest.raises(SamlLoginRefused, match="signature"):
        sp.finish_login(BROWSER, signed_before.saml_response)


def test_idp_metadata_from_a_url_is_read_again_after_the_refresh_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Metadata from a URL is fetched again once saml_metadata_refresh_seconds have passed
    (an IdP's rolled-over certificate is taken then); a fetch that fails keeps the last
    metadata in use rather than refusing every login."""
    now = [0.0]
    with TestIdentityProvider(tmp_path).serve() as idp:
        sp = SamlServiceProvider(
            SamlSpSettings(
                sp_entity_id=f"{SP_URL}/saml/metadata",
                acs_url=f"{SP_URL}/saml/acs",
                idp_metadata_url=f"{idp.base_url}/metadata",
                metadata_refresh_seconds=60,
            ),
            clock=lambda: now[0],
        )
        idp.register_sp(sp.metadata_xml())
        assert _signs_in(sp, idp)
        idp.roll_over_keys()
        now[0] = 30.0
        assert not _signs_in(sp, idp)  # read 30 s ago: not read again yet
        now[0] = 61.0
        assert _signs_in(sp, idp)
        idp.metadata_down = True
        now[0] = 200.0
        assert _signs_in(sp, idp)  # not fetched: the last metadata stays in use
        assert "SAML IdP metadata not read again" in caplog.text


def test_idp_metadata_over_plain_http_off_loopback_is_refused() -> None:
    """The metadata holds the certificate signatures are checked with: not over plain HTTP."""
    sp = SamlServiceProvider(
        SamlSpSettings(
            sp_entity_id=f"{SP_URL}/saml/metadata",
            acs_url=f"{SP_URL}/saml/acs",
            idp_metadata_url="http://idp.example.com/metadata",
        )
    )
    with pytest.raises(SamlConfigError, match="must be an https URL"):
        sp.begin_login(BROWSER)


# Each fault the IdP can put in a response, and the words the refusal must lead with.
REFUSALS: list[tuple[Fault, str]] = [
    ("unsigned", "signature missing or not valid"),
    ("other_key", "signature missing or not valid"),
    ("tampered_nameid", "signature missing or not valid"),
    ("tampered_group", "signature missing or not valid"),
    ("wrapped_assertion", "not exactly one assertion"),
    ("expired", "expired assertion"),
    ("not_yet_valid", "assertion not valid yet"),
    ("no_expiry", "no expiry"),
    ("wrong_audience", "wrong audience"),
    ("no_audience", "wrong audience"),
    ("wrong_recipient", "wrong recipient"),
    ("wrong_destination", "wrong destination"),
    ("unsolicited", "unsolicited response"),
]


@pytest.mark.parametrize(("fault", "reason"), REFUSALS, ids=[f for f, _ in REFUSALS])
def test_a_faulty_response_is_refused_with_its_reason(
    idp: TestIdentityProvider, sp: SamlServiceProvider, fault: Fault, reason: str
) -> None:
    idp.fault = fault
    answer = idp.answer(sp.begin_login(BROWSER))
    with pytest.raises(SamlLoginRefused) as refused:
        sp.finish_login(BROWSER, answer.saml_response)
    assert refused.value.reason.startswith(reason), refused.value.reason
    # The refusal used nothing up: the same login, answered well, still signs in.
    idp.fault = "none"
    assert sp.finish_login(BROWSER, idp.answer_again(answer).saml_response)[0].via == "saml"


def test_tampering_is_what_breaks_the_signature(
    idp: TestIdentityProvider, sp: SamlServiceProvider
) -> None:
    """The tampered responses differ from a good one only where the fault says."""
    idp.fault = "tampered_group"
    xml = base64.b64decode(idp.answer(sp.begin_login(BROWSER)).saml_response).decode()
    assert ">admins<" in xml and ">engineers<" not in xml
    idp.fault = "tampered_nameid"
    xml = base64.b64decode(idp.answer(sp.begin_login(BROWSER)).saml_response).decode()
    assert "mallory@example.com" in xml and "alice@example.com" not in xml


def test_a_replayed_response_is_refused(idp: TestIdentityProvider, sp: SamlServiceProvider) -> None:
    answer = idp.answer(sp.begin_login(BROWSER))
    assert sp.finish_login(BROWSER, answer.saml_response)[0].subject == "alice@example.com"
    for browser in (BROWSER, "another-browser"):
        with pytest.raises(SamlLoginRefused) as refused:
            sp.finish_login(browser, answer.saml_response)
        assert refused.value.reason.startswith("replayed response"), refused.value.reason


def test_a_response_posted_by_another_browser_is_unsolicited(
    idp: TestIdentityProvider, sp: SamlServiceProvider
) -> None:
    """Login CSRF: a response to a login started elsewhere does not sign this browser in."""
    answer = idp.answer(sp.begin_login("attacker-browser"))
    with pytest.raises(SamlLoginRefused) as refused:
        sp.finish_login(BROWSER, answer.saml_response)
    assert refused.value.reason.startswith("unsolicited response")
    assert sp.finish_login("attacker-browser", answer.saml_response)[0].via == "saml"


def test_a_login_left_at_the_idp_too_long_is_unsolicited(idp: TestIdentityProvider) -> None:
    now = [1000.0]
    sp = service_provider(idp, ledger=AuthnRequestLedger(clock=lambda: now[0]))
    answer = idp.answer(sp.begin_login(BROWSER))
    now[0] += REQUEST_LIFETIME_SECONDS + 1
    with pytest.raises(SamlLoginRefused) as refused:
        sp.finish_login(BROWSER, answer.saml_response)
    assert refused.value.reason.startswith("unsolicited response")


@pytest.mark.parametrize(
    "posted",
    [
        "",
        "!!!not base64",
        base64.b64encode(b"<not xml").decode(),
        base64.b64encode(b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>').decode(),
        base64.b64encode(b"<x/>").decode(),
    ],
    ids=["empty", "not-base64", "not-xml", "entity", "not-a-response"],
)
def test_garbage_is_refused(sp: SamlServiceProvider, posted: str) -> None:
    sp.begin_login(BROWSER)
    with pytest.raises(SamlLoginRefused) as refused:
        sp.finish_login(BROWSER, posted)
    assert refused.value.reason


def test_sp_metadata_names_the_acs_and_the_entity(sp: SamlServiceProvider) -> None:
    metadata = sp.metadata_xml()
    assert f'entityID="{SP_URL}/saml/metadata"' in metadata
    assert f'Location="{SP_URL}/saml/acs"' in metadata
    assert "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST" in metadata


# -- through a real gateway's admin listener, as a browser talks to it ----------------------


def start_login(client: httpx.Client, idp: TestIdentityProvider, then: str = "") -> Answer:
    """Follow the console's SAML link to the IdP and take its answer."""
    started = client.get(LOGIN_PATH + (f"?next={then}" if then else ""))
    assert started.status_code == 303, started.text
    location = started.headers["location"]
    assert location.startswith(f"{idp.base_url}/sso?SAMLRequest=")
    return idp.answer(location)


def post_to_acs(client: httpx.Client, answer: Answer) -> httpx.Response:
    """What the IdP's page makes the browser do: POST the response to our ACS, without the
    console's CSRF token (another site's form cannot have it)."""
    fields = {"SAMLResponse": answer.saml_response, "RelayState": answer.relay_state}
    return client.post(ACS_PATH, data=fields)


def signed_in_name(client: httpx.Client) -> str | None:
    page = client.get("/console/")
    if page.status_code != 200:
        assert page.status_code == 303 and "/console/login" in page.headers["location"]
        return None
    found = re.search(r'class="person-name">([^<]*)<', page.text)
    assert found is not None
    return found.group(1)


def test_login_page_offers_saml(client: httpx.Client) -> None:
    page = client.get("/console/login")
    assert page.status_code == 200
    assert SAML_WAY in page.text
    assert f'href="{LOGIN_PATH}?next=' in page.text


def test_saml_login_over_http_signs_in_and_returns_to_the_wanted_page(
    client: httpx.Client, idp: TestIdentityProvider, saml_gw: RunningGateway
) -> None:
    answer = start_login(client, idp, then="/console/tokens")
    assert answer.acs_url == console_url(saml_gw, ACS_PATH)
    done = post_to_acs(client, answer)
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/console/tokens"
    assert signed_in_name(client) == "Alice Example"
    home = client.get("/console/").text
    assert "via saml" in home and "<code>approvers</code>" in home
    assert "<code>engineers</code>" in home


@pytest.mark.parametrize(("fault", "reason"), REFUSALS, ids=[f for f, _ in REFUSALS])
def test_a_faulty_response_posted_to_the_acs_is_refused_and_signs_nobody_in(
    client: httpx.Client, idp: TestIdentityProvider, fault: Fault, reason: str
) -> None:
    idp.fault = fault
    refused = post_to_acs(client, start_login(client, idp))
    assert refused.status_code == 403
    assert f"Sign-in refused: {reason}" in refused.text
    assert signed_in_name(client) is None


def test_a_replayed_response_over_http_is_refused(
    client: httpx.Client, idp: TestIdentityProvider, saml_gw: RunningGateway
) -> None:
    answer = start_login(client, idp)
    assert post_to_acs(client, answer).status_code == 303
    client.post("/console/logout", data={"csrf_token": csrf_of(client)})
    assert signed_in_name(client) is None
    # The same browser posting it again, and another one (no cookies) holding a copy.
    with httpx.Client(base_url=console_url(saml_gw, "")) as other:
        for browser in (client, other):
            replayed = post_to_acs(browser, answer)
            assert replayed.status_code == 403
            assert "Sign-in refused: replayed response" in replayed.text
            assert signed_in_name(browser) is None


def test_a_response_to_another_browsers_login_is_refused(
    client: httpx.Client, idp: TestIdentityProvider, saml_gw: RunningGateway
) -> None:
    """Login CSRF: an attacker's own login, posted from the victim's browser, is not taken."""
    with httpx.Client(base_url=console_url(saml_gw, "")) as attacker:
        answer = start_login(attacker, idp)
    refused = post_to_acs(client, answer)
    assert refused.status_code == 403
    assert "Sign-in refused: unsolicited response" in refused.text
    assert signed_in_name(client) is None


def test_an_oversized_post_to_the_acs_is_refused(client: httpx.Client) -> None:
    refused = client.post(ACS_PATH, data={"SAMLResponse": "A" * (600 * 1024)})
    assert refused.status_code == 413
    assert signed_in_name(client) is None


def csrf_of(client: httpx.Client) -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/console/").text)
    assert found is not None
    return found.group(1)


# -- in Debian's Chromium -------------------------------------------------------------------


def test_saml_login_in_chromium(
    browser_context: BrowserContext, saml_gw: RunningGateway, idp: TestIdentityProvider
) -> None:
    page = browser_context.new_page()
    page.goto(console_url(saml_gw, "/console/login"))
    page.get_by_role("link", name=SAML_WAY).click()
    # At the IdP: its page posts the signed response back to the console's ACS.
    expect(page).to_have_url(re.compile(re.escape(idp.base_url) + r"/sso\?SAMLRequest="))
    page.get_by_role("button", name="Continue to pgwarden").click()
    page.wait_for_url(console_url(saml_gw, "/console/"))
    expect(page.locator(".person-name")).to_have_text("Alice Example")
    expect(page.get_by_role("banner")).to_contain_text("alice@example.com, via saml")
    expect(page.get_by_role("main")).to_contain_text("approvers")
    expect(page.get_by_role("main")).to_contain_text("engineers")


# -- the pre-login cookie ---------------------------------------------------------------------


async def _no_tokens(token: str) -> Principal:
    raise AssertionError("the SAML routes never verify a pgwarden token")


@pytest.mark.parametrize(
    ("public_url", "expected"),
    [
        # Over TLS the IdP's cross-site POST must bring it: SameSite=None, so Secure.
        (
            "https://console.example.com",
            "__Host-pgwarden_saml=k; HttpOnly; Max-Age=600; Path=/; SameSite=none; Secure",
        ),
        # Plain HTTP is loopback only, where browsers refuse SameSite=None without Secure.
        ("http://127.0.0.1:6544", "pgwarden_saml=k; HttpOnly; Max-Age=600; Path=/; SameSite=lax"),
    ],
)
def test_the_pre_login_cookie_reaches_the_acs_on_a_cross_site_post(
    public_url: str, expected: str
) -> None:
    settings = Settings(console=ConsoleSettings(enabled=True, public_url=public_url))
    login = SamlLogin(ConsoleDeps(settings=settings, verify=_no_tokens))
    response = Response()
    login.set_browser_cookie(response, "k")
    assert response.headers["set-cookie"] == expected
