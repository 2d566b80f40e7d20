"""Upstream logins for every target kind, and each bad token refused with the check it failed."""

from __future__ import annotations

import base64
import socket
import struct
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest

from cli.localpg import LocalCluster
from gateway.control.targets import Target
from gateway.identity.local import LocalTokenIssuer, open_signing_key, open_token_book
from gateway.protocol import CANCEL_REQUEST_CODE, PROTOCOL_3_0, ErrorResponse, StartupMessage
from tests.harness import RunningGateway, StoredTargets
from tests.integration import harness
from tests.integration.test_audit_support import records_after, wait_for

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
def test_upstream_login(
    gateway: RunningGateway, admin_token: str, target: str, user: str, tls: bool
) -> None:
    with psycopg.connect(gateway.dsn(admin_token, target=target), connect_timeout=10) as conn:
        assert conn.execute(WHO).fetchone() == (user, tls)
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)


def _refusal(gateway: RunningGateway, target: str, token: str, **params: str) -> ErrorResponse:
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


def _expired_token(gateway: RunningGateway) -> str:
    """Issued an hour ago for a minute: past its expiry and the verifier's leeway."""
    s = gateway.settings
    issuer = LocalTokenIssuer(
        open_signing_key(s),
        open_token_book(s),
        issuer=s.identity.local_issuer,
        audience=s.identity.local_audience,
        clock=lambda: time.time() - 3600,
    )
    try:
        return issuer.issue("agent:expired", ["admins"], 60).token
    finally:
        issuer.close()


def _good_client_still_connects(gateway: RunningGateway, token: str) -> None:
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
def test_bad_token_refused(
    gateway: RunningGateway, admin_token: str, case: str, check: str
) -> None:
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
        gateway.revoke(token)
    err = _refusal(gateway, "app", token)
    assert err.sqlstate == "28P01"
    assert err.message is not None and check in err.message
    for text in (err.message, err.detail or "", err.hint or ""):
        if token:
            assert token not in text
            assert token.split(".")[-1] not in text
    _good_client_still_connects(gateway, admin_token)


def test_bad_token_error_through_libpq_names_the_check(
    gateway: RunningGateway, admin_token: str
) -> None:
    token = _tamper_signature(gateway.token())
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(gateway.dsn(token), connect_timeout=10)
    assert "bad signature" in str(info.value)
    assert token not in str(info.value)


def test_unknown_target(gateway: RunningGateway, admin_token: str) -> None:
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
    gateway: RunningGateway, admin_token: str, name: str, reference: dict[str, str]
) -> None:
    registry = StoredTargets(gateway.settings)
    if registry.get(name) is None:
        registry.add(
            Target(
                name=name,
                host="127.0.0.1",
                port=gateway.cluster.port,
                dbname="postgres",
                user="postgres",
                sslmode="disable",
                password_env=reference.get("password_env"),
                password_file=reference.get("password_file"),
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


def test_replication_connection_refused(gateway: RunningGateway, admin_token: str) -> None:
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


def test_token_revoked_during_session_ends_it(gateway: RunningGateway) -> None:
    token = gateway.token("agent:revoked-later")
    with psycopg.connect(gateway.dsn(token), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        gateway.revoke(token)
        deadline = time.monotonic() + 5
        with pytest.raises(psycopg.OperationalError) as info:
            while time.monotonic() < deadline:
                conn.execute("SELECT 1")
                time.sleep(0.05)
        assert "token revoked" in str(info.value)
        assert conn.closed or conn.broken


def _auth_failures(gateway: RunningGateway, application_name: str) -> list[dict[str, Any]]:
    found = []
    for r in records_after(gateway.settings):
        body = r.record()
        if r.kind == "auth_failure" and body["application_name"] == application_name:
            found.append(body)
    return found


def _huge_jwt(gateway: RunningGateway, size: int) -> str:
    """A correctly signed token whose one claim makes it `size` bytes or more."""
    key = open_signing_key(gateway.settings)
    claims = {"iss": "pgwarden", "aud": "pgwarden", "sub": "agent:huge", "pad": "x" * size}
    return jwt.encode(claims, key.private_key, algorithm="EdDSA", headers={"kid": key.kid})


@pytest.mark.parametrize(
    "case", ["just over the bound", "garbage over 64 KiB", "JWT with a 1 MiB claim"]
)
def test_oversized_token_is_a_bad_token(
    gateway: RunningGateway, admin_token: str, case: str
) -> None:
    """Over identity.max_token_bytes: 28P01 "token too large" and an auth_failure record,
    however large the message (not 08P01 "expected a password message", nothing recorded)."""
    bound = gateway.settings.identity.max_token_bytes
    if case == "just over the bound":
        token = "a" * (bound + 1)
    elif case == "garbage over 64 KiB":
        token = "\x7f garbage " * 8000
    else:
        token = _huge_jwt(gateway, 1024 * 1024)
    app = f"huge-{uuid.uuid4().hex[:8]}"
    err = _refusal(gateway, "app", token, application_name=app)
    assert err.sqlstate == "28P01", err
    assert err.message == "pgwarden: token rejected: token too large"
    failures = wait_for(lambda: _auth_failures(gateway, app))
    assert [f["reason"] for f in failures] == ["token too large"]
    _good_client_still_connects(gateway, admin_token)


def test_oversized_token_through_libpq(gateway: RunningGateway) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(gateway.dsn("b" * 70_000), connect_timeout=10)
    assert "token too large" in str(info.value)


def test_token_at_the_bound_is_verified_not_refused_for_size(gateway: RunningGateway) -> None:
    bound = gateway.settings.identity.max_token_bytes
    err = _refusal(gateway, "app", "c" * bound)
    assert err.sqlstate == "28P01" and err.message == "pgwarden: token rejected: malformed token"


def test_revocation_ends_an_idle_session_at_once(gateway: RunningGateway) -> None:
    """Not at the next periodic recheck (identity.recheck_seconds, 30 s): within one poll of
    the token registry (identity.revocation_poll_seconds)."""
    token = gateway.token("agent:idle-revoked")
    client = RawClient.connect(gateway.host, gateway.port, timeout=10)
    try:
        client.login("app", token)
        client.query("SELECT 1")
        gateway.revoke(token)
        revoked = time.monotonic()
        client.timeout = 5  # well under the 30 s periodic recheck
        code, body = client.frame()
        ended = time.monotonic()
        assert code == ord("E")
        err = ErrorResponse.decode(body)
        assert (err.severity, err.sqlstate) == ("FATAL", "28P01")
        assert err.message == "pgwarden: session ended: token revoked"
        assert client.answers_or_closes(5) == "closed"
    finally:
        client.close()
    assert ended - revoked < gateway.settings.identity.recheck_seconds
    print(f"idle session ended {1000 * (ended - revoked):.0f} ms after `tokens revoke` returned")


def test_login_right_after_revoke_is_refused(gateway: RunningGateway) -> None:
    for _ in range(5):
        token = gateway.token("agent:revoked-then-login")
        _good_client_still_connects(gateway, token)  # verified once: remembered
        gateway.revoke(token)
        err = _refusal(gateway, "app", token)
        assert err.sqlstate == "28P01" and err.message == "pgwarden: token rejected: token revoked"


@pytest.mark.parametrize(
    ("case", "data"),
    [
        ("not a password message", b"Q\x00\x00\x00\x0dSELECT 1\x00"),
        ("no NUL", b"p\x00\x00\x00\x07abc"),
        ("length below 4", b"p\x00\x00\x00\x02"),
    ],
)
def test_malformed_password_message_is_an_audited_failed_login(
    gateway: RunningGateway, case: str, data: bytes
) -> None:
    app = f"badpw-{uuid.uuid4().hex[:8]}"
    client = RawClient.connect(gateway.host, gateway.port, timeout=10)
    try:
        client.send(
            StartupMessage(
                PROTOCOL_3_0, {"user": "t", "database": "app", "application_name": app}
            ).encode()
        )
        code, body = client.frame()
        assert code == ord("R")
        client.send(data)
        code, body = client.frame()
        err = ErrorResponse.decode(body)
        assert (code, err.severity, err.sqlstate) == (ord("E"), "FATAL", "08P01"), case
        assert client.answers_or_closes(5) == "closed"
    finally:
        client.close()
    failures = wait_for(lambda: _auth_failures(gateway, app))
    assert len(failures) == 1 and failures[0]["reason"].startswith("protocol violation"), case


_STARTUP = StartupMessage(PROTOCOL_3_0, {"user": "t", "database": "app"}).encode()


def _first_packet_answers(
    gateway: RunningGateway, pg_cluster: LocalCluster, data: bytes
) -> dict[str, str]:
    """What PostgreSQL (direct, over its socket) and the gateway each do with `data` sent as
    a connection's first bytes: 'answer' or 'closed'."""
    answers: dict[str, str] = {}
    for side in ("direct", "gateway"):
        if side == "direct":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client = RawClient(sock)
            sock.settimeout(10.0)
            sock.connect(str(pg_cluster.socket_dir / f".s.PGSQL.{pg_cluster.port}"))
        else:
            client = RawClient.connect(gateway.host, gateway.port, timeout=10)
        try:
            client.send(data)
            answers[side] = client.answers_or_closes(5)
        finally:
            client.close()
    return answers


@pytest.mark.parametrize(
    "data",
    [
        # node-postgres's Client#end() while its socket is still connecting writes Terminate
        # first, then its startup packet once connected: read as a length, 'X\0\0\0' is 1.4 GB.
        pytest.param(b"X\x00\x00\x00\x04" + _STARTUP, id="terminate-before-startup"),
        pytest.param(b"\x00\x00\x00\x04" + _STARTUP, id="length-below-8"),
        pytest.param(struct.pack("!I", 100_000) + _STARTUP[4:], id="length-above-maximum"),
        pytest.param(struct.pack("!II", 8, CANCEL_REQUEST_CODE), id="cancel-request-without-key"),
    ],
)
def test_a_first_packet_that_cannot_be_framed_is_closed_without_an_answer_as_postgresql_does(
    gateway: RunningGateway, pg_cluster: LocalCluster, data: bytes
) -> None:
    """PostgreSQL logs such a packet (COMMERROR) and closes without a word: whatever sent
    it is no client mid-login, and a client that gave up on its connection must not get an
    error for it (node-postgres raises one as an unhandled 'error' event)."""
    answers = _first_packet_answers(gateway, pg_cluster, data)
    assert answers == {"direct": "closed", "gateway": "closed"}
    # The gateway still serves the next client.
    with psycopg.connect(gateway.dsn(gateway.token("agent:after-unframed")), connect_timeout=10):
        pass


def _startup_of_length(length: int) -> bytes:
    """A startup packet whose length word says `length`, padded in application_name (built
    by hand: the codec refuses to encode one over the limit)."""
    head = struct.pack("!I", PROTOCOL_3_0) + b"user\0t\0database\0app\0application_name\0"
    pad = length - 4 - len(head) - 2
    return struct.pack("!I", length) + head + b"x" * pad + b"\0\0"


@pytest.mark.parametrize(("length", "answer"), [(10_004, "answer"), (10_005, "closed")])
def test_the_startup_packets_size_limit_is_postgresqls(
    gateway: RunningGateway, pg_cluster: LocalCluster, length: int, answer: str
) -> None:
    """PostgreSQL takes a startup packet whose body is up to 10,000 bytes (its length word
    counts itself too), and closes without a word on a longer one: so does the gateway."""
    data = _startup_of_length(length)
    answers = _first_packet_answers(gateway, pg_cluster, data)
    assert answers == {"direct": answer, "gateway": answer}


def test_a_token_that_expires_ends_its_idle_session_at_the_periodic_recheck(
    request: pytest.FixtureRequest, pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> None:
    """The periodic recheck (identity.recheck_seconds) is one sweep of the gateway's
    sessions, not a timer per session: an idle session whose token expires still ends
    within a period of its expiry, with no statement sent."""
    conftest = harness(request)
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-expiry-"))
    gw = conftest.start_gateway(
        state, pg_cluster, opa_binary, identity={"recheck_seconds": 0.5, "leeway_seconds": 0}
    )
    try:
        token = gw.token("agent:expiring", ttl=3)
        client = RawClient.connect(gw.host, gw.port, timeout=10)
        try:
            client.login("app", token)
            client.query("SELECT 1")
            client.timeout = 20  # the token expires in 3 s, the sweep runs every 0.5 s
            code, body = client.frame()
            assert code == ord("E")
            err = ErrorResponse.decode(body)
            assert (err.severity, err.sqlstate) == ("FATAL", "28P01")
            assert err.message == "pgwarden: session ended: token expired"
            assert client.answers_or_closes(5) == "closed"
        finally:
            client.close()
    finally:
        conftest.stop_gateway(gw)


def test_a_token_that_expires_ends_its_session_at_the_next_statement(
    request: pytest.FixtureRequest, pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> None:
    """Not at the recheck sweep (60 s here): the next statement after the expiry, also one
    relayed on its prepared plan, ends the session, and does not run."""
    conftest = harness(request)
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-expiry-stmt-"))
    gw = conftest.start_gateway(
        state, pg_cluster, opa_binary, identity={"recheck_seconds": 60, "leeway_seconds": 0}
    )
    try:
        token = gw.token("agent:expiring-busy", ttl=4)
        issued = time.time()
        with psycopg.connect(gw.dsn(token), autocommit=True, connect_timeout=10) as conn:
            for i in range(6):  # prepared by psycopg after 5: later ones run on the plan
                row = conn.execute("SELECT %s::int + 1", (i,), prepare=True).fetchone()
                assert row == (i + 1,)
            time.sleep(max(0.0, issued + 5 - time.time()))
            with pytest.raises(psycopg.OperationalError, match="token expired"):
                conn.execute("SELECT %s::int + 1", (7,), prepare=True)
    finally:
        conftest.stop_gateway(gw)
