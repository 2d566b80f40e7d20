"""Renders the console's server-side pages: the Jinja2 templates with what base.html needs
(the signed-in person, the CSRF token)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from gateway.console.web_session import CSRF_FIELD, csrf_token, web_session

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
# Autoescaped (.html): statements, notes and names are client or IdP text.
templates = Jinja2Templates(directory=str(HERE / "templates"))


def utc(t: float | None) -> str:
    """A time as the pages show it: UTC to the second (a reader elsewhere sees the same)."""
    if t is None:
        return ""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def store_unavailable(exc: Exception) -> dict[str, str]:
    """A page's context when the control store it reads is down: the page says why."""
    return {"unavailable": f"The control store cannot be read just now: {exc}"}


def page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    session = web_session(request)
    return templates.TemplateResponse(
        request,
        template,
        {
            "person": session.person if session is not None else None,
            "csrf_token": csrf_token(request),
            "csrf_field": CSRF_FIELD,
            **context,
        },
        status_code=status_code,
    )


def flash(request: Request, message: str) -> None:
    """A message for the next page this session sees (after a POST's redirect)."""
    session = web_session(request)
    if session is not None:
        session.pending["flash"] = message


def flashed(request: Request) -> str | None:
    """The message flashed for this page, once."""
    session = web_session(request)
    return session.pending.pop("flash", None) if session is not None else None
