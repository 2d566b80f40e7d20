"""Issues and verifies the gateway's own EdDSA tokens, for agents and services without an IdP."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import jwt

from gateway.identity.checks import BAD_GROUPS, MALFORMED, ClaimChecks, expiry_rejection
from gateway.identity.principal import Principal, TokenRejected
from gateway.identity.registry import TokenRecord
from gateway.identity.signing_key import SIGNING_KEY_FILE, LocalSigningKey
from gateway.identity.unverified import peek
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.control.client import ControlClient

ALGORITHM = "EdDSA"
# Clients that reconnect per transaction (pgbench -C, serverless functions) present the same
# token again and again; remembering verified ones skips the ~100 µs signature check.
VERIFIED_CACHE_SIZE = 4096
_REQUIRED = ("iss", "aud", "sub", "jti", "iat", "nbf", "exp")


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    record: TokenRecord


def open_signing_key(settings: Settings) -> LocalSigningKey:
    return LocalSigningKey.load_or_create(settings.state_path(SIGNING_KEY_FILE))


class TokenBook(Protocol):
    """Where an issued token is recorded (the control store, from synchronous code)."""

    def record_token(self, token: TokenRecord) -> None: ...

    def close(self) -> None: ...


class RegistryView(Protocol):
    """The token registry as a gateway reads it (gateway/control/mirror.py)."""

    async def fresh_rejection(self, jti: str) -> str | None:
        """None if `jti` was issued and is not revoked, as the store says now; else the
        failed check. Raises ControlStoreUnavailable when the store cannot be asked."""
        ...

    def rejection(self, jti: str) -> str | None:
        """REVOKED if `jti` is among the revocations read last (no I/O)."""
        ...

    def revocations_changed(self) -> bool: ...

    def revoked_count(self) -> int: ...


def open_token_book(settings: Settings) -> ControlClient:
    from gateway.control.client import ControlClient

    return ControlClient(settings)


class LocalTokenSigner:
    """Signs the gateway's own tokens; recording them is the caller's (LocalTokenIssuer
    from synchronous code, the admin listener's login exchange on the gateway's loop)."""

    def __init__(
        self,
        key: LocalSigningKey,
        *,
        issuer: str,
        audience: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._issuer = issuer
        self._audience = audience
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalTokenSigner:
        return cls(
            open_signing_key(settings),
            issuer=settings.identity.local_issuer,
            audience=settings.identity.local_audience,
        )

    def sign(self, subject: str, groups: Sequence[str], ttl_seconds: float) -> IssuedToken:
        """A signed token and its registry record, not yet recorded: every verifier refuses
        it until the record is in the registry."""
        if not subject.strip():
            raise ValueError("the subject must not be empty")
        if any(not g.strip() for g in groups):
            raise ValueError("group names must not be empty")
        if ttl_seconds < 1:
            raise ValueError("the lifetime must be at least one second")
        now = int(self._clock())
        record = TokenRecord(
            jti=str(uuid.uuid4()),
            subject=subject,
            groups=tuple(dict.fromkeys(groups)),
            issued_at=float(now),
            expires_at=float(now + int(ttl_seconds)),
        )
        claims = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": record.subject,
            "groups": list(record.groups),
            "jti": record.jti,
            "iat": now,
            "nbf": now,
            "exp": int(record.expires_at),
        }
        token = jwt.encode(
            claims, self._key.private_key, algorithm=ALGORITHM, headers={"kid": self._key.kid}
        )
        return IssuedToken(token, record)


class LocalTokenIssuer:
    """Signs tokens and records each one in the registry before handing it out."""

    def __init__(
        self,
        key: LocalSigningKey,
        registry: TokenBook,
        *,
        issuer: str,
        audience: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._signer = LocalTokenSigner(key, issuer=issuer, audience=audience, clock=clock)
        self._registry = registry

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalTokenIssuer:
        return cls(
            open_signing_key(settings),
            open_token_book(settings),
            issuer=settings.identity.local_issuer,
            audience=settings.identity.local_audience,
        )

    def close(self) -> None:
        """Close the registry this issuer writes to."""
        self._registry.close()

    def issue(self, subject: str, groups: Sequence[str], ttl_seconds: float) -> IssuedToken:
        issued = self._signer.sign(subject, groups, ttl_seconds)
        # Recorded first: a token the registry does not know is refused by every verifier.
        self._registry.record_token(issued.record)
        return issued


class LocalTokenVerifier:
    """Checks a local token's signature, claims, and registry entry (issued here, not revoked)."""

    def __init__(
        self,
        key: LocalSigningKey,
        registry: RegistryView,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Only the public half is kept: verifying never needs the private key.
        self._public_key = key.public_key
        self._registry = registry
        self.issuer = issuer
        self._leeway = leeway_seconds
        self._clock = clock
        self._checks = ClaimChecks(issuer, audience, leeway_seconds, _REQUIRED)
        # Keyed by the token's digest, so no token text outlives its connection here.
        self._verified: dict[bytes, Principal] = {}

    @classmethod
    def from_settings(cls, settings: Settings, registry: RegistryView) -> LocalTokenVerifier:
        return cls(
            open_signing_key(settings),
            registry,
            issuer=settings.identity.local_issuer,
            audience=settings.identity.local_audience,
            leeway_seconds=settings.identity.leeway_seconds,
        )

    def revoked_count(self) -> int:
        """How many revocations the registry's last read found."""
        return self._registry.revoked_count()

    async def verify(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode()).digest()
        principal = self._verified.get(digest)
        if principal is None:
            principal = self._verify_signed(token)
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                del self._verified[next(iter(self._verified))]
            self._verified[digest] = principal
        # Time and revocation move on, so a remembered token is still checked against both;
        # a login asks the registry afresh: refused the moment `tokens revoke` returned,
        # and refused (ControlStoreUnavailable) while the registry cannot be asked.
        rejected = expiry_rejection(
            principal.expires_at, self._clock(), self._leeway
        ) or await self._registry.fresh_rejection(principal.token_id)
        if rejected is not None:
            raise TokenRejected(rejected)
        return principal

    def _verify_signed(self, token: str) -> Principal:
        peek(token)  # the structure first, so junk is "malformed" rather than "bad signature"
        claims = self._checks.verified_claims(token, self._public_key, ALGORITHM)
        subject, jti, groups = claims["sub"], claims["jti"], claims.get("groups")
        if not isinstance(jti, str) or not jti:
            raise TokenRejected(MALFORMED)
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise TokenRejected(BAD_GROUPS)
        return Principal(
            subject=subject,
            issuer=self.issuer,
            groups=tuple(groups),
            token_id=jti,
            expires_at=float(claims["exp"]),
            claims=claims,
        )

    def revocations_changed(self) -> bool:
        """True once after the registry's revocations changed (read by the control
        mirror, as its store tells it or it polls)."""
        return self._registry.revocations_changed()

    def still_valid(self, principal: Principal) -> str | None:
        expired = expiry_rejection(principal.expires_at, self._clock(), self._leeway)
        if expired is not None:
            return expired
        return self._registry.rejection(principal.token_id)
