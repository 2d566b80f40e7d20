"""The console's tokens and targets pages: read-only lists from the control store, and the
revocation of a token by an admin (admin.token_groups), through the same store call as
`pgwarden tokens revoke`: the registry records it, and every gateway sharing the store ends
the token's sessions."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gateway.console.deps import ConsoleDeps
from gateway.console.people import Person
from gateway.console.render import flash, flashed, page, store_unavailable, utc
from gateway.console.web_session import SignedIn
from gateway.control.store import ControlStoreUnavailable
from gateway.identity.registry import UnknownToken

log = logging.getLogger("pgwarden.console")

# The newest tokens shown; older ones stay in `pgwarden tokens list`.
TOKENS_SHOWN = 500


def is_admin(deps: ConsoleDeps, person: Person) -> bool:
    return bool(person.groups & deps.admin_groups)


def inventory_router(deps: ConsoleDeps) -> APIRouter:
    router = APIRouter()

    async def tokens_context(person: Person) -> dict[str, Any]:
        if deps.control is None:
            return {"unavailable": "This gateway has no token registry."}
        try:
            records = await deps.control.tokens()
        except ControlStoreUnavailable as exc:
            return store_unavailable(exc)
        admin = is_admin(deps, person)
        now = time.time()
        # An admin sees every token; anyone else the tokens issued to them.
        shown = [r for r in reversed(records) if admin or r.subject == person.subject]
        return {
            "admin": admin,
            "tokens": [
                {
                    "jti": r.jti,
                    "subject": r.subject,
                    "groups": list(r.groups),
                    "issued": utc(r.issued_at),
                    "expires": utc(r.expires_at),
                    "revoked": utc(r.revoked_at),
                    "status": r.status(now),
                }
                for r in shown[:TOKENS_SHOWN]
            ],
            "more": max(0, len(shown) - TOKENS_SHOWN),
        }

    @router.get("/console/tokens", response_class=HTMLResponse)
    async def tokens(request: Request, person: SignedIn) -> Response:
        return page(request, "tokens.html", notice=flashed(request), **await tokens_context(person))

    @router.post("/console/tokens/{jti}/revoke")
    async def revoke(jti: str, request: Request, person: SignedIn) -> Response:
        problem, status = None, 200
        if not is_admin(deps, person):
            problem, status = (
                "Only members of " + " or ".join(sorted(deps.admin_groups)) + " may revoke tokens.",
                403,
            )
        elif deps.control is None:
            problem, status = "This gateway has no token registry.", 404
        else:
            try:
                record = await deps.control.revoke_token(jti, time.time())
            except UnknownToken:
                problem, status = f"No token with id {jti}.", 404
            except ControlStoreUnavailable as exc:
                problem, status = f"The control store cannot be written just now: {exc}", 503
        if problem is not None:
            return page(
                request,
                "tokens.html",
                status_code=status,
                error=problem,
                **await tokens_context(person),
            )
        log.info(
            "token %s (%s) revoked by %s from the console",
            record.jti,
            record.subject,
            person.subject,
            extra={"event": "token_revoked", "by": person.subject, "jti": record.jti},
        )
        flash(request, f"Revoked {record.jti} ({record.subject}).")
        return RedirectResponse("/console/tokens", status_code=303)

    @router.get("/console/targets", response_class=HTMLResponse)
    async def targets(request: Request, person: SignedIn) -> Response:
        context: dict[str, Any]
        if deps.control is None:
            context = {"unavailable": "This gateway has no control store."}
        else:
            try:
                found = await deps.control.targets()
            except ControlStoreUnavailable as exc:
                found = {}
                context = store_unavailable(exc)
            else:
                context = {}
            # Where a target's server is and as whom pgwarden logs in: admins only.
            context |= {
                "admin": is_admin(deps, person),
                "targets": [found[name] for name in sorted(found)],
            }
        return page(request, "targets.html", **context)

    return router
