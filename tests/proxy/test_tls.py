"""TLS on the listener (SSLRequest and direct TLS), the CVE-2021-23222 refusal, GSSENCRequest."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess

import psycopg
import pytest

from gateway.protocol import GSSENCRequest, SSLRequest, StartupMessage
from tests.harness import RunningGateway

from .wire import Closed, RawClient, errors

pytestmark = pytest.mark.server

SSL_QUERY = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def _tls_dsn(gateway: RunningGateway, token: str, **extra: str) -> str:
    params = {
        "host": "localhost",
        "sslmode": "verify-full",
        "sslrootcert": str(gateway.certs.ca_cert),
    }
    return gateway.dsn(token, **{**params, **extra})


def test_psycopg_verify_full(gateway: RunningGateway, admin_token: str) -> None:
    with psycopg.connect(_tls_dsn(gateway, admin_token), connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
        # pg_stat_ssl describes the gateway's own upstream connection: no TLS for target app.
        assert conn.execute(SSL_QUERY).fetchone() == (False,)


def test_psql_verify_full(gateway: RunningGateway, admin_token: str) -> None:
    out = subprocess.run(
        ["psql", "-X", "-At", _tls_dsn(gateway, admin_token), "-c", SSL_QUERY, "-c", r"\conninfo"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "f"
    assert "SSL connection" in out.stdout


def test_verify_full_refuses_wrong_host_name(gateway: RunningGateway, admin_token: str) -> None:
    # The certificate names localhost and 127.0.0.1; libpq must refuse another name.
    with pytest.raises(psycopg.OperationalError, match=r"does not match|certificate"):
        psycopg.connect(
            _tls_dsn(gateway, admin_token, host="127.0.0.2", hostaddr="127.0.0.1"),
            connect_timeout=10,
        )


def test_libpq_direct_tls(gateway: RunningGateway, admin_token: str) -> None:
    assert psycopg.pq.version() >= 170000, "psycopg's libpq must support sslnegotiation=direct"
    dsn = _tls_dsn(gateway, admin_token, sslnegotiation="direct")
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 'direct'").fetchone() == ("direct",)


def _direct_tls_client(gateway: RunningGateway, alpn: list[str] | None) -> RawClient:
    ctx = ssl.create_default_context(cafile=str(gateway.certs.ca_cert))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection((gateway.host, gateway.port), timeout=10)
    return RawClient(ctx.wrap_socket(raw, server_hostname="localhost"), timeout=10)


def test_raw_direct_tls_with_alpn(gateway: RunningGateway, admin_token: str) -> None:
    client = _direct_tls_client(gateway, ["postgresql"])
    try:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.selected_alpn_protocol() == "postgresql"
        client.login("app", admin_token)
        frames = client.query("SELECT 'over direct tls'")
        assert any(c == ord("D") and b"over direct tls" in b for c, b in frames)
    finally:
        client.close()


def test_raw_direct_tls_without_alpn_is_refused(gateway: RunningGateway, admin_token: str) -> None:
    """As PostgreSQL 17 does: direct TLS without ALPN "postgresql" could be a cross-protocol
    attack, so the connection is refused (at the handshake or right after it)."""
    try:
        client = _direct_tls_client(gateway, None)
    except (ssl.SSLError, ConnectionError):
        return  # refused during the handshake: fine
    try:
        with pytest.raises((Closed, ConnectionError, ssl.SSLError)):
            client.login("app", admin_token)
    finally:
        client.close()


def test_bytes_after_ssl_request_are_refused(gateway: RunningGateway, admin_token: str) -> None:
    """CVE-2021-23222: data piggybacked on SSLRequest must not be read as if it were encrypted."""
    client = RawClient.connect(gateway.host, gateway.port, timeout=5)
    try:
        startup = StartupMessage(parameters={"user": "tester", "database": "app"}).encode()
        client.send(SSLRequest().encode() + startup)
        first = client.read_byte()
        assert first != ord("S"), "the gateway agreed to TLS with plaintext bytes queued"
        client.buf[:0] = bytes([first])
        errs = errors([client.frame()])
        assert errs and errs[0].severity == "FATAL" and errs[0].sqlstate == "08P01"
        assert "unencrypted data after SSL request" in (errs[0].message or "")
        assert client.answers_or_closes(5) == "closed"
    finally:
        client.close()
    with psycopg.connect(gateway.dsn(admin_token), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_ssl_request_then_handshake_works(gateway: RunningGateway, admin_token: str) -> None:
    raw = socket.create_connection((gateway.host, gateway.port), timeout=10)
    raw.sendall(SSLRequest().encode())
    assert raw.recv(1) == b"S"
    ctx = ssl.create_default_context(cafile=str(gateway.certs.ca_cert))
    client = RawClient(ctx.wrap_socket(raw, server_hostname="localhost"), timeout=10)
    try:
        client.login("app", admin_token)
        assert errors(client.query("SELECT 1")) == []
    finally:
        client.close()


def test_gssenc_request_gets_n_then_startup_works(
    gateway: RunningGateway, admin_token: str
) -> None:
    client = RawClient.connect(gateway.host, gateway.port, timeout=10)
    try:
        client.send(GSSENCRequest().encode())
        assert client.read_byte() == ord("N")
        client.login("app", admin_token)
        frames = client.query("SELECT 'after gss'")
        assert any(c == ord("D") and b"after gss" in b for c, b in frames)
    finally:
        client.close()


def test_libpq_gssencmode_prefer_falls_back(gateway: RunningGateway, admin_token: str) -> None:
    with psycopg.connect(gateway.dsn(admin_token, gssencmode="prefer"), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
