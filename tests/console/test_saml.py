"""SAML login: the console's service provider against a real pysaml2 IdP with its own key."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from gateway.console.saml import (
    REQUEST_LIFETIME_SECONDS,
    AuthnRequestLedger,
    SamlLoginRefused,
    SamlServiceProvider,
    SamlSpSettings,
)
from tests.console.saml_idp import Fault, TestIdentityProvider, User

SP_URL = "http://127.0.0.1:8/console"
BROWSER = "browser-cookie-1"


@pytest.fixture(scope="module")
def module_idp(tmp_path_factory: pytest.TempPathFactory) -> TestIdentityProvider:
    return TestIdentityProvider(tmp_path_factory.mktemp("saml-idp"))


@pytest.fixture
def idp(module_idp: TestIdentityProvider) -> Iterator[TestIdentityProvider]:
    yield module_idp
    module_idp.fault = "none"
    module_idp.sign_response_only = False
    module_idp.user = User()


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
    answer = idp.answer(sp.begin_login(BROWSER))
    assert answer.acs_url == f"{SP_URL}/saml/acs"
    person = sp.finish_login(BROWSER, answer.saml_response)
    assert person.subject == "alice@example.com"
    assert person.groups == frozenset({"engineers", "approvers"})
    assert person.display_name == "Alice Example"
    assert person.via == "saml"


def test_groups_come_from_the_configured_attribute(idp: TestIdentityProvider) -> None:
    sp = service_provider(idp, groups_attribute="displayName")
    person = sp.finish_login(BROWSER, idp.answer(sp.begin_login(BROWSER)).saml_response)
    assert person.groups == frozenset({"Alice Example"})
    sp = service_provider(idp, groups_attribute="memberOf")
    person = sp.finish_login(BROWSER, idp.answer(sp.begin_login(BROWSER)).saml_response)
    assert person.groups == frozenset()


def test_a_signed_response_around_an_unsigned_assertion_is_accepted(
    idp: TestIdentityProvider, sp: SamlServiceProvider
) -> None:
    idp.sign_response_only = True
    person = sp.finish_login(BROWSER, idp.answer(sp.begin_login(BROWSER)).saml_response)
    assert person.subject == "alice@example.com"


# Each fault the IdP can put in a response, and the words the refusal must lead with.
REFUSALS: list[tuple[Fault, str]] = [
    ("unsigned", "signature missing or not valid"),
    ("other_key", "signature missing or not valid"),
    ("tampered_nameid", "signature missing or not valid"),
    ("tampered_group", "signature missing or not valid"),
    ("expired", "expired assertion"),
    ("not_yet_valid", "assertion not valid yet"),
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
    assert sp.finish_login(BROWSER, idp.answer_again(answer).saml_response).via == "saml"


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
    assert sp.finish_login(BROWSER, answer.saml_response).subject == "alice@example.com"
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
    assert sp.finish_login("attacker-browser", answer.saml_response).via == "saml"


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
