"""The console's SAML 2.0 service provider: SP-initiated login (HTTP-Redirect AuthnRequest,
HTTP-POST Response to the ACS) verified by pysaml2, giving a `Person(via="saml")`.

pysaml2 does the XML, the signature checks (with Debian's xmlsec1, against the IdP's
certificate from its metadata), Destination, Recipient, Audience, InResponseTo and the
validity window. What its defaults let through, this module refuses on top, on the
verified assertion only: an assertion with no AudienceRestriction, a bearer confirmation
with no NotOnOrAfter, and a response to a request already answered (replay).
"""

from __future__ import annotations

import functools
import logging
import secrets
import shutil
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cryptography.utils import CryptographyDeprecationWarning

from gateway.console.people import Person
from gateway.identity.oidc import _require_secure as require_secure
from gateway.settings import ConsoleSettings

log = logging.getLogger("pgwarden.console")


@functools.cache
def _pysaml2() -> SimpleNamespace:
    """pysaml2, imported when a SAML login is first configured or answered: its import
    builds XML schemas (0.75 s of CPU), which every gateway and pgwarden command paid at
    start before, SAML configured or not."""
    with warnings.catch_warnings():
        # pysaml2's symmetric-cipher table names CFB at import, which cryptography deprecates;
        # the console never uses those ciphers (it only verifies signatures).
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
        from saml2.client import Saml2Client
        from saml2.config import SPConfig
        from saml2.metadata import create_metadata_string
        from saml2.response import IncorrectlySigned, StatusError, UnsolicitedResponse
        from saml2.saml import SCM_BEARER
        from saml2.sigver import SIG_RSA_SHA256, SigverError
        from saml2.validate import ResponseLifetimeExceed, ToEarly
    return SimpleNamespace(
        BINDING_HTTP_POST=BINDING_HTTP_POST,
        BINDING_HTTP_REDIRECT=BINDING_HTTP_REDIRECT,
        Saml2Client=Saml2Client,
        SPConfig=SPConfig,
        create_metadata_string=create_metadata_string,
        IncorrectlySigned=IncorrectlySigned,
        StatusError=StatusError,
        UnsolicitedResponse=UnsolicitedResponse,
        SCM_BEARER=SCM_BEARER,
        SIG_RSA_SHA256=SIG_RSA_SHA256,
        SigverError=SigverError,
        ResponseLifetimeExceed=ResponseLifetimeExceed,
        ToEarly=ToEarly,
    )


LOGIN_PATH = "/console/login/saml"
ACS_PATH = "/console/saml/acs"
METADATA_PATH = "/console/saml/metadata"
# How long a person has at the IdP between our redirect and its POST back.
REQUEST_LIFETIME_SECONDS = 600.0
# Pending AuthnRequests kept at most (oldest dropped first): an anonymous visitor can start
# logins, so what each start costs in memory is bounded.
MAX_PENDING_REQUESTS = 10_000
# pysaml2's messages for the checks it fails without a class of its own.
_CHECKS = {
    "AudienceRestrictions": "wrong audience",
    "No valid recipient": "wrong recipient",
    "Condition not OK": "assertion conditions not met",
    # A second assertion beside the signed one: signature wrapping, or an IdP's mistake.
    "Invalid number of assertions": "not exactly one assertion",
    "not well-formed": "malformed response",
}
UNSOLICITED = "unsolicited response: it answers no login started from this browser"


class SamlConfigError(Exception):
    """The SAML settings cannot make a service provider (named in the message)."""


class SamlLoginRefused(Exception):
    """A SAML response that signs nobody in; `reason` says why, for the login page."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SamlSpSettings:
    """What the service provider needs: our URLs, the IdP's metadata, our optional key."""

    sp_entity_id: str
    acs_url: str
    idp_metadata_file: Path | None = None
    idp_metadata_url: str = ""
    groups_attribute: str = "groups"
    name_attribute: str = "displayName"
    sp_key_file: Path | None = None
    sp_cert_file: Path | None = None
    clock_skew_seconds: int = 30
    metadata_refresh_seconds: float = 3600.0

    @classmethod
    def of(cls, console: ConsoleSettings, base_url: str) -> SamlSpSettings:
        """From the console's settings; `base_url` is where browsers reach the console
        (console.public_url, else the admin listener's own address)."""
        base = base_url.rstrip("/")
        return cls(
            sp_entity_id=console.saml_sp_entity_id or base + METADATA_PATH,
            acs_url=base + ACS_PATH,
            idp_metadata_file=console.saml_idp_metadata_file,
            idp_metadata_url=console.saml_idp_metadata_url,
            groups_attribute=console.saml_groups_attribute,
            name_attribute=console.saml_name_attribute,
            sp_key_file=console.saml_sp_key_file,
            sp_cert_file=console.saml_sp_cert_file,
            clock_skew_seconds=console.saml_clock_skew_seconds,
            metadata_refresh_seconds=console.saml_metadata_refresh_seconds,
        )


def saml_configured(console: ConsoleSettings) -> bool:
    return console.saml_idp_metadata_file is not None or bool(console.saml_idp_metadata_url)


@dataclass
class _Pending:
    browser: str
    expires: float
    # The console page the person wanted, where the ACS sends them once signed in.
    next: str


@dataclass
class AuthnRequestLedger:
    """The AuthnRequest ids we issued, each bound to the browser that started the login (a
    random pre-login cookie), usable once. Answered ids are remembered until they would have
    expired anyway, so that a second POST of the same response is named a replay."""

    clock: Callable[[], float] = time.monotonic
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _answered: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def issue(self, request_id: str, browser: str, then: str) -> None:
        with self._lock:
            self._forget_expired()
            while len(self._pending) >= MAX_PENDING_REQUESTS:
                del self._pending[next(iter(self._pending))]
            expires = self.clock() + REQUEST_LIFETIME_SECONDS
            self._pending[request_id] = _Pending(browser, expires, then)

    def candidates(self, browser: str) -> dict[str, str]:
        """The ids a response posted by `browser` may answer (its own pending ones), plus the
        answered ones so that a replay is recognised after its signature is checked."""
        with self._lock:
            self._forget_expired()
            ids = {rid: "" for rid, p in self._pending.items() if p.browser == browser}
            ids.update(dict.fromkeys(self._answered, ""))
            return ids

    def answer(self, request_id: str, browser: str) -> str:
        """Mark `request_id` used by this browser's login (the page it wanted), or refuse:
        replayed, or not ours."""
        with self._lock:
            if request_id in self._answered:
                raise SamlLoginRefused(
                    "replayed response: the login request it answers was already used"
                )
            pending = self._pending.get(request_id)
            if pending is None or pending.browser != browser or pending.expires < self.clock():
                raise SamlLoginRefused(UNSOLICITED)
            del self._pending[request_id]
            self._answered[request_id] = pending.expires
            return pending.next

    def _forget_expired(self) -> None:
        now = self.clock()
        for rid in [rid for rid, p in self._pending.items() if p.expires < now]:
            del self._pending[rid]
        for rid in [rid for rid, expires in self._answered.items() if expires < now]:
            del self._answered[rid]


def new_browser_key() -> str:
    """The random value of the pre-login cookie that binds an AuthnRequest to a browser."""
    return secrets.token_urlsafe(32)


class SamlServiceProvider:
    """SP-initiated SAML login against the one IdP named in the configured metadata.

    Both methods block (metadata fetch, xmlsec1 subprocesses): call them from a thread."""

    def __init__(
        self,
        settings: SamlSpSettings,
        ledger: AuthnRequestLedger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.ledger = ledger or AuthnRequestLedger()
        self._clock = clock
        self._client: Any = None
        # What the client's metadata was read from: the file as it was then (st_ino,
        # st_size, st_mtime_ns), and when it was read (the URL's is read again after
        # metadata_refresh_seconds; a failed read is tried again after as long).
        self._metadata_file: tuple[int, int, int] | None = None
        self._metadata_read_at = 0.0
        # pysaml2's client keeps a per-person cache it mutates while parsing; one at a time.
        self._lock = threading.Lock()

    def _saml_client(self) -> Any:
        """The client, built on the IdP's metadata as it is now: read again when its file
        changed, or when the URL's was read longer than metadata_refresh_seconds ago. A
        metadata that cannot be read again leaves the last one in use (and is logged);
        with none read yet, the login fails with why."""
        if self._client is not None and not self._metadata_stale():
            return self._client
        # Noted before the read: one that fails is tried again once the refresh interval has
        # passed (a file: when it changes), and with no client yet, at once.
        self._metadata_file = self._metadata_file_state()
        self._metadata_read_at = self._clock()
        try:
            client = _pysaml2().Saml2Client(config=self._sp_config())
        except Exception as exc:
            if self._client is None:
                raise
            log.warning("SAML IdP metadata not read again, the last one stays in use: %s", exc)
            return self._client
        self._client = client
        return client

    def _metadata_file_state(self) -> tuple[int, int, int] | None:
        path = self.settings.idp_metadata_file
        if path is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _metadata_stale(self) -> bool:
        if self.settings.idp_metadata_file is not None:
            return self._metadata_file_state() != self._metadata_file
        return self._clock() - self._metadata_read_at >= self.settings.metadata_refresh_seconds

    def _sp_config(self) -> Any:
        s = self.settings
        xmlsec = shutil.which("xmlsec1")
        if xmlsec is None:
            raise SamlConfigError(
                "SAML login needs the xmlsec1 program (Debian package xmlsec1) on the PATH"
            )
        if s.idp_metadata_file is not None:
            metadata: dict[str, Any] = {"local": [str(s.idp_metadata_file)]}
        elif s.idp_metadata_url:
            # The metadata carries the certificate every signature is checked with: fetched
            # as the data path fetches an OIDC issuer's keys (https, or http on loopback).
            try:
                require_secure(s.idp_metadata_url, "console.saml_idp_metadata_url")
            except ValueError as exc:
                raise SamlConfigError(str(exc)) from None
            metadata = {"remote": [{"url": s.idp_metadata_url}]}
        else:
            raise SamlConfigError(
                "SAML login needs console.saml_idp_metadata_file or console.saml_idp_metadata_url"
            )
        signing = s.sp_key_file is not None and s.sp_cert_file is not None
        config: dict[str, Any] = {
            "entityid": s.sp_entity_id,
            "xmlsec_binary": xmlsec,
            "metadata": metadata,
            "accepted_time_diff": s.clock_skew_seconds,
            # Attributes the converters do not know keep their Name: the groups attribute
            # is looked up by Name or FriendlyName on the verified assertion.
            "allow_unknown_attributes": True,
            "service": {
                "sp": {
                    "endpoints": {
                        "assertion_consumer_service": [(s.acs_url, _pysaml2().BINDING_HTTP_POST)]
                    },
                    "allow_unsolicited": False,
                    "want_assertions_or_response_signed": True,
                    "want_assertions_signed": False,
                    "want_response_signed": False,
                    "authn_requests_signed": signing,
                },
            },
        }
        if signing:
            config["key_file"] = str(s.sp_key_file)
            config["cert_file"] = str(s.sp_cert_file)
        sp_config = _pysaml2().SPConfig()
        try:
            sp_config.load(config)
        except Exception as exc:
            raise SamlConfigError(f"SAML settings rejected: {exc}") from exc
        return sp_config

    def _idp_entity_id(self) -> str:
        idps = list(self._saml_client().metadata.identity_providers())
        if len(idps) != 1:
            raise SamlConfigError(
                f"the IdP metadata must describe exactly one identity provider, not {len(idps)}"
            )
        return str(idps[0])

    def metadata_xml(self) -> str:
        """Our SP metadata, for the IdP administrator to register us with."""
        with self._lock:
            metadata = _pysaml2().create_metadata_string(
                None, config=self._saml_client().config, sign=False
            )
        return metadata.decode() if isinstance(metadata, bytes) else str(metadata)

    def begin_login(self, browser: str, then: str = "/console/") -> str:
        """The IdP URL (HTTP-Redirect binding) carrying a new AuthnRequest bound to `browser`;
        `then` is the page to go to once signed in."""
        with self._lock:
            client = self._saml_client()
            kwargs: dict[str, Any] = {}
            if client.authn_requests_signed:
                kwargs = {"sign": True, "sigalg": _pysaml2().SIG_RSA_SHA256}
            request_id, info = client.prepare_for_authenticate(
                entityid=self._idp_entity_id(),
                binding=_pysaml2().BINDING_HTTP_REDIRECT,
                response_binding=_pysaml2().BINDING_HTTP_POST,
                **kwargs,
            )
        self.ledger.issue(str(request_id), browser, then)
        location = dict(info["headers"])["Location"]
        return str(location)

    def finish_login(self, browser: str, saml_response: str) -> tuple[Person, str]:
        """Verify a base64 SAMLResponse posted to the ACS by `browser`: the person it names
        and the page they wanted, or SamlLoginRefused with the reason. One use per
        AuthnRequest."""
        if not saml_response:
            raise SamlLoginRefused("no SAMLResponse in the POST")
        outstanding = self.ledger.candidates(browser)
        with self._lock:
            response = self._verified(saml_response, outstanding)
        person = self._person(response)
        then = self.ledger.answer(str(response.in_response_to or ""), browser)
        return person, then

    def _verified(self, saml_response: str, outstanding: dict[str, str]) -> Any:
        client = self._saml_client()
        refusal: SamlLoginRefused | None = None
        try:
            response = client.parse_authn_request_response(
                saml_response,
                _pysaml2().BINDING_HTTP_POST,
                outstanding=outstanding,
                # With conv_info, pysaml2 requires each bearer Recipient to be one of our
                # ACS URLs (without it, it accepts any Recipient).
                conv_info={"entity_id": self.settings.acs_url},
            )
        except Exception as exc:
            refusal = _refusal(exc)
            # pysaml2's frames hold its temporary certificate files open; freed now rather
            # than whenever the garbage collector reaches the traceback.
            traceback.clear_frames(exc.__traceback__)
        if refusal is not None:
            raise refusal
        if response is None or response.assertion is None or response.name_id is None:
            # pysaml2 returns a response without an assertion when its Destination is not
            # one of our ACS URLs (it logs, does not raise).
            destination = getattr(getattr(response, "response", None), "destination", None)
            if destination and destination != self.settings.acs_url:
                raise SamlLoginRefused(
                    f"wrong destination: the response is for {destination}, "
                    f"not this console's {self.settings.acs_url}"
                )
            raise SamlLoginRefused("response refused: it carries no verified assertion")
        self._require_profile(response.assertion)
        return response

    def _require_profile(self, assertion: Any) -> None:
        """The Web Browser SSO profile's musts that pysaml2 lets pass when absent."""
        conditions = assertion.conditions
        if conditions is None or not conditions.audience_restriction:
            raise SamlLoginRefused("wrong audience: the assertion names no audience")
        for confirmation in assertion.subject.subject_confirmation:
            data = confirmation.subject_confirmation_data
            if confirmation.method == _pysaml2().SCM_BEARER and (
                data is None or not data.not_on_or_after
            ):
                raise SamlLoginRefused("no expiry: the bearer confirmation has no NotOnOrAfter")

    def _person(self, response: Any) -> Person:
        subject = (response.name_id.text or "").strip()
        if not subject:
            raise SamlLoginRefused("the assertion's NameID is empty")
        groups = frozenset(_attribute_values(response.assertion, self.settings.groups_attribute))
        names = _attribute_values(response.assertion, self.settings.name_attribute)
        return Person(
            subject=subject,
            groups=groups,
            # Shown on every page: bounded, as the OIDC login bounds its name claim.
            display_name=(names[0] if names else subject)[:200],
            via="saml",
        )


def _refusal(exc: Exception) -> SamlLoginRefused:
    """The reason a pysaml2 exception refuses the login, led by the check that failed."""
    text = _text(exc)
    if isinstance(exc, _pysaml2().UnsolicitedResponse):
        return SamlLoginRefused(UNSOLICITED)
    if isinstance(exc, _pysaml2().SigverError | _pysaml2().IncorrectlySigned):
        return SamlLoginRefused(
            f"signature missing or not valid for the IdP's certificate ({text})"
        )
    if isinstance(exc, _pysaml2().ResponseLifetimeExceed):
        return SamlLoginRefused(f"expired assertion: {text}")
    if isinstance(exc, _pysaml2().ToEarly):
        return SamlLoginRefused(f"assertion not valid yet: {text}")
    if isinstance(exc, _pysaml2().StatusError):
        return SamlLoginRefused(f"the IdP did not sign you in: {text}")
    # pysaml2 raises bare Exception or VerificationError for the rest; its text names the check.
    check = next((name for key, name in _CHECKS.items() if key in text), "response refused")
    return SamlLoginRefused(f"{check}: {text}")


def _attribute_values(assertion: Any, name: str) -> list[str]:
    """The text values of the attribute called `name` (its Name or FriendlyName)."""
    values: list[str] = []
    for statement in assertion.attribute_statement:
        for attribute in statement.attribute:
            if name in (attribute.name, attribute.friendly_name):
                values.extend(v.text.strip() for v in attribute.attribute_value if v.text)
    return values


def _text(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__
