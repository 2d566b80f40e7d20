"""A real SAML 2.0 identity provider for the tests, made with pysaml2's IdP side: its own RSA key
and certificate generated at test time, served on loopback, answering the console's
HTTP-Redirect AuthnRequest with a Response signed by xmlsec1 - or, when a test asks for a
`Fault`, a response wrong in exactly that one way."""

from __future__ import annotations

import base64
import datetime
import html
import re
import shutil
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

with warnings.catch_warnings():
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    from saml2 import BINDING_HTTP_REDIRECT, saml
    from saml2.config import IdPConfig
    from saml2.metadata import create_metadata_string
    from saml2.saml import NAME_FORMAT_BASIC, NAMEID_FORMAT_EMAILADDRESS, NameID
    from saml2.server import Server
    from saml2.sigver import pre_signature_part
    from saml2.time_util import in_a_while

# What a test may ask the IdP to get wrong; "none" is a good response.
Fault = Literal[
    "none",
    "unsigned",
    "other_key",
    "tampered_nameid",
    "tampered_group",
    "wrapped_assertion",
    "expired",
    "not_yet_valid",
    "no_expiry",
    "wrong_audience",
    "no_audience",
    "wrong_recipient",
    "wrong_destination",
    "unsolicited",
]


@dataclass(frozen=True)
class KeyPair:
    key_file: Path
    cert_file: Path


def make_key_pair(folder: Path, name: str) -> KeyPair:
    """An RSA key and a self-signed certificate for it, as PEM files in `folder`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    pair = KeyPair(folder / f"{name}.key", folder / f"{name}.crt")
    pair.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    pair.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


@dataclass
class Answer:
    """The IdP's answer to an AuthnRequest: what the browser POSTs to the ACS."""

    acs_url: str
    saml_response: str
    relay_state: str
    request_id: str
    sp_entity_id: str


@dataclass
class User:
    name_id: str = "alice@example.com"
    display_name: str = "Alice Example"
    groups: list[str] = field(default_factory=lambda: ["engineers", "approvers"])


def _idp_server(base_url: str, keys: KeyPair, sp_metadata: list[Path]) -> Any:
    xmlsec = shutil.which("xmlsec1")
    config = IdPConfig()
    config.load(
        {
            "entityid": f"{base_url}/idp",
            "metadata": {"local": [str(path) for path in sp_metadata]},
            "xmlsec_binary": xmlsec,
            "key_file": str(keys.key_file),
            "cert_file": str(keys.cert_file),
            "service": {
                "idp": {
                    "endpoints": {
                        "single_sign_on_service": [(f"{base_url}/sso", BINDING_HTTP_REDIRECT)]
                    },
                    "name_id_format": [NAMEID_FORMAT_EMAILADDRESS],
                    "policy": {"default": {"lifetime": {"minutes": 5}}},
                }
            },
        }
    )
    return Server(config=config)


class TestIdentityProvider:
    """The IdP: `answer()` for tests that drive the SP directly, `serve()` for a browser."""

    __test__ = False

    def __init__(self, folder: Path, base_url: str = "http://127.0.0.1:0") -> None:
        self.folder = folder
        self.keys = make_key_pair(folder, "idp")
        self.other_keys = make_key_pair(folder, "intruder")
        self.base_url = base_url
        self.user = User()
        self.fault: Fault = "none"
        # Sign the Response instead of the Assertion (both are allowed by the profile).
        self.sign_response_only = False
        # /metadata answers 503 (the IdP's metadata cannot be fetched).
        self.metadata_down = False
        self._rolled_over = 0
        self._sp_metadata: list[Path] = []
        self._start_servers()

    def roll_over_keys(self) -> None:
        """A new signing key and certificate, as an IdP rolls its own over: what it signs,
        and the metadata it writes or serves, use them from now on."""
        self._rolled_over += 1
        self.keys = make_key_pair(self.folder, f"idp-{self._rolled_over}")
        self._start_servers()

    def _start_servers(self) -> None:
        self._server = _idp_server(self.base_url, self.keys, self._sp_metadata)
        self._intruder = _idp_server(self.base_url, self.other_keys, self._sp_metadata)

    def register_sp(self, sp_metadata_xml: str) -> None:
        """Trust a service provider, as an IdP administrator does with its metadata."""
        path = self.folder / f"sp-metadata-{len(self._sp_metadata)}.xml"
        path.write_text(sp_metadata_xml)
        self._sp_metadata.append(path)
        self._start_servers()

    @property
    def entity_id(self) -> str:
        return str(self._server.config.entityid)

    def metadata_xml(self) -> str:
        md = create_metadata_string(None, config=self._server.config, sign=False)
        return md.decode() if isinstance(md, bytes) else str(md)

    def write_metadata(self) -> Path:
        path = self.folder / "idp-metadata.xml"
        path.write_text(self.metadata_xml())
        return path

    def answer(self, redirect_url: str) -> Answer:
        """Answer the AuthnRequest carried by the SP's redirect URL (HTTP-Redirect binding)."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(redirect_url).query).items()}
        request = self._server.parse_authn_request(query["SAMLRequest"], BINDING_HTTP_REDIRECT)
        message = request.message
        acs_url = str(message.assertion_consumer_service_url)
        sp_entity_id = str(message.issuer.text)
        return Answer(
            acs_url=acs_url,
            saml_response=self.response_for(str(message.id), acs_url, sp_entity_id),
            relay_state=query.get("RelayState", ""),
            request_id=str(message.id),
            sp_entity_id=sp_entity_id,
        )

    def answer_again(self, answer: Answer) -> Answer:
        """A fresh response (with the current fault) to the request `answer` answered."""
        return replace(
            answer,
            saml_response=self.response_for(answer.request_id, answer.acs_url, answer.sp_entity_id),
        )

    def response_for(self, request_id: str, acs_url: str, sp_entity_id: str) -> str:
        """A base64 SAMLResponse to `request_id`, with this IdP's current fault."""
        fault = self.fault
        in_response_to = "id-never-issued-by-the-sp" if fault == "unsolicited" else request_id
        user = self.user
        response = self._server.create_authn_response(
            identity={},
            in_response_to=in_response_to,
            destination=acs_url,
            sp_entity_id=sp_entity_id,
            name_id=NameID(format=NAMEID_FORMAT_EMAILADDRESS, text=user.name_id),
            authn={"class_ref": saml.AUTHN_PASSWORD, "authn_auth": self.entity_id},
            sign_response=False,
            sign_assertion=False,
        )
        if isinstance(response, str):
            from saml2.samlp import response_from_string

            response = response_from_string(response)
        assertion = response.assertion[0] if isinstance(response.assertion, list) else None
        if assertion is None:
            assertion = response.assertion
        assertion.attribute_statement = [
            saml.AttributeStatement(
                attribute=[
                    _attribute("groups", user.groups),
                    _attribute("displayName", [user.display_name]),
                ]
            )
        ]
        conditions = assertion.conditions
        confirmation = assertion.subject.subject_confirmation[0].subject_confirmation_data
        if fault == "expired":
            past = in_a_while(minutes=-10)
            conditions.not_on_or_after = past
            confirmation.not_on_or_after = past
            conditions.not_before = in_a_while(minutes=-20)
        elif fault == "not_yet_valid":
            conditions.not_before = in_a_while(minutes=10)
            conditions.not_on_or_after = in_a_while(minutes=20)
        elif fault == "no_expiry":
            conditions.not_on_or_after = None
            confirmation.not_on_or_after = None
        elif fault == "wrong_audience":
            conditions.audience_restriction[0].audience[0].text = "https://other-sp.example/"
        elif fault == "no_audience":
            conditions.audience_restriction = []
        elif fault == "wrong_recipient":
            confirmation.recipient = "https://other-sp.example/acs"
        elif fault == "wrong_destination":
            response.destination = "https://other-sp.example/acs"

        signer = self._intruder if fault == "other_key" else self._server
        if fault == "unsigned":
            xml = str(response.to_string().decode())
        elif self.sign_response_only:
            response.signature = pre_signature_part(response.id, signer.sec.my_cert, 1)
            xml = signer.sec.sign_statement(
                response.to_string(), node_name=_class_name(response), node_id=response.id
            )
        else:
            assertion.signature = pre_signature_part(assertion.id, signer.sec.my_cert, 1)
            xml = signer.sec.sign_statement(
                response.to_string(), node_name=_class_name(assertion), node_id=assertion.id
            )
        if fault == "tampered_nameid":
            xml = xml.replace(user.name_id, "mallory@example.com")
        elif fault == "tampered_group":
            xml = xml.replace(f">{user.groups[0]}<", ">admins<")
        elif fault == "wrapped_assertion":
            xml = _wrapped(xml, user)
        return base64.b64encode(xml.encode() if isinstance(xml, str) else xml).decode()

    @contextmanager
    def serve(self) -> Iterator[TestIdentityProvider]:
        """Serve /sso (answers with an auto-posting form) and /metadata on loopback."""
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path == "/metadata" and idp.metadata_down:
                    self._send(503, "text/plain", "metadata unavailable")
                elif path == "/metadata":
                    self._send(200, "application/samlmetadata+xml", idp.metadata_xml())
                elif path == "/sso":
                    answer = idp.answer(self.path)
                    self._send(200, "text/html; charset=utf-8", post_form(answer))
                else:
                    self._send(404, "text/plain", "not found")

            def _send(self, status: int, content_type: str, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
        self._start_servers()
        thread = threading.Thread(target=httpd.serve_forever, name="test-saml-idp", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join()


def post_form(answer: Answer) -> str:
    """The HTTP-POST binding's page: a form to the ACS, sent by a click (or its script)."""
    fields = {"SAMLResponse": answer.saml_response, "RelayState": answer.relay_state}
    inputs = "".join(
        f'<input type="hidden" name="{name}" value="{html.escape(value)}">'
        for name, value in fields.items()
    )
    return (
        "<!doctype html><html><head><title>Test IdP</title></head><body>"
        f'<form method="post" action="{html.escape(answer.acs_url)}">{inputs}'
        '<button type="submit">Continue to pgwarden</button></form>'
        "</body></html>"
    )


def _wrapped(xml: str, user: User) -> str:
    """Signature wrapping: an unsigned copy of the signed assertion, naming someone else with
    other groups, put before the genuine one (whose signature still verifies)."""
    found = re.search(r"<(\w+):Assertion .*?</\1:Assertion>", xml, re.S)
    assert found is not None
    evil = re.sub(r"<(\w+):Signature .*?</\1:Signature>", "", found.group(0), flags=re.S)
    evil = re.sub(r'ID="[^"]+"', 'ID="id-evil-copy"', evil, count=1)
    evil = evil.replace(user.name_id, "mallory@example.com").replace(
        f">{user.groups[0]}<", ">admins<"
    )
    return xml[: found.start()] + evil + xml[found.start() :]


def _attribute(name: str, values: list[str]) -> Any:
    return saml.Attribute(
        name=name,
        name_format=NAME_FORMAT_BASIC,
        attribute_value=[saml.AttributeValue(text=value) for value in values],
    )


def _class_name(instance: Any) -> str:
    return f"{instance.c_namespace}:{instance.c_tag}"
