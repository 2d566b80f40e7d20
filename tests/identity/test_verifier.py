"""The gateway's TokenVerifier: routes by issuer, refuses strangers, rechecks open sessions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

from gateway.control.client import ControlClient
from gateway.identity.local import LocalTokenIssuer
from gateway.identity.principal import Principal, TokenRejected
from gateway.identity.verifier import IdentityVerifier
from gateway.settings import Settings, load_settings
from tests.harness import identity_verifier
from tests.identity.test_oidc import AUDIENCE, IssuerKey, TestIssuer


@pytest.fixture
def idp() -> Iterator[TestIssuer]:
    server = TestIssuer()
    server.keys.append(IssuerKey("ES256", kid="k1"))
    yield server
    server.stop()


@pytest.fixture
async def verifier(settings: Settings, idp: TestIssuer) -> AsyncIterator[IdentityVerifier]:
    with_oidc = load_settings(
        state_dir=settings.state_dir,
        identity={"oidc_issuer": idp.url, "oidc_audience": AUDIENCE},
    )
    async with identity_verifier(with_oidc) as verifier:
        yield verifier


if TYPE_CHECKING:
    from gateway.proxy.ports import TokenVerifier

    # Checked by mypy: the proxy's port accepts this verifier.
    def _as_port(verifier: IdentityVerifier) -> TokenVerifier:
        return verifier


async def test_routes_local_and_oidc_tokens(
    verifier: IdentityVerifier, issuer: LocalTokenIssuer, idp: TestIssuer
) -> None:
    local = await verifier.verify(issuer.issue("agent:ci", ["ai-agents"], 60).token)
    assert (local.issuer, local.groups) == ("pgwarden", ("ai-agents",))
    oidc = await verifier.verify(idp.keys[0].sign(idp.claims()))
    assert (oidc.issuer, oidc.groups) == (idp.url, ("engineers",))
    assert verifier.still_valid(local) is None
    assert verifier.still_valid(oidc) is None


async def test_unknown_or_missing_issuer_is_refused(
    verifier: IdentityVerifier, idp: TestIssuer
) -> None:
    key = idp.keys[0]
    no_issuer = idp.claims()
    del no_issuer["iss"]
    for claims in (idp.claims(iss="https://stranger.example.com"), no_issuer):
        with pytest.raises(TokenRejected) as caught:
            await verifier.verify(key.sign(claims))
        assert caught.value.check == "wrong issuer"
    assert idp.requests == []  # a stranger's token never makes the gateway call out


async def test_local_issuer_name_with_an_idp_signature_is_refused(
    verifier: IdentityVerifier, idp: TestIssuer
) -> None:
    token = idp.keys[0].sign(idp.claims(iss="pgwarden", aud="pgwarden"))
    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token)
    assert caught.value.check == "algorithm not allowed"  # local tokens are EdDSA only


async def test_still_valid_reports_expiry_and_revocation(
    verifier: IdentityVerifier, issuer: LocalTokenIssuer, settings: Settings, idp: TestIssuer
) -> None:
    issued = issuer.issue("agent:ci", [], 60)
    principal = await verifier.verify(issued.token)
    with ControlClient(settings) as registry:
        registry.revoke_token(issued.record.jti)
    deadline = time.monotonic() + 1.5
    while verifier.still_valid(principal) is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert verifier.still_valid(principal) == "token revoked"
    long_gone = Principal("alice", idp.url, (), "t1", expires_at=time.time() - 3600)
    assert verifier.still_valid(long_gone) == "token expired"
    assert verifier.still_valid(Principal("x", "elsewhere", (), "t2", None)) == "wrong issuer"


async def test_settings_that_weaken_verification_are_refused(settings: Settings) -> None:
    for identity in (
        {"oidc_issuer": "https://idp.example.com", "oidc_audience": ""},
        {
            "oidc_issuer": "https://idp.example.com",
            "oidc_audience": "a",
            "oidc_algorithms": ["HS256"],
        },
        {
            "oidc_issuer": "https://idp.example.com",
            "oidc_audience": "a",
            "local_issuer": "https://idp.example.com",
        },
    ):
        weak = load_settings(state_dir=settings.state_dir, identity=identity)
        with pytest.raises(ValueError):
            async with identity_verifier(weak):
                pass
