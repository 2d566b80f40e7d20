"""Console sign-in state: server-side web sessions keyed by a random id in a cookie, the CSRF
token of each, and the ASGI middleware that finds a request's session, refuses a change
(any non-GET request) without the session's CSRF token and adds the security headers.

The cookie holds nothing but a random id; everything else stays in this process (a restart
signs everyone out). A visitor who is not signed in gets an anonymous session as soon as a
page needs a CSRF token (the login forms), so the sign-in POST is protected too; signing in
replaces it with a new id (no session fixation)."""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, Request, Response
from starlette.datastructures import MutableHeaders

from gateway.console.people import Person
from gateway.identity.principal import Principal

PREFIX = "/console"
SECURE_COOKIE = "__Host-pgwarden_console"
PLAIN_COOKIE = "pgwarden_console"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# POSTs that cannot carry the session's token because another site sends them (a SAML
# IdP's POST binding to the assertion consumer service); each proves itself otherwise. Such
# a cross-site POST does not bring the session cookie either (SameSite=Lax): what it must
# find again is kept by an id it carries (RelayState, InResponseTo), not in the session.
CSRF_EXEMPT: set[str] = set()
# An anonymous session only carries a login form's CSRF token and a login flow's state.
ANONYMOUS_SECONDS = 30 * 60
# Past this many live sessions the oldest anonymous ones go first: anyone can make one.
MAX_SESSIONS = 10_000
# A form body larger than this is refused before it is read in full (forms here are small).
MAX_FORM_BYTES = 64 * 1024
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'"
)


def csp_posting_to(origin: str) -> str:
    """The console's CSP with `origin` added to form-action, for the one response whose
    form must POST to an identity provider (a SAML POST binding); set it on that response
    as its content-security-policy header, and the middleware keeps it."""
    if not origin or any(c in origin for c in " ;,'\"\r\n"):
        raise ValueError(f"not an origin: {origin!r}")
    return CONTENT_SECURITY_POLICY.replace("form-action 'self'", f"form-action 'self' {origin}")


SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    # Pages show statements, tokens and audit records: never kept by a cache.
    "cache-control": "no-store",
}

# The data path's check of an open session's token: None while valid, else why not.
StillValid = Callable[[Principal], str | None]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class WebSession:
    id: str
    csrf: str
    expires: float
    person: Person | None = None
    # The token a token sign-in verified (never the token itself): the session ends when
    # the data path would end that token's sessions (revoked, expired).
    principal: Principal | None = None
    # Login flows in progress (OIDC state, nonce and PKCE verifier; SAML request ids), by flow.
    pending: dict[str, Any] = field(default_factory=dict)


class WebSessions:
    """The console's live sessions, in memory."""

    def __init__(
        self, *, lifetime_seconds: float, tls: bool, still_valid: StillValid | None = None
    ) -> None:
        self.lifetime = lifetime_seconds
        self.tls = tls
        self.still_valid = still_valid
        self.cookie_name = SECURE_COOKIE if tls else PLAIN_COOKIE
        self._by_id: dict[str, WebSession] = {}

    def get(self, session_id: str | None) -> WebSession | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if session.expires <= time.time() or self._token_ended(session):
            del self._by_id[session_id]
            return None
        return session

    def _token_ended(self, session: WebSession) -> bool:
        if session.principal is None or self.still_valid is None:
            return False
        return self.still_valid(session.principal) is not None

    def create(
        self,
        person: Person | None,
        expires: float | None = None,
        principal: Principal | None = None,
    ) -> WebSession:
        now = time.time()
        if len(self._by_id) >= MAX_SESSIONS:
            self._make_room(now)
        lifetime = self.lifetime if person is not None else ANONYMOUS_SECONDS
        session = WebSession(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            expires=min(now + lifetime, expires) if expires is not None else now + lifetime,
            person=person,
            principal=principal,
        )
        self._by_id[session.id] = session
        return session

    def drop(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def _make_room(self, now: float) -> None:
        for sid, s in list(self._by_id.items()):
            if s.expires <= now:
                del self._by_id[sid]
        anonymous = sorted(
            (s for s in self._by_id.values() if s.person is None), key=lambda s: s.expires
        )
        for s in anonymous[: max(1, len(anonymous) // 10)]:
            del self._by_id[s.id]
        if len(self._by_id) >= MAX_SESSIONS:
            # Every slot holds a signed-in person: the one nearest its end goes.
            oldest = min(self._by_id.values(), key=lambda s: s.expires)
            del self._by_id[oldest.id]

    def set_cookie(self, response: Response, session: WebSession) -> None:
        response.set_cookie(
            self.cookie_name,
            session.id,
            max_age=max(0, int(session.expires - time.time())),
            path="/",
            secure=self.tls,
            httponly=True,
            samesite="lax",
        )

    def cookie_header(self, session: WebSession) -> str:
        response = Response()
        self.set_cookie(response, session)
        return response.headers["set-cookie"]

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(
            self.cookie_name, path="/", secure=self.tls, httponly=True, samesite="lax"
        )


@dataclass
class _Here:
    """The session of the request being served (the middleware sets it per request)."""

    sessions: WebSessions
    session: WebSession | None
    # An anonymous session made during this request: the middleware sends its cookie.
    made: WebSession | None = None


_here: ContextVar[_Here] = ContextVar("pgwarden_console_session")


class SignInRequired(Exception):
    """The request needs a signed-in person; the console answers with the login page."""

    def __init__(self, wanted: str) -> None:
        super().__init__(wanted)
        self.wanted = wanted


def _current() -> _Here:
    try:
        return _here.get()
    except LookupError:
        raise RuntimeError("console route served without the console middleware") from None


def web_session(request: Request) -> WebSession | None:
    """The request's session, signed in or anonymous, if it has one."""
    return _current().session


def sign_in(
    response: Response,
    person: Person,
    expires: float | None = None,
    *,
    principal: Principal | None = None,
) -> None:
    """Start a signed-in session for `person` (ending at the session lifetime, or sooner at
    `expires`, or when `principal`'s token is revoked) under a new id: the anonymous session
    the login went through is dropped."""
    here = _current()
    if here.session is not None:
        here.sessions.drop(here.session.id)
    here.session = here.sessions.create(person, expires, principal)
    here.made = None
    here.sessions.set_cookie(response, here.session)


def sign_out(request: Request, response: Response) -> None:
    here = _current()
    if here.session is not None:
        here.sessions.drop(here.session.id)
    here.session = here.made = None
    here.sessions.clear_cookie(response)


async def current_person(request: Request) -> Person:
    """FastAPI dependency: the signed-in person, else the login page (a redirect)."""
    session = _current().session
    if session is None or session.person is None:
        raise SignInRequired(request.url.path)
    return session.person


# A route's parameter `person: SignedIn` is the signed-in person (else the login page).
SignedIn = Annotated[Person, Depends(current_person)]


def csrf_token(request: Request) -> str:
    """The CSRF token of the request's session; a visitor without one gets an anonymous
    session (its cookie goes out with the response)."""
    here = _current()
    if here.session is None:
        here.session = here.made = here.sessions.create(None)
    return here.session.csrf


def pending_flow(request: Request) -> dict[str, Any]:
    """Where a login flow keeps what its callback must find again (in the browser's
    session, so a callback from another browser finds nothing)."""
    csrf_token(request)
    session = _current().session
    assert session is not None
    return session.pending


class ConsoleMiddleware:
    """Wraps the admin app: for paths under /console, finds the session, checks the CSRF
    token of every change before any route sees it, and adds the security headers."""

    def __init__(self, app: ASGIApp, sessions: WebSessions) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        here = _Here(
            self.sessions, self.sessions.get(request.cookies.get(self.sessions.cookie_name))
        )
        token = _here.set(here)
        try:

            async def send_secured(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = MutableHeaders(scope=message)
                    for name, value in SECURITY_HEADERS.items():
                        # A route's own CSP is kept: only csp_posting_to() makes one.
                        if name != "content-security-policy" or name not in headers:
                            headers[name] = value
                    if here.made is not None and here.made is here.session:
                        headers.append("set-cookie", self.sessions.cookie_header(here.made))
                await send(message)

            if scope["method"] not in SAFE_METHODS and path not in CSRF_EXEMPT:
                body = await _read_body(receive)
                if body is None or not _csrf_matches(request, body, here.session):
                    await _refuse(send_secured, body is None)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_secured)
        finally:
            _here.reset(token)


async def form_fields(request: Request) -> dict[str, str]:
    """A urlencoded form's fields (each named once; a repeated name is refused as absent)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return {}
    return _fields(await request.body())


def _fields(body: bytes) -> dict[str, str]:
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in parsed.items() if len(values) == 1}


def _csrf_matches(request: Request, body: bytes, session: WebSession | None) -> bool:
    if session is None:
        return False
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/x-www-form-urlencoded":
            sent = _fields(body).get(CSRF_FIELD)
    if not sent:
        return False
    return hmac.compare_digest(sent.encode("utf-8", "replace"), session.csrf.encode())


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None past MAX_FORM_BYTES."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, then: Receive) -> Receive:
    """The body already read, once; then the client's own messages (its disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive


async def _refuse(send: Send, too_large: bool) -> None:
    status = 413 if too_large else 403
    text = (
        b"request body too large"
        if too_large
        else b"refused: this change does not carry the session's CSRF token"
    )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(text)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": text})
