"""/console/device: a signed-in person confirms (or refuses) the user code `pgwarden login
--via console` showed them, and that CLI's next poll gets a pgwarden token in their name.
This is how people whose identity provider speaks SAML (no device grant) get one."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from gateway.console.deps import ConsoleDeps
from gateway.console.render import page, utc
from gateway.console.web_session import SignedIn, form_fields, web_session
from gateway.identity.device_codes import DeviceCode, shown_user_code

PAGE = "/console/device"


def device_page_router(deps: ConsoleDeps) -> APIRouter:
    router = APIRouter()
    codes, tokens = deps.device_codes, deps.person_tokens

    def device_page(
        request: Request,
        *,
        typed: str = "",
        code: DeviceCode | None = None,
        error: str | None = None,
        notice: str | None = None,
        status_code: int = 200,
    ) -> HTMLResponse:
        return page(
            request,
            "device.html",
            status_code=status_code,
            typed=typed,
            code=code,
            shown=shown_user_code(code.user_code) if code is not None else "",
            requested=utc(code.created) if code is not None else "",
            error=error,
            notice=notice,
        )

    @router.get(PAGE, response_class=HTMLResponse)
    async def device(request: Request, person: SignedIn) -> Response:
        """Type the code; with ?user_code=, the waiting sign-in it names, to confirm."""
        typed = request.query_params.get("user_code", "").strip()[:32]
        if not typed or codes is None:
            return device_page(request)
        code = codes.waiting(typed)
        if code is None:
            return device_page(
                request,
                typed=typed,
                error="No sign-in is waiting for that code: it may have expired or been used."
                " Run pgwarden login again for a new one.",
                status_code=404,
            )
        return device_page(request, typed=typed, code=code)

    @router.post(PAGE, response_class=HTMLResponse)
    async def decide(request: Request, person: SignedIn) -> Response:
        """Confirm or refuse (the console middleware checked the CSRF token already)."""
        fields = await form_fields(request)
        typed = fields.get("user_code", "").strip()[:32]
        code = codes.waiting(typed) if codes is not None else None
        if code is None or tokens is None:
            return device_page(
                request,
                typed=typed,
                error="No sign-in is waiting for that code: it may have expired or been used.",
                status_code=404,
            )
        if fields.get("decision") == "deny":
            code.denied = True
            return device_page(request, notice="Refused: that pgwarden login gets no token.")
        if fields.get("decision") != "confirm":
            return device_page(
                request, typed=typed, code=code, error="Choose confirm or refuse.", status_code=400
            )
        session = web_session(request)
        try:
            code.issued = await tokens.issue(
                person.subject,
                sorted(person.groups),
                f"console ({person.via})",
                # A token login's session ends with its token: the new one may not outlive it.
                not_after=session.expires if session is not None else None,
            )
        except HTTPException as exc:
            return device_page(
                request, typed=typed, code=code, error=str(exc.detail), status_code=exc.status_code
            )
        code.confirmed_by = person.subject
        return device_page(
            request,
            notice=f"Confirmed: pgwarden login now signs in as {person.subject}."
            " You can go back to your terminal.",
        )

    return router
