"""The OIDC authorization code flow (with PKCE) on the tests' own issuer
(tests/identity/test_oidc.py's TestIssuer): an authorization endpoint that logs the
configured person in at once, and a token endpoint that redeems each code once."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass, field
from email.message import Message
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import orjson

from tests.identity.test_oidc import IssuerKey, TestIssuer

CLIENT_ID = "pgwarden-console"
DATA_AUDIENCE = "pgwarden-test"


@dataclass
class Issued:
    """A code handed out, and what its redemption must match."""

    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str
    claims: dict[str, Any]
    used: bool = False


@dataclass
class CodeFlow:
    """What the test issuer does at /authorize and /token; tests change the knobs."""

    issuer: TestIssuer
    key: IssuerKey
    # The person the authorization endpoint logs in.
    person: dict[str, Any] = field(
        default_factory=lambda: {"sub": "alice@example.com", "name": "Alice Approver"}
    )
    groups: list[str] = field(default_factory=lambda: ["approvers"])
    # Claims the ID token gets on top of (or instead of) the right ones: a wrong aud, nonce...
    id_token_overrides: dict[str, Any] = field(default_factory=dict)
    # The state sent back instead of the one received (a forged callback).
    state_override: str | None = None
    # Hand back the previous code again instead of a new one (a replayed code).
    replay_last_code: bool = False
    codes: dict[str, Issued] = field(default_factory=dict)
    last_code: str | None = None
    # The last redirect to the client's callback, as the browser followed it.
    last_callback: str | None = None
    refusals: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        url = self.issuer.url
        self.issuer.metadata.update(
            {"authorization_endpoint": f"{url}/authorize", "token_endpoint": f"{url}/token"}
        )
        self.issuer.routes[("GET", "/authorize")] = self.authorize
        self.issuer.routes[("POST", "/token")] = self.token

    def authorize(
        self, path: str, headers: Message, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        q = {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}
        if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256":
            return 400, {}, b"code flow with S256 only"
        if self.replay_last_code and self.last_code is not None:
            code = self.last_code
        else:
            code = secrets.token_urlsafe(16)
            self.codes[code] = Issued(
                client_id=q["client_id"],
                redirect_uri=q["redirect_uri"],
                challenge=q["code_challenge"],
                nonce=q.get("nonce", ""),
                claims={**self.person, "groups": list(self.groups)},
            )
        self.last_code = code
        state = self.state_override if self.state_override is not None else q["state"]
        self.last_callback = q["redirect_uri"] + "?" + urlencode({"code": code, "state": state})
        return 302, {"Location": self.last_callback}, b""

    def token(self, path: str, headers: Message, body: bytes) -> tuple[int, dict[str, str], bytes]:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        issued = self.codes.get(form.get("code", ""))
        problem = None
        if issued is None or issued.used:
            problem = "invalid_grant"
        elif form.get("grant_type") != "authorization_code":
            problem = "unsupported_grant_type"
        elif (
            form.get("client_id") != issued.client_id
            or form.get("redirect_uri") != issued.redirect_uri
        ):
            problem = "invalid_grant"
        else:
            digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != issued.challenge:
                problem = "invalid_grant"
        if problem is not None or issued is None:
            self.refusals.append(problem or "invalid_grant")
            data = orjson.dumps({"error": problem})
            return 400, {"Content-Type": "application/json"}, data
        issued.used = True
        now = int(time.time())
        claims = {
            "iss": self.issuer.url,
            "aud": issued.client_id,
            "iat": now,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
            "nonce": issued.nonce,
            **issued.claims,
            **self.id_token_overrides,
        }
        data = orjson.dumps(
            {
                "access_token": secrets.token_urlsafe(16),
                "token_type": "Bearer",
                "id_token": self.key.sign(claims),
            }
        )
        return 200, {"Content-Type": "application/json"}, data


def code_flow_issuer() -> tuple[TestIssuer, CodeFlow]:
    issuer = TestIssuer()
    key = IssuerKey("RS256", kid="console-k1")
    issuer.keys.append(key)
    return issuer, CodeFlow(issuer, key)


def oidc_settings(issuer: TestIssuer) -> dict[str, Any]:
    """Gateway settings sections trusting `issuer` for the data path and the console."""
    return {
        "identity": {"oidc_issuer": issuer.url, "oidc_audience": DATA_AUDIENCE},
        "console": {"oidc_client_id": CLIENT_ID},
    }
