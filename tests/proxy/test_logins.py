"""Upstream logins for every target kind, and each bad token refused with the check it failed."""

from __future__ import annotations

import base64
import time
from typing import Any

import jwt
import psycopg
import pytest
from typer.testing import CliRunner

from cli.main import app as cli_app
from gateway.identity.local import LocalTokenIssuer, open_registry, open_signing_key
from gateway.proxy.targets import Target, TargetRegistry

from .wire import LoginRefused, RawClient

pytestmark = pytest.mark.server

WHO = "SELECT current_user, (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())"


@pytest.mark.parametrize(
    ("target", "user", "tls"),
    [
        ("app", "postgres", False),
        ("app_tls", "postgres", True),
        ("app_md5", "md5user", False),
        ("app_trust", "trustuser", False),
    ],
)
def test_upstream_login(gateway: Any, admin_token: str, target: str, user: str, tls: bool) -> None:
    with psycopg.connect(gateway.dsn(admin_token, target=target), connect_timeout=10) as conn:
        assert conn.execute(WHO).fetchone() == (user, tls)
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)


def _refusal(gateway: Any, target: str, token: str, **params: str) -> Any:
    client = RawClient.connect(gateway.host, gateway.port, timeout=10)
    try:
        with pytest.raises(LoginRefused) as info:
            client.login(target, token, **params)
        err = info.value.error
        assert err.severity == "FATAL"
        # Refused means closed.
        assert client.answers_or_closes(5) == "closed"
        return err
    finally:
        client.close()


def _tamper_signature(token: str) -> str:
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[0] ^= 0xFF
    return f"{head}.{body}.{base64.urlsafe_b64encode(bytes(raw)).rstrip(b'=').decode()}"


def _revoke(gateway: Any, token: str) -> None:
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    result = CliRunner().invoke(
        cli_app,
        ["tokens", "revoke", jti],
        env={"PGWARDEN_STATE_DIR": str(gateway.settings.state_dir)},
    )
    assert result.exit_code == 0, result.output


def _expired_token(gateway: Any) -> str:
    """Issued an hour ago for a minute: past its expiry and the verifier's leeway."""
    s = gateway.settings
    issuer = LocalTokenIssuer(
        open_signing_key(s),
        open_registry(s),
        issuer=s.identity.local_issuer,
        audience=s.identity.local_audience,
        clock=lambda: time.time() - 3600,
    )
    try:
        return issuer.issue("agent:expired", ["admins"], 60).token
    finally:
        issuer.close()


def _good_client_still_connects(gateway: Any, token: str) -> None:
    with psycopg.connect(gateway.dsn(token), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    ("case", "check"),
    [
        ("bad signature", "bad signature"),
        ("expired", "token expired"),
        ("malformed", "malformed token"),
        ("garbage", "malformed token"),
        ("revoked", "token revoked"),
        ("empty", "malformed token"),
    ],
)
def test_bad_token_refused(gateway: Any, admin_token: str, case: str, check: str) -> None:
    if case == "bad signature":
        token = _tamper_signature(gateway.token())
    elif case == "expired":
        token = _expired_token(gateway)
    elif case == "malformed":
        token = "eyJhbGciOiJFZERTQSJ9.bm90IGpzb24.c2ln"
    elif case == "garbage":
        token = "not a jwt at all"
    elif case == "empty":
        token = ""
    else:
        token = gateway.token()
        _revoke(gateway, token)
    err = _refusal(gateway, "app", token)
    assert err.sqlstate == "28P01"
    assert err.message is not None and check in err.message
    for text in (err.message, err.detail or "", err.hint or ""):
        if token:
            assert token not in text
            assert token.split(".")[-1] not in text
    _good_client_still_connects(gateway, admin_token)


def test_bad_token_error_through_libpq_names_the_check(gateway: Any, admin_token: str) -> None:
    token = _tamper_signature(gateway.token())
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(gateway.dsn(token), connect_timeout=10)
    assert "bad signature" in str(info.value)
    assert token not in str(info.value)


def test_unknown_target(gateway: Any, admin_token: str) -> None:
    err = _refusal(gateway, "no_such_target", admin_token)
    assert err.sqlstate == "3D000" and "no_such_target" in (err.message or "")
    _good_client_still_connects(gateway, admin_token)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("nocred_env", {"password_env": "PGWARDEN_TEST_NO_SUCH_VARIABLE"}),
        ("nocred_file", {"password_file": "/nonexistent/pgwarden-test.pw"}),
    ],
)
def test_target_whose_credential_is_missing_is_refused_cleanly(
    gateway: Any, admin_token: str, name: str, reference: dict[str, str]
) -> None:
    registry = TargetRegistry(gateway.settings.state_dir / "targets.json")
    if registry.get(name) is None:
        registry.add(
            Target(
                name=name,
                host="127.0.0.1",
                port=gateway.cluster.port,
                dbname="postgres",
                user="postgres",
                sslmode="disable",
                **reference,  # type: ignore[arg-type]
            )
        )
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(gateway.dsn(admin_token, target=name), connect_timeout=10)
    message = str(info.value)
    assert f"cannot read the credential of target {name}" in message
    assert f"pgwarden targets test {name}" in message
    # Not an internal error, and where the credential lives is the operator's business.
    assert "internal error" not in message
    assert next(iter(reference.values())) not in message
    _good_client_still_connects(gateway, admin_token)


def test_replication_connection_refused(gateway: Any, admin_token: str) -> None:
    for value in ("database", "true"):
        client = RawClient.connect(gateway.host, gateway.port, timeout=10)
        try:
            with pytest.raises(LoginRefused) as info:
                client.login("app", admin_token, replication=value)
        finally:
            client.close()
        assert info.value.error.sqlstate == "28000"
        assert "replication" in (info.value.error.message or "")
    _good_client_still_connects(gateway, admin_token)


def test_token_revoked_during_session_ends_it(gateway: Any) -> None:
    token = gateway.token("agent:revoked-later")
    with psycopg.connect(gateway.dsn(token), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        _revoke(gateway, token)
        deadline = time.monotonic() + 5
        with pytest.raises(psycopg.OperationalError) as info:
            while time.monotonic() < deadline:
                conn.execute("SELECT 1")
                time.sleep(0.05)
        assert "token revoked" in str(info.value)
        assert conn.closed or conn.broken
