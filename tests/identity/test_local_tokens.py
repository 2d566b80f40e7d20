"""Local tokens: issue → verify, each way a token can fail, revocation across processes."""

from __future__ import annotations

import asyncio
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

from gateway.control.client import ControlClient
from gateway.control.mirror import ControlMirror
from gateway.identity.local import LocalTokenIssuer, LocalTokenVerifier
from gateway.identity.principal import Principal, TokenRejected
from gateway.identity.registry import TokenRecord
from gateway.identity.signing_key import LocalSigningKey, SigningKeyError
from gateway.settings import Settings
from tests.harness import identity_verifier

CONTROL_DB = Path("control.sqlite3")
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
    with ControlClient(settings) as registry:
        registry.record_token(TokenRecord(claims["jti"], claims["sub"], ("ai-agents",), 0.0, 1e12))
    return jwt.encode(claims, key or registry_key.private_key, algorithm="EdDSA")


async def _rejected(verifier: LocalTokenVerifier, token: str) -> str:
    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token)
    # The check name alone: never the token, nor any part of it.
    for part in token.split("."):
        assert len(part) < 3 or part not in str(caught.value)
    return caught.value.check


async def test_issue_then_verify_round_trip(
    issuer: LocalTokenIssuer, local_verifier: LocalTokenVerifier, settings: Settings
) -> None:
    issued = issuer.issue("agent:ci", ["ai-agents", "readers"], 3600)
    principal = await local_verifier.verify(issued.token)
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
    # The control database, its write-ahead log included.
    raw = b"".join(
        p.read_bytes() for p in settings.state_dir.glob(f"{CONTROL_DB.name}*") if p.is_file()
    )
    assert issued.token.encode() not in raw
    assert issued.token.split(".")[2].encode() not in raw
    assert issued.record.jti.encode() in raw


async def test_signature_by_another_key(
    settings: Settings, local_verifier: LocalTokenVerifier
) -> None:
    token = _signed(settings, _claims(settings), key=Ed25519PrivateKey.generate())
    assert await _rejected(local_verifier, token) == "bad signature"


async def test_tampered_claims_break_the_signature(
    issuer: LocalTokenIssuer, local_verifier: LocalTokenVerifier
) -> None:
    header, _, signature = issuer.issue("agent:ci", ["ai-agents"], 60).token.split(".")
    forged = issuer.issue("agent:ci", ["admins"], 60).token.split(".")[1]
    assert await _rejected(local_verifier, f"{header}.{forged}.{signature}") == "bad signature"


async def test_expired(settings: Settings, local_verifier: LocalTokenVerifier) -> None:
    past = int(time.time()) - 3600
    claims = _claims(settings, iat=past, nbf=past, exp=past + 60)
    assert await _rejected(local_verifier, _signed(settings, claims)) == "token expired"


async def test_expiry_within_leeway_is_accepted(
    settings: Settings, local_verifier: LocalTokenVerifier
) -> None:
    now = int(time.time())
    claims = _claims(settings, iat=now - 100, nbf=now - 100, exp=now - 5)
    assert (await local_verifier.verify(_signed(settings, claims))).subject == "agent:ci"


async def test_not_yet_valid(settings: Settings, local_verifier: LocalTokenVerifier) -> None:
    claims = _claims(settings, nbf=int(time.time()) + 600)
    assert await _rejected(local_verifier, _signed(settings, claims)) == "token not yet valid"


async def test_wrong_issuer(settings: Settings, local_verifier: LocalTokenVerifier) -> None:
    token = _signed(settings, _claims(settings, iss="someone-else"))
    assert await _rejected(local_verifier, token) == "wrong issuer"


async def test_wrong_audience(settings: Settings, local_verifier: LocalTokenVerifier) -> None:
    token = _signed(settings, _claims(settings, aud="another-service"))
    assert await _rejected(local_verifier, token) == "wrong audience"


async def test_missing_expiry(settings: Settings, local_verifier: LocalTokenVerifier) -> None:
    claims = _claims(settings)
    del claims["exp"]
    assert await _rejected(local_verifier, _signed(settings, claims)) == "missing claim exp"


async def test_alg_none(
    settings: Settings, local_verifier: LocalTokenVerifier, forge: Forge
) -> None:
    token = forge({"alg": "none", "typ": "JWT"}, _claims(settings), lambda _: b"")
    assert await _rejected(local_verifier, token) == "algorithm not allowed"


async def test_hs256_keyed_with_the_public_key(
    settings: Settings, local_verifier: LocalTokenVerifier, forge: Forge
) -> None:
    key = LocalSigningKey.load_or_create(settings.state_path(Path("signing-key.pem")))
    for encoding, fmt in (
        (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        (serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    ):
        secret = key.public_key.public_bytes(encoding, fmt)

        def sign(data: bytes, s: bytes = secret) -> bytes:
            return hmac.new(s, data, hashlib.sha256).digest()

        token = forge({"alg": "HS256", "typ": "JWT"}, _claims(settings), sign)
        assert await _rejected(local_verifier, token) == "algorithm not allowed"


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
async def test_malformed(local_verifier: LocalTokenVerifier, token: str) -> None:
    assert await _rejected(local_verifier, token) == "malformed token"


async def test_malformed_through_the_verifier(settings: Settings) -> None:
    async with identity_verifier(settings) as verifier:
        for token in ["", "x", "a.b", "a.b.c", "e30.W10.", "x" * 10_000 + ".a.b"]:
            with pytest.raises(TokenRejected) as caught:
                await verifier.verify(token)
            assert caught.value.check == "malformed token"
        # Over identity.max_token_bytes it is refused for its size before being read.
        with pytest.raises(TokenRejected) as caught:
            await verifier.verify("x" * 20_000 + ".a.b")
        assert caught.value.check == "token too large"


async def _seen_within(verifier: LocalTokenVerifier, principal: Principal, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while (why := verifier.still_valid(principal)) is None:
        assert time.monotonic() < deadline, f"revocation not seen within {seconds} s"
        await asyncio.sleep(0.05)
    return why


async def test_revoked_by_another_registry_handle(
    issuer: LocalTokenIssuer, local_verifier: LocalTokenVerifier, settings: Settings
) -> None:
    issued = issuer.issue("agent:ci", ["ai-agents"], 3600)
    principal = await local_verifier.verify(issued.token)
    with ControlClient(settings) as registry:
        registry.revoke_token(issued.record.jti)
    assert await _seen_within(local_verifier, principal, 1.5) == "token revoked"
    assert await _rejected(local_verifier, issued.token) == "token revoked"


async def test_revocation_by_another_process_is_seen_within_about_a_second(
    issuer: LocalTokenIssuer, local_verifier: LocalTokenVerifier, settings: Settings
) -> None:
    issued = issuer.issue("agent:ci", ["ai-agents"], 3600)
    principal = await local_verifier.verify(issued.token)
    # A plain sqlite3 connection, as another process (the CLI) would write.
    other = sqlite3.connect(settings.state_path(CONTROL_DB))
    with other:
        other.execute(
            "UPDATE tokens SET revoked_at = ? WHERE jti = ?", (time.time(), issued.record.jti)
        )
    other.close()
    assert await _seen_within(local_verifier, principal, 1.5) == "token revoked"
    assert await _rejected(local_verifier, issued.token) == "token revoked"


async def test_token_issued_by_another_process_is_accepted_at_once(
    issuer: LocalTokenIssuer, local_verifier: LocalTokenVerifier, settings: Settings
) -> None:
    await local_verifier.verify(issuer.issue("agent:ci", [], 60).token)  # the cache is now warm
    other_issuer = LocalTokenIssuer.from_settings(settings)
    token = other_issuer.issue("svc:new", [], 60).token
    other_issuer.close()
    assert (await local_verifier.verify(token)).subject == "svc:new"


async def test_signed_but_never_registered_is_refused(
    settings: Settings, local_verifier: LocalTokenVerifier
) -> None:
    key = LocalSigningKey.load_or_create(settings.state_path(Path("signing-key.pem")))
    token = jwt.encode(_claims(settings), key.private_key, algorithm="EdDSA")
    assert await _rejected(local_verifier, token) == "unknown token"


async def test_remembered_token_still_expires(settings: Settings, mirror: ControlMirror) -> None:
    clock = [time.time()]
    with ControlClient(settings) as registry:
        key = LocalSigningKey.load_or_create(settings.state_path(Path("signing-key.pem")))
        identity = settings.identity
        issuer = LocalTokenIssuer(
            key, registry, issuer=identity.local_issuer, audience=identity.local_audience
        )
        verifier = LocalTokenVerifier(
            key,
            mirror,
            issuer=identity.local_issuer,
            audience=identity.local_audience,
            leeway_seconds=0,
            clock=lambda: clock[0],
        )
        issued = issuer.issue("agent:ci", [], 60)
        principal = await verifier.verify(issued.token)
        assert await verifier.verify(issued.token) == principal  # served from memory
        clock[0] += 61
        assert verifier.still_valid(principal) == "token expired"
        assert await _rejected(verifier, issued.token) == "token expired"


def test_issue_refuses_empty_subject_and_zero_lifetime(issuer: LocalTokenIssuer) -> None:
    with pytest.raises(ValueError, match="subject"):
        issuer.issue(" ", [], 60)
    with pytest.raises(ValueError, match="lifetime"):
        issuer.issue("agent:ci", [], 0)


def test_revoking_twice_keeps_the_first_time(issuer: LocalTokenIssuer, settings: Settings) -> None:
    issued = issuer.issue("agent:ci", [], 60)
    with ControlClient(settings) as registry:
        first = registry.revoke_token(issued.record.jti, at=100.0)
        again = registry.revoke_token(issued.record.jti, at=200.0)
        assert first.revoked_at == again.revoked_at == 100.0
        assert again.status(time.time()) == "revoked"


async def test_registry_reports_a_revocation_once_whoever_noticed_it(
    settings: Settings, mirror: ControlMirror
) -> None:
    """The gateway's watch asks revocations_changed() whether to recheck open sessions; a
    login's fresh look may have read the revocation first, and the change must still show."""
    now = time.time()
    with ControlClient(settings) as cli:
        for jti in ("a", "b"):
            cli.record_token(TokenRecord(jti, "agent:x", (), now, now + 60))
        assert await mirror.fresh_rejection("a") is None
        await mirror.refresh()
        assert mirror.revocations_changed() is False
        cli.revoke_token("a")
        assert await mirror.fresh_rejection("a") == "token revoked"  # a login saw it first
        assert mirror.rejection("a") == "token revoked"  # so does every statement since
        assert mirror.revocations_changed() is True  # and the watch still learns of it
        await mirror.refresh()
        assert mirror.revocations_changed() is False
        cli.revoke_token("b")
        await mirror.refresh()  # the poll
        assert mirror.revocations_changed() is True
        assert mirror.rejection("b") == "token revoked"
