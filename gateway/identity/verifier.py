"""The gateway's one TokenVerifier: routes each token by its claimed issuer to local or OIDC."""

from __future__ import annotations

import httpx

from gateway.identity.checks import TOKEN_TOO_LARGE, WRONG_ISSUER
from gateway.identity.local import LocalTokenVerifier, RegistryView
from gateway.identity.oidc import OidcVerifier
from gateway.identity.principal import Principal, TokenRejected
from gateway.identity.unverified import peek
from gateway.settings import Settings


class IdentityVerifier:
    """The unverified `iss` only picks the verifier; that verifier then checks `iss` itself."""

    def __init__(
        self,
        local: LocalTokenVerifier,
        oidc: OidcVerifier | None = None,
        *,
        max_token_bytes: int = 16 * 1024,
    ) -> None:
        if oidc is not None and oidc.issuer == local.issuer:
            raise ValueError("identity.local_issuer and identity.oidc_issuer must differ")
        self._local = local
        self._oidc = oidc
        self.max_token_bytes = max_token_bytes

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        registry: RegistryView,
        *,
        http: httpx.AsyncClient | None = None,
    ) -> IdentityVerifier:
        """Local tokens always; OIDC when identity.oidc_issuer is set. Raises ValueError on
        settings that would weaken verification (no audience, HMAC or `none` algorithms)."""
        oidc = None
        if settings.identity.oidc_issuer:
            oidc = OidcVerifier.from_settings(settings.identity, http=http)
        return cls(
            LocalTokenVerifier.from_settings(settings, registry),
            oidc,
            max_token_bytes=settings.identity.max_token_bytes,
        )

    def start(self) -> None:
        """Start background work (keeping the OIDC issuer's key set fresh)."""
        if self._oidc is not None:
            self._oidc.start()

    async def aclose(self) -> None:
        if self._oidc is not None:
            await self._oidc.aclose()

    def revoked_count(self) -> int:
        """How many local tokens the registry's last read found revoked."""
        return self._local.revoked_count()

    async def verify(self, token: str) -> Principal:
        if len(token) > self.max_token_bytes:
            raise TokenRejected(TOKEN_TOO_LARGE)
        issuer = peek(token).issuer
        if issuer == self._local.issuer:
            return await self._local.verify(token)
        if self._oidc is not None and issuer == self._oidc.issuer:
            return await self._oidc.verify(token)
        raise TokenRejected(WRONG_ISSUER)

    def tokens_changed(self) -> bool:
        """Whether a revocation, or the OIDC issuer's key set, changed since the last call:
        open sessions should then check their tokens again (`still_valid`)."""
        changed = self._local.revocations_changed()
        if self._oidc is not None and self._oidc.keys_changed():
            changed = True
        return changed

    def still_valid(self, principal: Principal) -> str | None:
        if principal.issuer == self._local.issuer:
            return self._local.still_valid(principal)
        if self._oidc is not None and principal.issuer == self._oidc.issuer:
            return self._oidc.still_valid(principal)
        return WRONG_ISSUER
