"""OIDC verification against a real local HTTP issuer whose keys the tests rotate."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.identity.oidc import OidcVerifier
from gateway.identity.principal import TokenRejected

AUDIENCE = "pgwarden-test"
Forge = Callable[[dict[str, Any], dict[str, Any], Callable[[bytes], bytes]], str]
# A test issuer's extra endpoint: (path with query, request headers, body) -> answer.
IssuerRoute = Callable[[str, Message, bytes], tuple[int, dict[str, str], bytes]]


class IssuerKey:
    """A key pair the test issuer publishes (public half) and signs with (private half)."""

    def __init__(self, algorithm: str = "RS256", kid: str | None = None) -> None:
        self.algorithm = algorithm
        self.kid = kid or uuid.uuid4().hex[:8]
        self.private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        if algorithm.startswith("RS"):
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif algorithm == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
            self.jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk |= {"kid": self.kid, "use": "sig"}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(
            claims, self.private, algorithm=self.algorithm, headers={"kid": self.kid} | header
        )


class TestIssuer:
    """A real HTTP server on 127.0.0.1 serving discovery and a JWKS, counting requests."""

    __test__ = False

    def __init__(self) -> None:
        self.keys: list[IssuerKey] = []
        self.requests: list[str] = []
        self.failing = False
        self.claimed_issuer: str | None = None
        # Cache headers sent with the JWKS (e.g. {"Cache-Control": "max-age=120"}).
        self.cache_headers: dict[str, str] = {}
        # More of an IdP for tests that need it (login flows): discovery entries, and
        # handlers by (method, path without query) answering (status, headers, body).
        self.metadata: dict[str, Any] = {}
        self.routes: dict[tuple[str, str], IssuerRoute] = {}
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def _route(self, method: str) -> bool:
                route = issuer.routes.get((method, self.path.split("?")[0]))
                if route is None:
                    return False
                length = int(self.headers.get("Content-Length") or 0)
                status, headers, data = route(self.path, self.headers, self.rfile.read(length))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return True

            def do_POST(self) -> None:
                issuer.requests.append(self.path)
                if issuer.failing:
                    self.send_error(503)
                elif not self._route("POST"):
                    self.send_error(404)

            def do_GET(self) -> None:
                issuer.requests.append(self.path)
                if issuer.failing:
                    self.send_error(503)
                    return
                body: dict[str, Any]
                if self.path == "/.well-known/openid-configuration":
                    body = {
                        "issuer": issuer.claimed_issuer or issuer.url,
                        "jwks_uri": f"{issuer.url}/keys",
                        **issuer.metadata,
                    }
                elif self.path == "/keys":
                    body = {"keys": [k.jwk for k in issuer.keys]}
                elif self._route("GET"):
                    return
                else:
                    self.send_error(404)
                    return
                data = orjson.dumps(body)
                self.send_response(200)
                if self.path == "/keys":
                    for name, value in issuer.cache_headers.items():
                        self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def jwks_fetches(self) -> int:
        return self.requests.count("/keys")

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "alice@example.com",
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "groups": ["engineers"],
        }
        return claims | overrides

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class Clock:
    """Monotonic time the test moves, so refresh rate limits are checked without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def idp() -> Iterator[TestIssuer]:
    server = TestIssuer()
    server.keys.append(IssuerKey("RS256", kid="k1"))
    yield server
    server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=2.0) as client:
        yield client


def _verifier(idp_url: str, http: httpx.AsyncClient, clock: Clock, **options: Any) -> OidcVerifier:
    settings: dict[str, Any] = {
        "algorithms": ["RS256", "ES256", "EdDSA"],
        "min_refresh_seconds": 30.0,
        "leeway_seconds": 5.0,
        "http": http,
        "monotonic": clock,
    }
    return OidcVerifier(idp_url, AUDIENCE, **(settings | options))


async def _rejected(verifier: OidcVerifier, token: str) -> str:
    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token)
    assert token.split(".")[1] not in str(caught.value)
    return caught.value.check


async def test_verifies_a_token_after_discovery(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    verifier = _verifier(idp.url, http, clock)
    claims = idp.claims()
    principal = await verifier.verify(idp.keys[0].sign(claims))
    assert principal.subject == "alice@example.com"
    assert principal.issuer == idp.url
    assert principal.groups == ("engineers",)
    assert principal.token_id == claims["jti"]
    assert principal.expires_at == claims["exp"]
    assert idp.requests == ["/.well-known/openid-configuration", "/keys"]
    # Keys are cached: a second token costs no request.
    await verifier.verify(idp.keys[0].sign(idp.claims()))
    assert len(idp.requests) == 2


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
async def test_elliptic_curve_keys(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock, algorithm: str
) -> None:
    key = IssuerKey(algorithm)
    idp.keys.append(key)
    principal = await _verifier(idp.url, http, clock).verify(key.sign(idp.claims()))
    assert principal.subject == "alice@example.com"


async def test_groups_from_a_nested_claim(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    verifier = _verifier(idp.url, http, clock, groups_claim="realm_access.roles")
    claims = idp.claims(realm_access={"roles": ["admins", "pii-readers"]})
    del claims["groups"]
    principal = await verifier.verify(idp.keys[0].sign(claims))
    assert principal.groups == ("admins", "pii-readers")
    # Absent path: no groups (the policy then denies), not an error.
    principal = await verifier.verify(idp.keys[0].sign(idp.claims()))
    assert principal.groups == ()
    bad = idp.claims(realm_access={"roles": [1, 2]})
    assert await _rejected(verifier, idp.keys[0].sign(bad)) == "malformed groups claim"


async def test_token_without_jti_gets_a_stable_hash_id(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    verifier = _verifier(idp.url, http, clock)
    claims = idp.claims()
    del claims["jti"]
    token = idp.keys[0].sign(claims)
    first = await verifier.verify(token)
    assert first.token_id == "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    assert (await verifier.verify(token)).token_id == first.token_id
    other = idp.keys[0].sign(claims | {"exp": claims["exp"] + 1})
    assert (await verifier.verify(other)).token_id != first.token_id


async def test_new_kid_triggers_a_refetch(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    verifier = _verifier(idp.url, http, clock)
    await verifier.verify(idp.keys[0].sign(idp.claims()))
    assert idp.jwks_fetches() == 1
    rotated = IssuerKey("RS256", kid="k2")
    idp.keys.append(rotated)
    clock.now += 31
    principal = await verifier.verify(rotated.sign(idp.claims()))
    assert principal.subject == "alice@example.com"
    assert idp.jwks_fetches() == 2
    # Discovery is not repeated for a key refresh.
    assert idp.requests.count("/.well-known/openid-configuration") == 1


async def test_refetch_is_rate_limited(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    verifier = _verifier(idp.url, http, clock)
    await verifier.verify(idp.keys[0].sign(idp.claims()))
    rotated = IssuerKey("RS256", kid="k2")
    idp.keys.append(rotated)
    # Within the window an unknown kid is refused without asking the issuer again.
    for _ in range(10):
        assert await _rejected(verifier, rotated.sign(idp.claims())) == "unknown signing key"
    assert idp.jwks_fetches() == 1
    clock.now += 29
    assert await _rejected(verifier, rotated.sign(idp.claims())) == "unknown signing key"
    assert idp.jwks_fetches() == 1
    clock.now += 1
    await verifier.verify(rotated.sign(idp.claims()))
    assert idp.jwks_fetches() == 2
    # Made-up kids cannot make the gateway hammer the issuer.
    stranger = IssuerKey("RS256", kid="never-published")
    for _ in range(10):
        assert await _rejected(verifier, stranger.sign(idp.claims())) == "unknown signing key"
    assert idp.jwks_fetches() == 2


async def test_concurrent_first_verifies_share_one_fetch(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    verifier = _verifier(idp.url, http, clock)
    tokens = [idp.keys[0].sign(idp.claims()) for _ in range(20)]
    await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert idp.jwks_fetches() == 1


async def test_removed_key_is_rejected_after_refresh(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    verifier = _verifier(idp.url, http, clock)
    old = idp.keys[0]
    old_token = old.sign(idp.claims())
    await verifier.verify(old_token)
    new = IssuerKey("RS256", kid="k2")
    idp.keys[:] = [new]
    clock.now += 31
    await verifier.verify(new.sign(idp.claims()))  # unknown kid → refetch without k1
    assert await _rejected(verifier, old_token) == "unknown signing key"


async def test_key_set_is_refetched_when_old(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    verifier = _verifier(idp.url, http, clock, max_key_age_seconds=300)
    old_token = idp.keys[0].sign(idp.claims())
    await verifier.verify(old_token)
    idp.keys[:] = [IssuerKey("RS256", kid="k2")]
    clock.now += 301
    assert await _rejected(verifier, old_token) == "unknown signing key"
    assert idp.jwks_fetches() == 2


async def test_issuer_down_before_any_key_is_unreachable(
    http: httpx.AsyncClient, clock: Clock
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port now.
    verifier = _verifier(f"http://127.0.0.1:{port}", http, clock)
    key = IssuerKey("RS256")
    now = int(time.time())
    claims = {"iss": f"http://127.0.0.1:{port}", "aud": AUDIENCE, "sub": "x", "exp": now + 60}
    assert await _rejected(verifier, key.sign(claims)) == "issuer unreachable"


async def test_issuer_failing_keeps_known_keys_and_refuses_new_ones(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    verifier = _verifier(idp.url, http, clock, max_key_age_seconds=60)
    await verifier.verify(idp.keys[0].sign(idp.claims()))
    idp.failing = True
    clock.now += 61
    # The stale set still verifies what it knows rather than locking everyone out.
    assert (await verifier.verify(idp.keys[0].sign(idp.claims()))).subject
    stranger = IssuerKey("RS256", kid="k9")
    clock.now += 31
    assert await _rejected(verifier, stranger.sign(idp.claims())) == "issuer unreachable"


async def test_discovery_naming_another_issuer_is_refused(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    idp.claimed_issuer = "https://evil.example.com"
    verifier = _verifier(idp.url, http, clock)
    assert await _rejected(verifier, idp.keys[0].sign(idp.claims())) == "issuer metadata invalid"
    assert idp.jwks_fetches() == 0


@pytest.mark.parametrize(
    ("overrides", "from_now", "check"),
    [
        ({"aud": "another-app"}, {}, "wrong audience"),
        ({"iss": "https://other-idp.example.com"}, {}, "wrong issuer"),
        # Times from when the test runs, not from collection: a suite that ran for more
        # than ten minutes before this test made an nbf taken at collection a past one.
        ({}, {"exp": -60}, "token expired"),
        ({}, {"nbf": 600}, "token not yet valid"),
    ],
)
async def test_claim_checks(
    idp: TestIssuer,
    http: httpx.AsyncClient,
    clock: Clock,
    overrides: dict[str, Any],
    from_now: dict[str, int],
    check: str,
) -> None:
    now = int(time.time())
    claims = overrides | {name: now + seconds for name, seconds in from_now.items()}
    token = idp.keys[0].sign(idp.claims(**claims))
    assert await _rejected(_verifier(idp.url, http, clock), token) == check


async def test_leeway_applies_to_expiry(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    token = idp.keys[0].sign(idp.claims(exp=int(time.time()) - 2))
    assert (await _verifier(idp.url, http, clock, leeway_seconds=5).verify(token)).subject


async def test_signature_from_another_key_with_a_known_kid(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    impostor = IssuerKey("RS256", kid="k1")
    token = impostor.sign(idp.claims())
    assert await _rejected(_verifier(idp.url, http, clock), token) == "bad signature"


async def test_algorithm_outside_the_allow_list(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    verifier = _verifier(idp.url, http, clock, algorithms=["ES256"])
    assert await _rejected(verifier, idp.keys[0].sign(idp.claims())) == "algorithm not allowed"


async def test_header_algorithm_must_match_the_key_type(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    # Signed ES256 but naming the RSA key's kid: the JWK's kty decides, not the header.
    ec_key = IssuerKey("ES256", kid="k1")
    token = ec_key.sign(idp.claims())
    assert await _rejected(_verifier(idp.url, http, clock), token) == "algorithm not allowed"


async def test_alg_none_and_hs256_with_the_public_key(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock, forge: Forge
) -> None:
    verifier = _verifier(idp.url, http, clock)
    unsigned = forge({"alg": "none", "kid": "k1"}, idp.claims(), lambda _: b"")
    assert await _rejected(verifier, unsigned) == "algorithm not allowed"
    public_pem = (
        idp.keys[0]
        .private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for secret in (public_pem, orjson.dumps(idp.keys[0].jwk)):

        def keyed(data: bytes, key: bytes = secret) -> bytes:
            return hmac.new(key, data, hashlib.sha256).digest()

        token = forge(
            {"alg": "HS256", "kid": "k1"},
            idp.claims(),
            keyed,
        )
        assert await _rejected(verifier, token) == "algorithm not allowed"


@pytest.mark.parametrize("algorithms", [["HS256"], ["RS256", "none"], ["HS512", "ES256"], []])
def test_unsafe_algorithm_lists_are_refused(algorithms: list[str]) -> None:
    with pytest.raises(ValueError, match="oidc_algorithms"):
        OidcVerifier("https://idp.example.com", AUDIENCE, algorithms=algorithms)


def test_audience_is_required() -> None:
    with pytest.raises(ValueError, match="oidc_audience"):
        OidcVerifier("https://idp.example.com", "", algorithms=["RS256"])


def test_plain_http_issuer_only_on_loopback() -> None:
    with pytest.raises(ValueError, match="https"):
        OidcVerifier("http://idp.example.com", AUDIENCE, algorithms=["RS256"])


# -- the key set's lifetime follows the JWKS response's cache headers, within bounds ----------


@pytest.mark.parametrize(
    ("headers", "lifetime"),
    [
        ({"Cache-Control": "public, max-age=120"}, 120),
        ({"Cache-Control": "max-age=120", "Age": "20"}, 100),
        ({"Cache-Control": "max-age=86400"}, 600),  # the ceiling
        ({"Cache-Control": "max-age=5"}, 30),  # the floor
        ({"Cache-Control": "no-store"}, 30),
        ({"Expires": "in 240 s"}, 240),  # against the response's own Date
        ({"Expires": "0"}, 30),  # invalid: already expired
        ({}, 600),  # silent: the ceiling
    ],
)
async def test_withdrawn_key_is_dropped_when_the_cache_lifetime_ends(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock, headers: dict[str, str], lifetime: int
) -> None:
    if headers.get("Expires") == "in 240 s":
        headers = {"Expires": email.utils.formatdate(time.time() + 240, usegmt=True)}
    idp.cache_headers = headers
    verifier = _verifier(idp.url, http, clock, min_refresh_seconds=30, max_key_age_seconds=600)
    old_token = idp.keys[0].sign(idp.claims())
    principal = await verifier.verify(old_token)
    idp.keys[:] = [IssuerKey("RS256", kid="k2")]  # k1 withdrawn
    clock.now += lifetime - 2  # (HTTP dates have whole seconds)
    await verifier.verify(old_token)  # still within the lifetime: not asked again
    assert verifier.still_valid(principal) is None
    assert idp.jwks_fetches() == 1
    clock.now += 2
    assert await _rejected(verifier, old_token) == "unknown signing key"
    assert idp.jwks_fetches() == 2
    # The session that k1 verified ends at its next check; the change is reported once.
    assert verifier.still_valid(principal) == "signing key withdrawn"
    assert verifier.keys_changed() is True
    assert verifier.keys_changed() is False


async def test_key_set_is_refreshed_on_schedule_without_tokens(
    idp: TestIssuer, http: httpx.AsyncClient
) -> None:
    """No token needs to arrive: the background refresh drops a withdrawn key by itself, and
    the sessions it verified are found invalid."""
    idp.cache_headers = {"Cache-Control": "max-age=0"}
    verifier = OidcVerifier(
        idp.url,
        AUDIENCE,
        algorithms=["RS256"],
        min_refresh_seconds=0.2,
        max_key_age_seconds=5,
        http=http,
    )
    principal = await verifier.verify(idp.keys[0].sign(idp.claims()))
    verifier.start()
    try:
        idp.keys[:] = [IssuerKey("RS256", kid="k2")]
        deadline = time.monotonic() + 5
        while verifier.still_valid(principal) is None:
            assert time.monotonic() < deadline, "the withdrawn key was never dropped"
            await asyncio.sleep(0.05)
        assert verifier.still_valid(principal) == "signing key withdrawn"
        assert verifier.keys_changed() is True
    finally:
        await verifier.aclose()


async def test_failed_refresh_withdraws_nothing(
    idp: TestIssuer, http: httpx.AsyncClient, clock: Clock
) -> None:
    verifier = _verifier(idp.url, http, clock)
    principal = await verifier.verify(idp.keys[0].sign(idp.claims()))
    idp.failing = True
    clock.now += 3601
    await _rejected(verifier, IssuerKey("RS256", kid="k9").sign(idp.claims()))
    assert verifier.still_valid(principal) is None
