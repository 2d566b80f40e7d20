"""Local tokens: issue → verify, each way a token can fail, revocation across processes."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.identity.local import LocalTokenIssuer, LocalTokenVerifier
from gateway.identity.principal import Principal, TokenRejected
from gateway.identity.registry import TokenRecord, TokenRegistry
from gateway.identity.signing_key import LocalSigningKey, SigningKeyError
from gateway.identity.verifier import IdentityVerifier
from gateway.settings import Settings

Forge = Callable[[dict[str, Any], dict[str, Any], Callable[[bytes], bytes]], str]


def _claims(settings: Settings, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.identity.local_issuer,
        "aud": settings.identity.local_audience,
        "sub": "agent:ci",
        "groups": ["ai-agents"],
        "jti": str(uuid.uuid4()),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return claims


def _signed(
    settings: Settings, claims: dict[str, Any], key: Ed25519PrivateKey | None = None
) -> str:
    """A token over `claims` signed with the state dir's key (or `key`), its jti registered."""
    registry_key = LocalSigningKey.load_or_create(settings.state_path(Path("signing-key.pem")))
    with TokenRegistry(settings.state_path(Path("tokens.sqlite3"))) as registry:
        registry.record(TokenRecord(claims["jti"], claims["sub"], ("ai-agents",), 0.0, 1e12))
    return jwt.encode(claims, key or registry_key.private_key, algorithm="EdDSA")


def _rejected(verifier: LocalTokenVerifier, token: str) -> str:
    with pytest.raises(TokenRejected) as caught:
        verifier.verify(token)
    # The check name alone: never the token, nor any part of it.
    for part in token.split("."):
        assert len(part) < 3 or part not in str(caught.value)
    return caught.value.check


def test_issue_then_verify_round_trip(
    issuer: LocalTokenIssuer, local_verifier: LocalTokenVerifier, settings: Settings
) -> None:
    issued = issuer.issue("agent:ci", ["ai-agents", "readers"], 3600)
    principal = local_verifier.verify(issued.token)
    assert principal.subject == "agent:ci"
    assert principal.issuer == settings.identity.local_issuer
    assert principal.groups == ("ai-agents", "readers")
    assert principal.token_id == issued.record.jti
    assert principal.expires_at == issued.record.expires_at
    assert principal.claims["aud"] == settings.identity.local_audience
    assert jwt.get_unverified_header(issued.token)["alg"] == "EdDSA"
    assert local_verifier.still_valid(principal) is None
    uuid.UUID(principal.token_id)  # a uuid4, so ids never collide across gateways


def test_token_has_every_required_claim(issuer: LocalTokenIssuer) -> None:
    claims = jwt.decode(issuer.issue("svc:a", [], 60).token, options={"verify_signature": False})
    assert set(claims) == {"iss", "aud", "sub", "groups", "jti", "iat", "nbf", "exp"}
    assert claims["exp"] - claims["iat"] == 60
    assert claims["groups"] == []


def test_signing_key_is_private_created_once_and_reused(settings: Settings) -> None:
    path = settings.state_path(Path("signing-key.pem"))
    first = LocalSigningKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = LocalSigningKey.load_or_create(path)
    assert first.kid == second.kid
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_signing_key_readable_by_others_is_refused(settings: Settings) -> None:
    path = settings.state_path(Path("signing-key.pem"))
    LocalSigningKey.load_or_create(path)
    path.chmod(0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        LocalSigningKey.load_or_create(path)


def test_registry_never_stores_the_token(issuer: LocalTokenIssuer, settings: Settings) -> None:
    issued = issuer.issue("agent:ci", ["ai-agents"], 3600)
    raw = settings.state_path(Path("tokens.sqlite3")).read_bytes()
    assert issued.token.encode() not in raw
    assert issued.token.split(".")[2].encode() not in raw
    assert issued.record.jti.encode() in raw


def test_signature_by_another_key(settings: Settings, local_verifier: LocalTokenVerifier) -> None:
    token = _signed(settings, _claims(settings), key=Ed25519PrivateKey.generate())
    assert _rejected(local_verifier, token) == "bad signature"


def test_tampered_claims_break_the_signature(
    issuer: LocalTokenIssuer, local_verifier: LocalTokenVerifier
) -> None:
    header, _, signature = issuer.issue("agent:ci", ["ai-agents"], 60).token.split(".")
    forged = issuer.issue("agent:ci", ["admins"], 60).token.split(".")[1]
    assert _rejected(local_verifier, f"{header}.{forged}.{signature}") == "bad signature"


def test_expired(settings: Settings, local_verifier: LocalTokenVerifier) -> None:
    past = int(time.time()) - 3600
    claims = _claims(settings, iat=past, nbf=past, exp=past + 60)
    assert _rejected(local_verifier, _signed(settings, claims)) == "token expired"


def test_expiry_within_leeway_is_accepted(
    settings: Settings, local_verifier: LocalTokenVerifier
) -> None:
    now = int(time.time())
    claims = _claims(settings, iat=now - 100, nbf=now - 100, exp=now - 5)
    assert local_verifier.verify(_signed(settings, claims)).subject == "agent:ci"


def test_not_yet_valid(settings: Settings, local_verifier: LocalTokenVerifier) -> None:
    claims = _claims(settings, nbf=int(time.time()) + 600)
    assert _rejected(local_verifier, _signed(settings, claims)) == "token not yet valid"


def test_wrong_issuer(settings: Settings, local_verifier: LocalTokenVerifier) -> None:
    token = _signed(settings, _claims(settings, iss="someone-else"))
    assert _rejected(local_verifier, token) == "wrong issuer"


def test_wrong_audience(settings: Settings, local_verifier: LocalTokenVerifier) -> None:
    token = _signed(settings, _claims(settings, aud="another-service"))
    assert _rejected(local_verifier, token) == "wrong audience"


def test_missing_expiry(settings: Settings, local_verifier: LocalTokenVerifier) -> None:
    claims = _claims(settings)
    del claims["exp"]
    assert _rejected(local_verifier, _signed(settings, claims)) == "missing claim exp"


def test_alg_none(settings: Settings, local_verifier: LocalTokenVerifier, forge: Forge) -> None:
    token = forge({"alg": "none", "typ": "JWT"}, _claims(settings), lambda _: b"")
    assert _rejected(local_verifier, token) == "algorithm not allowed"


def test_hs256_keyed_with_the_public_key(
    settings: Settings, local_verifier: LocalTokenVerifier, forge: Forge
) -> None:
    key = LocalSigningKey.load_or_create(settings.state_path(Path("signing-key.pem")))
    for encoding, fmt in (
        (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        (serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    ):
        secret = key.public_key.public_bytes(encoding, fmt)

        def keyed(data: bytes, key: bytes = secret) -> bytes:
            return hmac.new(key, data, hashlib.sha256).digest()

        token = forge(
            {"alg": "HS256", "typ": "JWT"},
            _claims(settings),
            keyed,
        )
        assert _rejected(local_verifier, token) == "algorithm not allowed"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "...",
        "eyJhbGciOiJFZERTQSJ9.%%%.sig",
        "eyJhbGciOiJFZERTQSJ9.W10.c2ln",  # payload is a JSON array
        "e30.e30.",  # empty header: no alg
        "ünïcode.x.y",
    ],
)
def test_malformed(local_verifier: LocalTokenVerifier, token: str) -> None:
    assert _rejected(local_verifier, token) == "malformed token"


async def test_malformed_through_the_verifier(settings: Settings) -> None:
    verifier = IdentityVerifier.from_settings(settings)
    try:
        for token in ["", "x", "a.b", "a.b.c", "e30.W10.", "x" * 10_000 + ".a.b"]:
            with pytest.raises(TokenRejected) as caught:
                await verifier.verify(token)
            assert caught.value.check == "malformed token"
        # Over identity.max_token_bytes it is refused for its size before being read.
        with pytest.raises(TokenRejected) as caught:
            await verifier.verify("x" * 20_000 + ".a.b")
        assert caught.value.check == "token too large"
    finally:
        await verifier.aclose()


def _seen_within(verifier: LocalTokenVerifier, principal: Principal, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while (why := verifier.still_valid(principal)) is None:
        assert time.monotonic() < deadline, f"revocation not seen within {seconds} s"
        time.sleep(0.05)
    return why


def test_revoked_by_another_registry_handle(
    issuer: LocalTokenIssuer, local_verifier: LocalTokenVerifier, settings: Settings
) -> None:
    issued = issuer.issue("agent:ci", ["ai-agents"], 3600)
    principal = local_verifier.verify(issued.token)
    with TokenRegistry(settings.state_path(Path("tokens.sqlite3"))) as registry:
        registry.revoke(issued.record.jti)
    assert _seen_within(local_verifier, principal, 1.5) == "token revoked"
    assert _rejected(local_verifier, issued.token) == "token revoked"


def test_revocation_by_another_process_is_seen_within_about_a_second(
    issuer: LocalTokenIssuer, local_verifier: LocalTokenVerifier, settings: Settings
) -> None:
    issued = issuer.issue("agent:ci", ["ai-agents"], 3600)
    principal = local_verifier.verify(issued.token)
    # A plain sqlite3 connection, as another process (the CLI) would write.
    other = sqlite3.connect(settings.state_path(Path("tokens.sqlite3")))
    with other:
        other.execute(
            "UPDATE tokens SET revoked_at = ? WHERE jti = ?", (time.time(), issued.record.jti)
        )
    other.close()
    assert _seen_within(local_verifier, principal, 1.5) == "token revoked"
    assert _rejected(local_verifier, issued.token) == "token revoked"


def test_token_issued_by_another_process_is_accepted_at_once(
    issuer: LocalTokenIssuer, local_verifier: LocalTokenVerifier, settings: Settings
) -> None:
    local_verifier.verify(issuer.issue("agent:ci", [], 60).token)  # the cache is now warm
    other_issuer = LocalTokenIssuer.from_settings(settings)
    token = other_issuer.issue("svc:new", [], 60).token
    other_issuer.close()
    assert local_verifier.verify(token).subject == "svc:new"


def test_signed_but_never_registered_is_refused(
    settings: Settings, local_verifier: LocalTokenVerifier
) -> None:
    key = LocalSigningKey.load_or_create(settings.state_path(Path("signing-key.pem")))
    token = jwt.encode(_claims(settings), key.private_key, algorithm="EdDSA")
    assert _rejected(local_verifier, token) == "unknown token"


def test_remembered_token_still_expires(settings: Settings) -> None:
    clock = [time.time()]
    with TokenRegistry(settings.state_path(Path("tokens.sqlite3"))) as registry:
        key = LocalSigningKey.load_or_create(settings.state_path(Path("signing-key.pem")))
        identity = settings.identity
        issuer = LocalTokenIssuer(
            key, registry, issuer=identity.local_issuer, audience=identity.local_audience
        )
        verifier = LocalTokenVerifier(
            key,
            registry,
            issuer=identity.local_issuer,
            audience=identity.local_audience,
            leeway_seconds=0,
            clock=lambda: clock[0],
        )
        issued = issuer.issue("agent:ci", [], 60)
        principal = verifier.verify(issued.token)
        assert verifier.verify(issued.token) == principal  # served from memory
        clock[0] += 61
        assert verifier.still_valid(principal) == "token expired"
        assert _rejected(verifier, issued.token) == "token expired"


def test_issue_refuses_empty_subject_and_zero_lifetime(issuer: LocalTokenIssuer) -> None:
    with pytest.raises(ValueError, match="subject"):
        issuer.issue(" ", [], 60)
    with pytest.raises(ValueError, match="lifetime"):
        issuer.issue("agent:ci", [], 0)


def test_revoking_twice_keeps_the_first_time(issuer: LocalTokenIssuer, settings: Settings) -> None:
    issued = issuer.issue("agent:ci", [], 60)
    with TokenRegistry(settings.state_path(Path("tokens.sqlite3"))) as registry:
        first = registry.revoke(issued.record.jti, at=100.0)
        again = registry.revoke(issued.record.jti, at=200.0)
        assert first.revoked_at == again.revoked_at == 100.0
        assert again.status(time.time()) == "revoked"


def test_registry_reports_a_revocation_once_whoever_noticed_it(settings: Settings) -> None:
    """The gateway's watch asks refresh() whether to recheck open sessions; a statement's
    check on the way may have read the revocation first, and the change must still show."""
    path = settings.state_path(Path("tokens.sqlite3"))
    now = time.time()
    with TokenRegistry(path, recheck_seconds=0) as gateway_view, TokenRegistry(path) as cli:
        for jti in ("a", "b"):
            cli.record(TokenRecord(jti, "agent:x", (), now, now + 60))
        assert gateway_view.rejection("a") is None
        gateway_view.refresh()
        assert gateway_view.refresh() is False
        cli.revoke("a")
        assert gateway_view.rejection("a") == "token revoked"  # a statement's check saw it
        assert gateway_view.refresh() is True  # and the watch still learns of it
        assert gateway_view.refresh() is False
        gateway_view.revoke("b")  # its own commit
        assert gateway_view.refresh() is True
