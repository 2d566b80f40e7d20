"""`pgwarden login` on the admin listener: a person's IdP token exchanged for a short-lived
pgwarden token, and that token revoking itself (`pgwarden logout`). Both authenticate by the
token they carry, never by admin.token_groups: they serve people from the network.

No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time."""

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel

from gateway.admin.approvals import TokenCheck, bearer_principal
from gateway.control.store import ControlStore, ControlStoreUnavailable
from gateway.identity.local import IssuedToken, LocalTokenSigner
from gateway.identity.principal import Principal
from gateway.identity.registry import UnknownToken
from gateway.settings import Settings

log = logging.getLogger("pgwarden.login")

# A token that would live less than this is not worth writing into a person's files.
MIN_LIFETIME_SECONDS = 60.0


class ListenerOut(BaseModel):
    """Where the person's client connects: written into their service file."""

    host: str
    port: int
    tls: bool


class LoginConfigOut(BaseModel):
    """What `pgwarden login` needs before it signs anyone in."""

    oidc_issuer: str
    client_id: str
    scopes: list[str]
    # `pgwarden login --via console`: device codes confirmed on /console/device.
    console_device: bool


class LoginTokenOut(BaseModel):
    token: str
    token_id: str
    subject: str
    groups: list[str]
    expires_at: float
    listener: ListenerOut


class LogoutOut(BaseModel):
    revoked: str


@dataclass
class PersonTokens:
    """Issues people's pgwarden tokens into the token registry (so `pgwarden tokens list`
    shows them and a revocation reaches every gateway), as `pgwarden tokens issue` does."""

    settings: Settings
    verify: TokenCheck
    signer: LocalTokenSigner
    store: ControlStore
    # The data listener's bound port (listener.port may be 0: chosen at start).
    listener_port: int
    clock: Callable[[], float] = time.time

    def listener(self) -> ListenerOut:
        listener = self.settings.listener
        tls = listener.tls_cert is not None and listener.tls_key is not None
        host = self.settings.console.login_listener_host
        return ListenerOut(host=host, port=self.listener_port, tls=tls)

    def lifetime(self, authenticated_at: float | None, not_after: float | None) -> float:
        """console.login_token_hours, counted from the person's sign-in when known (an IdP
        token's auth_time): a long-lived IdP session refreshed without the person does not
        mint a fresh full lifetime. Never past `not_after` (the console session that
        confirmed it): a sign-in cannot outlive itself through a new token."""
        longest = self.settings.console.login_token_hours * 3600
        now = self.clock()
        ends = now + longest
        if authenticated_at is not None:
            ends = min(ends, authenticated_at + longest)
        if not_after is not None:
            ends = min(ends, not_after)
        return ends - now

    async def issue(
        self,
        subject: str,
        groups: Sequence[str],
        via: str,
        authenticated_at: float | None = None,
        not_after: float | None = None,
    ) -> LoginTokenOut:
        """A token for the person, recorded in the registry; HTTPException when none can be."""
        ttl = self.lifetime(authenticated_at, not_after)
        if ttl < MIN_LIFETIME_SECONDS:
            raise HTTPException(
                401,
                "your sign-in is older than console.login_token_hours (or about to end):"
                " sign in there again",
            )
        try:
            issued = self.signer.sign(subject, groups, ttl)
        except ValueError as exc:
            raise HTTPException(422, f"cannot issue a token for this identity: {exc}") from None
        try:
            # Recorded before it is handed out: a token the registry does not know is refused.
            await self.store.record_token(issued.record)
        except ControlStoreUnavailable as exc:
            raise HTTPException(503, f"the control store cannot be written: {exc}") from None
        self._log_issued(issued, via)
        return LoginTokenOut(
            token=issued.token,
            token_id=issued.record.jti,
            subject=issued.record.subject,
            groups=list(issued.record.groups),
            expires_at=issued.record.expires_at,
            listener=self.listener(),
        )

    def _log_issued(self, issued: IssuedToken, via: str) -> None:
        r = issued.record
        log.info(
            "issued token %s to %s (groups %s) by pgwarden login via %s, expires %.0f",
            r.jti,
            r.subject,
            ",".join(r.groups) or "-",
            via,
            r.expires_at,
            extra={"event": "token_issued", "jti": r.jti, "subject": r.subject, "via": via},
        )


def login_router(tokens: PersonTokens) -> APIRouter:
    router = APIRouter(tags=["login"])
    identity = tokens.settings.identity

    async def person(request: Request) -> Principal:
        if not identity.oidc_issuer:
            raise HTTPException(404, "no OIDC issuer is configured (identity.oidc_issuer)")
        who = await bearer_principal(request, tokens.verify)
        if who.issuer == identity.local_issuer:
            # Else a pgwarden token could renew itself for ever.
            raise HTTPException(
                401,
                "a pgwarden token cannot be exchanged for another: sign in at the identity"
                " provider",
                {"WWW-Authenticate": "Bearer"},
            )
        return who

    async def own_token(request: Request) -> Principal:
        who = await bearer_principal(request, tokens.verify)
        if who.issuer != identity.local_issuer:
            raise HTTPException(400, "only a pgwarden token can be revoked here")
        return who

    @router.get("/login/config", response_model=LoginConfigOut)
    async def login_config() -> LoginConfigOut:
        """The identity provider and client `pgwarden login` signs people in with."""
        console = tokens.settings.console
        return LoginConfigOut(
            oidc_issuer=identity.oidc_issuer,
            client_id=console.login_client_id or console.oidc_client_id,
            scopes=console.login_scopes,
            console_device=console.enabled,
        )

    @router.post("/login/oidc", response_model=LoginTokenOut)
    async def exchange(who: Annotated[Principal, Depends(person)]) -> LoginTokenOut:
        """Exchange the bearer IdP token (verified as a data-path login is) for a pgwarden
        token with its subject and groups, living console.login_token_hours at most."""
        auth_time = who.claims.get("auth_time")
        signed_in = (
            float(auth_time)
            if isinstance(auth_time, int | float) and not isinstance(auth_time, bool)
            else None
        )
        return await tokens.issue(who.subject, who.groups, "oidc", signed_in)

    @router.post("/logout", response_model=LogoutOut)
    async def logout(who: Annotated[Principal, Depends(own_token)]) -> LogoutOut:
        """Revoke the bearer pgwarden token itself: its logins are refused at once and its
        open sessions end, on every gateway sharing the control store."""
        try:
            record = await tokens.store.revoke_token(who.token_id, tokens.clock())
        except UnknownToken:
            raise HTTPException(404, "the token is not in the registry") from None
        except ControlStoreUnavailable as exc:
            raise HTTPException(503, f"the control store cannot be written: {exc}") from None
        log.info(
            "revoked token %s of %s by pgwarden logout",
            record.jti,
            record.subject,
            extra={"event": "token_revoked", "jti": record.jti, "subject": record.subject},
        )
        return LogoutOut(revoked=record.jti)

    return router
