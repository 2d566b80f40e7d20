"""Verifies tokens from an OpenID Connect issuer against its discovered, cached signing keys."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import orjson
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.identity.checks import (
    ALGORITHM_NOT_ALLOWED,
    BAD_GROUPS,
    ISSUER_METADATA_INVALID,
    ISSUER_UNREACHABLE,
    MALFORMED,
    SIGNING_KEY_WITHDRAWN,
    UNKNOWN_SIGNING_KEY,
    ClaimChecks,
    expiry_rejection,
)
from gateway.identity.principal import Principal, TokenRejected
from gateway.identity.unverified import peek
from gateway.settings import IdentitySettings

log = logging.getLogger(__name__)

# Which JWK may verify which JWS algorithm: (kty, allowed crv values or None for RSA).
# Symmetric algorithms are absent on purpose: a public key must never become an HMAC secret.
_KEY_TYPE_OF: dict[str, tuple[str, frozenset[str] | None]] = {
    **{a: ("RSA", None) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "ES256K": ("EC", frozenset({"secp256k1"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}

_FROM_JWK: dict[str, Callable[[Any], Any]] = {
    "RSA": RSAAlgorithm.from_jwk,
    "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
}


def allowed_algorithms(names: Sequence[str]) -> frozenset[str]:
    """The configured allow-list, refusing `none`, HMAC and anything without a JWK key type."""
    refused = [n for n in names if n not in _KEY_TYPE_OF]
    if refused:
        raise ValueError(f"identity.oidc_algorithms: not allowed for OIDC: {', '.join(refused)}")
    if not names:
        raise ValueError("identity.oidc_algorithms must name at least one algorithm")
    return frozenset(names)


def groups_at(claims: Mapping[str, Any], path: str) -> tuple[str, ...]:
    """The groups at a dotted claim path (`groups`, `realm_access.roles`); none if absent."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return ()
        value = value[part]
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(g, str) for g in value):
        return tuple(value)
    raise TokenRejected(BAD_GROUPS)


def _require_secure(url: str, what: str) -> None:
    # Keys fetched over plain HTTP could be swapped in transit; only loopback is exempt.
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback:
        raise ValueError(f"{what} must be an https URL (http only for loopback): {url}")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One verification key from the issuer's JWKS, its key object built once."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: Any
    # What names this key in a Principal: its kid, else a digest of its JWK.
    ident: str = ""

    def verifies(self, algorithm: str) -> bool:
        kty, curves = _KEY_TYPE_OF[algorithm]
        if self.kty != kty or (curves is not None and self.crv not in curves):
            return False
        return self.alg is None or self.alg == algorithm


def _signing_keys(jwks: Any) -> list[SigningKey]:
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ValueError("the JWKS has no `keys` list")
    keys = []
    for jwk in jwks["keys"]:
        if not isinstance(jwk, dict):
            continue
        kty = jwk.get("kty")
        # Keys for encryption, symmetric keys and private keys are never used to verify.
        if jwk.get("use", "sig") != "sig" or kty not in _FROM_JWK or "d" in jwk:
            continue
        try:
            key = _FROM_JWK[kty](jwk)
        except (jwt.InvalidKeyError, ValueError, KeyError, TypeError):
            log.warning("skipping an unreadable JWK (kid %r)", jwk.get("kid"))
            continue
        kid, crv, alg = jwk.get("kid"), jwk.get("crv"), jwk.get("alg")
        kid = kid if isinstance(kid, str) else None
        digest = hashlib.sha256(orjson.dumps(jwk, option=orjson.OPT_SORT_KEYS)).hexdigest()
        keys.append(
            SigningKey(
                kid,
                kty,
                crv if isinstance(crv, str) else None,
                alg if isinstance(alg, str) else None,
                key,
                kid if kid is not None else f"jwk:{digest[:32]}",
            )
        )
    return keys


def cache_lifetime(headers: httpx.Headers, now: float) -> float | None:
    """How long the response may be used, by its Cache-Control max-age (less its Age) or
    its Expires; 0 for no-store/no-cache; None when it says nothing."""
    directives: dict[str, str] = {}
    for part in headers.get("cache-control", "").split(","):
        name, _, value = part.strip().partition("=")
        if name:
            directives[name.lower()] = value.strip().strip('"')
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    if "max-age" in directives:
        try:
            age = float(headers.get("age", "0") or 0)
            return max(0.0, float(int(directives["max-age"])) - age)
        except ValueError:
            return 0.0  # unreadable: as short as allowed
    expires = headers.get("expires")
    if expires is not None:
        try:
            until = email.utils.parsedate_to_datetime(expires).timestamp()
        except (TypeError, ValueError):
            return 0.0  # RFC 9111: an invalid Expires means already expired
        date = headers.get("date")
        try:
            base = email.utils.parsedate_to_datetime(date).timestamp() if date else now
        except (TypeError, ValueError):
            base = now
        return max(0.0, until - base)
    return None


class IssuerKeys:
    """The issuer's signing keys: discovered once, refetched when a token names an unknown
    key id or when the set's lifetime ran out (the JWKS response's cache headers, bounded
    by `min_refresh_seconds` and `max_age_seconds`), never more often than the former.
    `keep_fresh()` refetches on that schedule even while no token arrives, so a key the
    issuer withdraws is dropped, and sessions it verified can be ended, within the lifetime."""

    def __init__(
        self,
        issuer: str,
        http: httpx.AsyncClient,
        *,
        min_refresh_seconds: float,
        max_age_seconds: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issuer = issuer
        self._http = http
        self._min_refresh = min_refresh_seconds
        self._max_age = max_age_seconds
        self._monotonic = monotonic
        self._jwks_uri: str | None = None
        self._keys: list[SigningKey] = []
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._attempts = 0
        self._last_failure: str | None = None
        self._lock = asyncio.Lock()
        # How long the last key set may be used (clamped cache lifetime of its response).
        self._lifetime = max_age_seconds
        self._changed = False

    def _stale(self) -> bool:
        return self._fetched_at is None or self._monotonic() - self._fetched_at >= self._lifetime

    def refresh_due_in(self) -> float:
        """Seconds until the key set should be fetched again: when its lifetime ends (at once
        if there is none yet), never sooner than the floor after the last attempt."""
        due = 0.0
        if self._fetched_at is not None and self._last_failure is None:
            due = self._fetched_at + self._lifetime
        if self._attempted_at is not None:
            due = max(due, self._attempted_at + self._min_refresh)
        return max(due - self._monotonic(), 0.0)

    async def keep_fresh(self) -> None:
        """Refetch the key set whenever its lifetime runs out; runs until cancelled."""
        while True:
            await asyncio.sleep(self.refresh_due_in())
            try:
                await self._refresh()
            except Exception as exc:  # keep the schedule: the next attempt may succeed
                log.warning("OIDC key refresh for %s failed: %r", self._issuer, exc)

    def changed(self) -> bool:
        """True once after a fetch that added or withdrew keys."""
        changed, self._changed = self._changed, False
        return changed

    def withdrawn(self, ident: str) -> bool:
        """Whether the key named `ident` is gone from the issuer's current key set (a set
        that could not be fetched withdraws nothing)."""
        return self._fetched_at is not None and all(k.ident != ident for k in self._keys)

    async def key_for(self, kid: str | None, algorithm: str) -> SigningKey:
        if self._stale():
            await self._refresh()
        found = self._find(kid, algorithm)
        if found is None:
            await self._refresh()
            found = self._find(kid, algorithm)
        if found is not None:
            return found
        # With no usable key set, the honest answer is that the issuer could not be reached.
        if self._last_failure is not None:
            raise TokenRejected(self._last_failure)
        raise TokenRejected(UNKNOWN_SIGNING_KEY)

    def _find(self, kid: str | None, algorithm: str) -> SigningKey | None:
        if kid is not None:
            return next((k for k in self._keys if k.kid == kid), None)
        # No kid in the header: only unambiguous when exactly one key fits the algorithm.
        fitting = [k for k in self._keys if k.verifies(algorithm)]
        return fitting[0] if len(fitting) == 1 else None

    async def _refresh(self) -> None:
        """Fetch the keys unless fetched within min_refresh_seconds; concurrent callers wait
        for the one fetch in flight instead of starting their own."""
        attempts = self._attempts
        async with self._lock:
            if self._attempts != attempts:
                return  # a fetch finished while this caller waited: use its result
            now = self._monotonic()
            if self._attempted_at is not None and now - self._attempted_at < self._min_refresh:
                return
            self._attempted_at = now
            self._attempts += 1
            try:
                if self._jwks_uri is None:
                    self._jwks_uri = await self._discover()
                response = await self._get(self._jwks_uri)
                keys = _signing_keys(response.json())
            except httpx.HTTPError as exc:
                log.warning("OIDC issuer %s unreachable: %s", self._issuer, exc)
                self._last_failure = ISSUER_UNREACHABLE
                return
            except ValueError as exc:
                log.warning("OIDC issuer %s metadata invalid: %s", self._issuer, exc)
                self._last_failure = ISSUER_METADATA_INVALID
                return
            if {k.ident for k in keys} != {k.ident for k in self._keys}:
                self._changed = self._fetched_at is not None
            self._keys = keys
            self._fetched_at = now
            self._last_failure = None
            lifetime = cache_lifetime(response.headers, time.time())
            self._lifetime = min(
                max(self._max_age if lifetime is None else lifetime, self._min_refresh),
                self._max_age,
            )

    async def _discover(self) -> str:
        url = self._issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await self._get_json(url)
        if not isinstance(document, dict) or document.get("issuer") != self._issuer:
            raise ValueError("the discovery document names a different issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise ValueError("the discovery document has no jwks_uri")
        _require_secure(jwks_uri, "jwks_uri")
        return jwks_uri

    async def _get_json(self, url: str) -> Any:
        return (await self._get(url)).json()

    async def _get(self, url: str) -> httpx.Response:
        response = await self._http.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        return response


class OidcVerifier:
    """Verifies an OIDC issuer's tokens: allowed algorithm matching the key, signature,
    iss, aud, exp, nbf (with leeway); groups come from a configurable dotted claim."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        algorithms: Sequence[str],
        groups_claim: str = "groups",
        min_refresh_seconds: float = 30.0,
        max_key_age_seconds: float = 3600.0,
        leeway_seconds: float = 30.0,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        _require_secure(issuer, "identity.oidc_issuer")
        if not audience:
            # Without an audience check any token the IdP minted for any app would pass.
            raise ValueError("identity.oidc_audience must be set when oidc_issuer is")
        self.issuer = issuer
        self._algorithms = allowed_algorithms(algorithms)
        self._groups_claim = groups_claim
        self._leeway = leeway_seconds
        self._clock = clock
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(5.0))
        self._keys = IssuerKeys(
            issuer,
            self._http,
            min_refresh_seconds=min_refresh_seconds,
            max_age_seconds=max_key_age_seconds,
            monotonic=monotonic,
        )
        self._checks = ClaimChecks(issuer, audience, leeway_seconds, ("iss", "aud", "sub", "exp"))
        self._refresher: asyncio.Future[None] | None = None

    @classmethod
    def from_settings(
        cls, identity: IdentitySettings, *, http: httpx.AsyncClient | None = None
    ) -> OidcVerifier:
        return cls(
            identity.oidc_issuer,
            identity.oidc_audience,
            algorithms=identity.oidc_algorithms,
            groups_claim=identity.oidc_groups_claim,
            min_refresh_seconds=identity.oidc_jwks_min_refresh_seconds,
            max_key_age_seconds=identity.oidc_jwks_max_refresh_seconds,
            leeway_seconds=identity.leeway_seconds,
            http=http,
        )

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._owns_http:
            await self._http.aclose()

    async def verify(self, token: str) -> Principal:
        header = peek(token).header
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise TokenRejected(ALGORITHM_NOT_ALLOWED)
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected(MALFORMED)
        key = await self._keys.key_for(kid, algorithm)
        if not key.verifies(algorithm):
            raise TokenRejected(ALGORITHM_NOT_ALLOWED)
        claims = self._checks.verified_claims(token, key.key, algorithm)
        jti = claims.get("jti")
        # Without a jti the token itself is the identity; its hash is stable and reveals nothing.
        token_id = jti if isinstance(jti, str) and jti else _token_hash(token)
        return Principal(
            subject=claims["sub"],
            issuer=self.issuer,
            groups=groups_at(claims, self._groups_claim),
            token_id=token_id,
            expires_at=float(claims["exp"]),
            claims=claims,
            key_id=key.ident,
        )

    def start(self) -> None:
        """Keep the key set fresh in the background (on the running loop) until aclose()."""
        if self._refresher is None:
            self._refresher = asyncio.ensure_future(self._keys.keep_fresh())

    def keys_changed(self) -> bool:
        """True once after the issuer added or withdrew signing keys."""
        return self._keys.changed()

    def still_valid(self, principal: Principal) -> str | None:
        # IdP tokens cannot be revoked here: the IdP bounds them by their expiry, and by
        # withdrawing the key that signed them.
        expired = expiry_rejection(principal.expires_at, self._clock(), self._leeway)
        if expired is not None:
            return expired
        if principal.key_id is not None and self._keys.withdrawn(principal.key_id):
            return SIGNING_KEY_WITHDRAWN
        return None


def _token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()
