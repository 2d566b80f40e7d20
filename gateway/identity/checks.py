"""Names the check a token failed, so every rejection says which one and never the token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jwt

from gateway.identity.principal import TokenRejected

MALFORMED = "malformed token"
BAD_SIGNATURE = "bad signature"
EXPIRED = "token expired"
NOT_YET_VALID = "token not yet valid"
WRONG_ISSUER = "wrong issuer"
WRONG_AUDIENCE = "wrong audience"
ALGORITHM_NOT_ALLOWED = "algorithm not allowed"
UNKNOWN_SIGNING_KEY = "unknown signing key"
REVOKED = "token revoked"
UNKNOWN_TOKEN = "unknown token"
ISSUER_UNREACHABLE = "issuer unreachable"
ISSUER_METADATA_INVALID = "issuer metadata invalid"
BAD_GROUPS = "malformed groups claim"
TOKEN_TOO_LARGE = "token too large"
SIGNING_KEY_WITHDRAWN = "signing key withdrawn"

# Most specific first: pyjwt's exceptions form a hierarchy (e.g. ExpiredSignatureError is
# an InvalidTokenError), so the first isinstance match names the check.
_CHECK_OF: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, EXPIRED),
    (jwt.ImmatureSignatureError, NOT_YET_VALID),
    (jwt.InvalidIssuerError, WRONG_ISSUER),
    (jwt.InvalidAudienceError, WRONG_AUDIENCE),
    (jwt.InvalidAlgorithmError, ALGORITHM_NOT_ALLOWED),
    (jwt.InvalidSignatureError, BAD_SIGNATURE),
    (jwt.InvalidKeyError, UNKNOWN_SIGNING_KEY),
    (jwt.DecodeError, MALFORMED),
    (jwt.InvalidIssuedAtError, MALFORMED),
)


def rejection_for(error: jwt.PyJWTError) -> TokenRejected:
    """The TokenRejected for a pyjwt failure; pyjwt's own message never holds the token."""
    if isinstance(error, jwt.MissingRequiredClaimError):
        return TokenRejected(f"missing claim {error.claim}")
    for kind, check in _CHECK_OF:
        if isinstance(error, kind):
            return TokenRejected(check)
    return TokenRejected("invalid token")


def expiry_rejection(expires_at: float | None, now: float, leeway: float) -> str | None:
    """EXPIRED once `now` is past the expiry plus the same leeway that verification allowed."""
    if expires_at is not None and now >= expires_at + leeway:
        return EXPIRED
    return None


_PYJWT = jwt.PyJWT()


@dataclass(frozen=True, slots=True)
class ClaimChecks:
    """Signature, iss, aud, exp, nbf (with leeway) and required claims, by pyjwt; a failure
    becomes the TokenRejected that names it."""

    issuer: str
    audience: str
    leeway_seconds: float
    required: tuple[str, ...]
    _options: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_options", {"require": list(self.required)})

    def verified_claims(self, token: str, key: Any, algorithm: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = _PYJWT.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options=self._options,
            )
        except jwt.PyJWTError as exc:
            raise rejection_for(exc) from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenRejected(MALFORMED)
        return claims
