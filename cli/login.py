"""`pgwarden login` / `pgwarden logout`: a person signs in at the identity provider (OIDC
device grant) or on the console, gets a short-lived pgwarden token from the gateway, and
finds it where libpq looks (`psql service=TARGET`); logout removes it and revokes it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
import jwt
import typer

from cli.context import fail, settings_of
from cli.device_grant import DeviceGrantError, poll_for_token, request_device_code
from cli.libpq_files import (
    LibpqFileError,
    ServiceEntry,
    check_service_name,
    password_file,
    remove_entry,
    service_file,
    write_entry,
)
from gateway.identity.oidc import _require_secure as require_secure
from gateway.settings import Settings

GatewayUrl = Annotated[
    str | None,
    typer.Option(
        "--gateway-url",
        envvar="PGWARDEN_GATEWAY_URL",
        help="The gateway's admin listener (default: admin.host and admin.port of the settings).",
    ),
]
# libpq's sslrootcert value for the system's certificate authorities (libpq 16+).
SYSTEM_CAS = "system"
Service = Annotated[
    str | None, typer.Option(help="The service name in ~/.pg_service.conf (default: TARGET).")
]


def _default_gateway_url(settings: Settings) -> str:
    admin = settings.admin
    scheme = "https" if admin.tls_cert is not None else "http"
    # Listening on every interface: this machine reaches it on loopback.
    host = "127.0.0.1" if not admin.host or _unspecified(admin.host) else admin.host
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{admin.port}"


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _gateway_error(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else f"HTTP {response.status_code}"


def _call_gateway(
    http: httpx.Client, method: str, url: str, token: str | None = None
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = http.request(method, url, headers=headers)
    except httpx.TransportError as exc:
        fail(f"the gateway cannot be reached at {url}: {exc}")
    if response.status_code != 200:
        fail(f"the gateway refused ({response.status_code}): {_gateway_error(response)}")
    body = response.json()
    if not isinstance(body, dict):
        fail(f"the gateway answered {url} without a JSON object")
    return body


def _via_oidc(
    http: httpx.Client, gateway: str, client_id: str | None, settings: Settings
) -> dict[str, Any]:
    """The device grant at the IdP, then its token exchanged at the gateway."""
    config = _call_gateway(http, "GET", f"{gateway}/login/config")
    issuer = str(config.get("oidc_issuer") or "")
    if not issuer:
        fail("the gateway trusts no OIDC issuer (identity.oidc_issuer): try --via console")
    client = client_id or settings.console.login_client_id or str(config.get("client_id") or "")
    if not client:
        fail("no OIDC client id: give --client-id or set console.login_client_id")
    scopes = config.get("scopes") or settings.console.login_scopes
    try:
        discovery = http.get(f"{issuer.rstrip('/')}/.well-known/openid-configuration").json()
    except (httpx.TransportError, ValueError) as exc:
        fail(f"the identity provider's discovery document cannot be read at {issuer}: {exc}")
    if not isinstance(discovery, dict) or discovery.get("issuer") != issuer:
        fail(f"the discovery document at {issuer} names another issuer")
    device_endpoint = discovery.get("device_authorization_endpoint")
    token_endpoint = discovery.get("token_endpoint")
    if not isinstance(device_endpoint, str) or not isinstance(token_endpoint, str):
        fail(
            f"the identity provider at {issuer} offers no device authorization grant"
            " (no device_authorization_endpoint): try --via console"
        )
    for url, what in (
        (device_endpoint, "device_authorization_endpoint"),
        (token_endpoint, "token_endpoint"),
    ):
        require_secure(url, what)
    where = "the identity provider"
    form = {"client_id": client}
    device = request_device_code(
        http, device_endpoint, form | {"scope": " ".join(map(str, scopes))}, where
    )
    _show(device.verification_uri, device.verification_uri_complete, device.user_code)
    answer = poll_for_token(http, token_endpoint, device, form, where)
    # The ID token is issued to this client (aud = client id), which the gateway's
    # identity.oidc_audience names; an IdP that sends none: its access token.
    idp_token = answer.get("id_token") or answer.get("access_token")
    if not isinstance(idp_token, str) or not idp_token:
        fail("the identity provider's token response holds neither an id_token nor an access_token")
    return _call_gateway(http, "POST", f"{gateway}/login/oidc", idp_token)


def _via_console(http: httpx.Client, gateway: str) -> dict[str, Any]:
    """The gateway's own device code, confirmed by the person signed in to its console (any
    way it offers, SAML included); the answer is the pgwarden token itself."""
    where = "the pgwarden console"
    device = request_device_code(http, f"{gateway}/login/device", {}, where)
    _show(device.verification_uri, device.verification_uri_complete, device.user_code)
    return poll_for_token(http, f"{gateway}/login/device/token", device, {}, where)


def _show(uri: str, complete: str | None, user_code: str) -> None:
    typer.echo(f"To sign in, open {complete or uri}")
    typer.echo(f"and confirm the code {user_code}")
    typer.echo("Waiting for the confirmation...", err=True)


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _entry(
    service: str, target: str, gateway: str, issued: dict[str, Any], sslrootcert: str | None
) -> ServiceEntry:
    try:
        listener = issued["listener"]
        host = listener["host"] or urlsplit(gateway).hostname or "127.0.0.1"
        params = {
            "host": str(host),
            "port": str(int(listener["port"])),
            "dbname": target,
            "user": str(issued["subject"]),
            # The token is a password: never over a connection whose server is not verified.
            "sslmode": "verify-full" if listener["tls"] else "disable",
        }
        token = str(issued["token"])
    except (KeyError, TypeError, ValueError):
        fail("the gateway's answer holds no token and listener")
    if sslrootcert and listener["tls"]:
        # `system` is libpq's word (16+) for the system's CAs, not a file.
        system = sslrootcert == SYSTEM_CAS
        params["sslrootcert"] = sslrootcert if system else os.path.abspath(sslrootcert)
    return ServiceEntry(service, params, token, gateway)


def login(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="The target to connect to (its dbname).")],
    gateway_url: GatewayUrl = None,
    service: Service = None,
    via: Annotated[
        Literal["oidc", "console"],
        typer.Option(help="oidc: device grant at the IdP; console: confirm on the console."),
    ] = "oidc",
    client_id: Annotated[
        str | None, typer.Option(help="OIDC client id (default: console.login_client_id).")
    ] = None,
    sslrootcert: Annotated[
        str | None,
        typer.Option(
            help="CA of the gateway's certificates (admin https and the listener);"
            " `system`: the system's CAs (libpq 16+)."
        ),
    ] = None,
) -> None:
    """Sign in and write a ~/.pg_service.conf entry and a ~/.pgpass line (0600) so that
    `psql service=TARGET` connects through the gateway; a second login replaces them."""
    settings = settings_of(ctx)
    name = service or target
    gateway = (gateway_url or _default_gateway_url(settings)).rstrip("/")
    try:
        check_service_name(name)
        require_secure(gateway, "--gateway-url")
    except ValueError as exc:
        fail(str(exc))
    with httpx.Client(timeout=httpx.Timeout(15.0), verify=_trust(sslrootcert)) as http:
        try:
            issued = (
                _via_console(http, gateway)
                if via == "console"
                else _via_oidc(http, gateway, client_id, settings)
            )
        except (DeviceGrantError, ValueError) as exc:
            fail(str(exc))
        except httpx.TransportError as exc:
            fail(f"cannot reach {exc.request.url}: {exc}")
    entry = _entry(name, target, gateway, issued, sslrootcert)
    try:
        services, passwords, replaced = write_entry(os.environ, entry)
    except LibpqFileError as exc:
        fail(str(exc))
    if replaced and replaced != entry.password:
        # The older login's token is no longer written anywhere: it should not stay usable.
        problem = _revoke(gateway, replaced, sslrootcert)
        if problem is not None:
            typer.echo(f"warning: the token this login replaced: {problem}", err=True)
    groups = ", ".join(issued.get("groups") or []) or "no groups"
    typer.echo(
        f"signed in as {issued['subject']} ({groups}); token {issued['token_id']}"
        f" expires {_when(float(issued['expires_at']))}"
    )
    typer.echo(f"wrote [{name}] to {services} and its password to {passwords}")
    if entry.params["sslmode"] == "verify-full" and "sslrootcert" not in entry.params:
        typer.echo(
            "note: the listener uses TLS and sslmode=verify-full checks its certificate against"
            " ~/.postgresql/root.crt; give --sslrootcert FILE (the gateway's CA) otherwise",
            err=True,
        )
    typer.echo(f'connect with: psql "service={name}"')


def logout(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="The target (or service) logged in to.")],
    gateway_url: GatewayUrl = None,
    service: Service = None,
) -> None:
    """Remove the service entry and its password line, and revoke the token at the gateway
    (the local entries go even when the gateway cannot be reached)."""
    name = service or target
    try:
        entry = remove_entry(os.environ, name)
    except LibpqFileError as exc:
        fail(str(exc))
    if entry is None:
        fail(
            f"no pgwarden login for service {name} in {service_file(os.environ)}"
            f" or {password_file(os.environ)}"
        )
    typer.echo(f"removed [{name}] and its password line")
    if not entry.password:
        return
    gateway = (gateway_url or entry.gateway_url or _default_gateway_url(settings_of(ctx))).rstrip(
        "/"
    )
    problem = _revoke(gateway, entry.password, entry.params.get("sslrootcert"))
    if problem is not None:
        fail(f"removed the local entries, but {problem}")


def _trust(sslrootcert: str | None) -> ssl.SSLContext | bool:
    """The CA that signed the gateway's certificates, else the system's."""
    if not sslrootcert or sslrootcert == SYSTEM_CAS:
        return True
    return ssl.create_default_context(cafile=sslrootcert)


def _revoke(gateway: str, token: str, sslrootcert: str | None) -> str | None:
    """Revoke `token` at the gateway: None when done (or it was no longer valid), else
    what went wrong and what the token's holder can still do with it."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = {}
    jti, expires = claims.get("jti", "?"), claims.get("exp")
    until = f" until {_when(float(expires))}" if isinstance(expires, int | float) else ""
    still = f"token {jti} stays valid{until}; an admin can run: pgwarden tokens revoke {jti}"
    try:
        with httpx.Client(timeout=httpx.Timeout(10.0), verify=_trust(sslrootcert)) as http:
            response = http.post(f"{gateway}/logout", headers={"Authorization": f"Bearer {token}"})
    except httpx.TransportError as exc:
        return f"the gateway at {gateway} could not be reached to revoke it ({exc}): {still}"
    if response.status_code == 200:
        typer.echo(f"revoked token {jti} at {gateway}")
        return None
    detail = _gateway_error(response)
    if response.status_code == 401 and ("revoked" in detail or "expired" in detail):
        typer.echo(f"token {jti} was no longer valid ({detail})")
        return None
    return f"the gateway refused to revoke it ({response.status_code}: {detail}): {still}"
