"""Who is connecting: JWT verification (local EdDSA tokens and OIDC), issuing and revocation."""

from gateway.identity.local import IssuedToken, LocalTokenIssuer, LocalTokenVerifier
from gateway.identity.oidc import OidcVerifier
from gateway.identity.principal import Principal, TokenRejected
from gateway.identity.registry import TokenRecord, UnknownToken
from gateway.identity.signing_key import LocalSigningKey, SigningKeyError
from gateway.identity.verifier import IdentityVerifier

__all__ = [
    "IdentityVerifier",
    "IssuedToken",
    "LocalSigningKey",
    "LocalTokenIssuer",
    "LocalTokenVerifier",
    "OidcVerifier",
    "Principal",
    "SigningKeyError",
    "TokenRecord",
    "TokenRejected",
    "UnknownToken",
]
