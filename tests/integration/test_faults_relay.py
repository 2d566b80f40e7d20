"""Faults in the relay, through the real gateway: every frontend message type malformed
(truncated, empty, oversized, garbage), an exception inside a relay callback, a lost target.

Each must end the same way: a FATAL ErrorResponse with a message the client reads, the
connection closed in order, the statement that was running given an outcome, a session_end
record that says why, and no traceback in the gateway's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from gateway.protocol import (
    Bind,
    Close,
    CopyDone,
    CopyFail,
    Describe,
    ErrorResponse,
    Execute,
    Flush,
    FunctionCall,
    Parse,
    Query,
    Sync,
)
from gateway.proxy.session import ClientSession
from tests.harness import RunningGateway, TcpRelay, pipe, target_through
from tests.proxy.wire import Closed, LoginRefused, RawClient

from .test_audit_support import records_after, wait_for

pytestmark = pytest.mark.server


def frame(code: bytes, body: bytes) -> bytes:
    return code + struct.pack("!I", len(body) + 4) + body


# (frontend message type, body): each one the server could not read as that message.
MALFORMED: dict[str, bytes] = {
    # Describe / Close: 'S' or 'P', then a NUL-terminated name, nothing after.
    "Describe empty": frame(b"D", b""),
    "Describe bad kind": frame(b"D", b"Xname\x00"),
    "Describe no NUL": frame(b"D", b"Sname"),
    "Describe trailing bytes": frame(b"D", b"S\x00garbage"),
    "Close empty": frame(b"C", b""),
    "Close bad kind": frame(b"C", b"\x00\x00"),
    "Close no NUL": frame(b"C", b"Pportal"),
    # Bind / Execute / Parse / FunctionCall / Query: truncated, counts that cannot fit.
    "Bind empty": frame(b"B", b""),
    "Bind truncated": frame(b"B", b"\x00\x00\x00\x01"),
    "Bind count overflow": frame(b"B", b"\x00\x00\x00\x00\x03\xe8\x00\x00\x00\x00"),
    "Execute empty": frame(b"E", b""),
    "Execute truncated": frame(b"E", b"\x00\x00\x00"),
    "Execute trailing bytes": frame(b"E", b"\x00\x00\x00\x00\x00junk"),
    "Parse empty": frame(b"P", b""),
    "Parse no NUL": frame(b"P", b"s\x00SELECT 1"),
    "Parse type count overflow": frame(b"P", b"\x00SELECT $1\x00\x7f\xff\x00\x00\x00\x17"),
    "FunctionCall empty": frame(b"F", b""),
    "FunctionCall truncated": frame(b"F", b"\x00\x00\x03\xa8\x00\x01"),
    "Query empty": frame(b"Q", b""),
    "Query no NUL": frame(b"Q", b"SELECT 1"),
    # COPY messages: CopyDone has no body, CopyFail one NUL-terminated message.
    "CopyDone with a body": frame(b"c", b"x"),
    "CopyFail no NUL": frame(b"f", b"oops"),
    "CopyFail empty": frame(b"f", b""),
    # Sync and Flush have no body.
    "Sync with a body": frame(b"S", b"\x00"),
    "Flush with a body": frame(b"H", b"garbage"),
    # Unknown type codes, and a length that cannot be.
    "unknown type y": frame(b"y", b"whatever"),
    "unknown type NUL": frame(b"\x00", b""),
    "length below 4": b"Q\x00\x00\x00\x02",
    "garbage type and body": frame(b"\xf7", bytes(range(0x80, 0x100))),
}


def _login(gateway: RunningGateway, app: str) -> RawClient:
    client = RawClient.connect(gateway.host, gateway.port, timeout=10)
    client.login(
        "app", gateway.token("agent:relay-faults", groups=("admins",)), application_name=app
    )
    return client


def _fatal_then_closed(client: RawClient) -> ErrorResponse:
    """Reads until the FATAL; then the gateway must close (not hang, not say more)."""
    errors = []
    try:
        while True:
            code, body = client.frame()
            if code == ord("E"):
                errors.append(ErrorResponse.decode(body))
                if errors[-1].severity == "FATAL":
                    break
    except Closed:
        raise AssertionError(f"closed without a FATAL error (errors: {errors})") from None
    assert client.answers_or_closes(5) == "closed"
    return errors[-1]


def _session_records(gateway: RunningGateway, app: str, kind: str) -> list[dict[str, Any]]:
    found = []
    for r in records_after(gateway.settings):
        body = r.record()
        if r.kind == kind and body.get("application_name") == app:
            found.append(body)
    return found


def _outcomes_of(gateway: RunningGateway, app: str) -> list[dict[str, Any]]:
    """The outcome records of the statements of the session named `app`."""
    records = records_after(gateway.settings)
    requests = {
        r.id: r.record()
        for r in records
        if r.kind == "request" and r.record()["application_name"] == app
    }
    return [
        {**r.record(), "text": requests[r.record()["request_id"]]["text"]}
        for r in records
        if r.kind == "outcome" and r.record()["request_id"] in requests
    ]


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    for rec in caplog.records:
        assert rec.exc_info is None, f"traceback logged: {rec.getMessage()}"
        assert "Traceback" not in rec.getMessage(), rec.getMessage()
        assert rec.levelno < logging.ERROR, f"error logged: {rec.getMessage()}"


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_message_is_a_protocol_violation(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.WARNING)
    app = f"malformed-{uuid.uuid4().hex[:8]}"
    client = _login(gateway, app)
    try:
        # A statement first, so the violation comes mid-session, after real traffic.
        assert any(code == ord("C") for code, _ in client.query("SELECT 1"))
        client.send(MALFORMED[case])
        err = _fatal_then_closed(client)
    finally:
        client.close()
    assert err.sqlstate == "08P01", err
    assert err.message is not None and err.message.startswith("pgwarden: "), err
    assert len(err.message) > len("pgwarden: ")
    ends = wait_for(lambda: _session_records(gateway, app, "session_end"))
    assert len(ends) == 1
    assert ends[0]["reason"].startswith("protocol violation"), ends[0]
    _no_traceback(caplog)


def test_malformed_message_pipelined_behind_a_running_statement(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """The statement already forwarded gets an outcome; the session_end says why."""
    caplog.set_level(logging.WARNING)
    app = f"malformed-run-{uuid.uuid4().hex[:8]}"
    client = _login(gateway, app)
    try:
        client.send(Query(b"SELECT pg_sleep(0.3)").encode() + MALFORMED["Describe empty"])
        err = _fatal_then_closed(client)
    finally:
        client.close()
    assert err.sqlstate == "08P01"
    outcomes = wait_for(lambda: _outcomes_of(gateway, app))
    assert [o["text"] for o in outcomes] == ["SELECT pg_sleep(0.3)"]
    assert outcomes[0]["error_message"].startswith("not completed: protocol violation")
    ends = wait_for(lambda: _session_records(gateway, app, "session_end"))
    assert ends[0]["reason"].startswith("protocol violation")
    _no_traceback(caplog)


# Well-formed messages of every frontend type, to cut short and to pad.
WELL_FORMED: dict[str, Any] = {
    "Describe": Describe("S", "stmt"),
    "Close": Close("P", "portal"),
    "Bind": Bind("p", "s", (0,), (b"42", None), (1,)),
    "Execute": Execute("p", 10),
    "Parse": Parse("s", b"SELECT $1", (23,)),
    "FunctionCall": FunctionCall(1598, (0,), (b"1",), 0),
    "Query": Query(b"SELECT 1"),
    "CopyFail": CopyFail("stop"),
    "CopyDone": CopyDone(),
    "Sync": Sync(),
    "Flush": Flush(),
}


def _variants() -> dict[str, bytes]:
    """Each well-formed message truncated at its ends and middle, and with a byte too many;
    then seeded random bodies under every type byte that has a layout."""
    out: dict[str, bytes] = {}
    for name, message in WELL_FORMED.items():
        wire = message.encode()
        code, body = wire[:1], wire[5:]
        for cut in sorted({0, 1, len(body) // 2, len(body) - 1}):
            if 0 <= cut < len(body):
                out[f"{name} cut to {cut} bytes"] = frame(code, body[:cut])
        out[f"{name} one byte too long"] = frame(code, body + b"\xff")
    rng = random.Random(20261206)
    for i in range(24):
        code = bytes([rng.choice(b"BCDEFHPQScfy")])
        body = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 40)))
        out[f"random {code.decode()} #{i}"] = frame(code, body)
    return out


VARIANTS = _variants()


def test_every_malformed_variant_is_a_protocol_violation(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    token = gateway.token("agent:relay-faults", groups=("admins",))
    apps = {}
    for case, data in VARIANTS.items():
        app = f"variant-{uuid.uuid4().hex[:8]}"
        apps[app] = case
        client = RawClient.connect(gateway.host, gateway.port, timeout=10)
        try:
            client.login("app", token, application_name=app)
            client.send(data)
            err = _fatal_then_closed(client)
        finally:
            client.close()
        assert err.sqlstate == "08P01", (case, err)
        assert err.message is not None and len(err.message) > len("pgwarden: "), case

    def ends() -> dict[str, str] | None:
        found = {
            r.record()["application_name"]: r.record()["reason"]
            for r in records_after(gateway.settings)
            if r.kind == "session_end" and r.record()["application_name"] in apps
        }
        return found if len(found) == len(apps) else None

    for app, reason in wait_for(ends).items():
        assert reason.startswith("protocol violation"), (apps[app], reason)
    _no_traceback(caplog)


# -- an exception inside a relay callback ----------------------------------------------------


def _only_for(app: str, session: ClientSession) -> bool:
    startup = session._startup
    return startup is not None and startup.parameters.get("application_name") == app


def _internal_error_logged_once(caplog: pytest.LogCaptureFixture, secret: str) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "internal error RuntimeError" in errors[0].getMessage()
    for rec in caplog.records:
        assert secret not in rec.getMessage()


def test_exception_on_the_server_data_path(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING)
    app = f"server-bug-{uuid.uuid4().hex[:8]}"
    secret = f"secret-{uuid.uuid4().hex}"
    original = ClientSession._server_message

    def buggy(
        self: ClientSession, code: int, view: bytes | bytearray, pos: int, end: int
    ) -> bytes | None:
        if code == ord("C") and _only_for(app, self):
            raise RuntimeError(secret)
        return original(self, code, view, pos, end)

    monkeypatch.setattr(ClientSession, "_server_message", buggy)
    token = gateway.token("agent:relay-faults", groups=("admins",))
    with psycopg.connect(gateway.dsn(token, application_name=app), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InternalError_) as info:
            conn.execute("SELECT 'the running statement'")
        assert info.value.sqlstate == "XX000"
        assert "pgwarden: internal error" in str(info.value)
        assert conn.closed or conn.broken
    outcomes = wait_for(lambda: _outcomes_of(gateway, app))
    assert [o["text"] for o in outcomes] == ["SELECT 'the running statement'"]
    assert outcomes[0]["error_message"] == "not completed: internal error (RuntimeError)"
    ends = wait_for(lambda: _session_records(gateway, app, "session_end"))
    assert [e["reason"] for e in ends] == ["internal error (RuntimeError)"]
    _internal_error_logged_once(caplog, secret)


def test_exception_on_the_client_data_path(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING)
    app = f"client-bug-{uuid.uuid4().hex[:8]}"
    secret = f"secret-{uuid.uuid4().hex}"
    original = ClientSession._drain_client

    def buggy(self: ClientSession) -> None:
        if _only_for(app, self) and b"trigger" in self._inbuf:
            raise RuntimeError(secret)
        original(self)

    monkeypatch.setattr(ClientSession, "_drain_client", buggy)
    client = _login(gateway, app)
    try:
        client.send(Query(b"SELECT pg_sleep(0.5)").encode())
        time.sleep(0.2)  # forwarded and running when the next message arrives
        client.send(Query(b"SELECT 'trigger'").encode())
        err = _fatal_then_closed(client)
    finally:
        client.close()
    assert err.sqlstate == "XX000" and err.message == (
        "pgwarden: internal error; the session is closed"
    )
    outcomes = wait_for(lambda: _outcomes_of(gateway, app))
    assert [o["text"] for o in outcomes] == ["SELECT pg_sleep(0.5)"]
    assert outcomes[0]["error_message"] == "not completed: internal error (RuntimeError)"
    ends = wait_for(lambda: _session_records(gateway, app, "session_end"))
    assert [e["reason"] for e in ends] == ["internal error (RuntimeError)"]
    _internal_error_logged_once(caplog, secret)


# -- a lost target ---------------------------------------------------------------------------


def _session_named(gateway: RunningGateway, app: str) -> ClientSession:
    context = gateway.gateway.context
    assert context is not None
    found = [s for s in context.sessions if _only_for(app, s)]
    assert len(found) == 1
    return found[0]


def test_lost_target_gets_a_fatal_that_says_so(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    app = f"lost-{uuid.uuid4().hex[:8]}"
    client = _login(gateway, app)
    try:
        client.query("SELECT 1")
        session = _session_named(gateway, app)

        async def cut() -> None:
            assert session.up is not None
            session.up.transport.abort()  # as a network failure would

        gateway.run(cut())
        err = _fatal_then_closed(client)
    finally:
        client.close()
    assert err.sqlstate == "08006"
    assert err.message == "pgwarden: lost the connection to the target; the session is closed"
    ends = wait_for(lambda: _session_records(gateway, app, "session_end"))
    assert [e["reason"] for e in ends] == ["target closed the connection"]
    _no_traceback(caplog)


def test_writing_to_a_target_that_has_just_closed(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """The session has not yet heard that the target went away when the next statement is
    forwarded: the write finds the connection closed, and that is a lost target."""
    caplog.set_level(logging.WARNING)
    app = f"lost-write-{uuid.uuid4().hex[:8]}"
    client = _login(gateway, app)
    try:
        client.query("SELECT 1")
        session = _session_named(gateway, app)

        async def cut_unnoticed() -> None:
            assert session.up is not None
            lost = asyncio.Event()
            session.up.protocol.on_lost = lambda exc: lost.set()  # the session is not told
            session.up.transport.abort()
            await lost.wait()

        gateway.run(cut_unnoticed())
        client.send(Query(b"SELECT 'after the loss'").encode())
        err = _fatal_then_closed(client)
    finally:
        client.close()
    assert err.sqlstate == "08006", err
    outcomes = wait_for(lambda: _outcomes_of(gateway, app)[1:])
    assert outcomes[-1]["text"] == "SELECT 'after the loss'"
    assert outcomes[-1]["error_message"] == "not completed: target closed the connection"
    ends = wait_for(lambda: _session_records(gateway, app, "session_end"))
    assert [e["reason"] for e in ends] == ["target closed the connection"]
    _no_traceback(caplog)


class DropsAfterLogin(TcpRelay):
    """Hangs up on the gateway right after the server's first ReadyForQuery: the target is
    lost while the session is being set up."""

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
        seen = b""
        while data := upstream.recv(65536):
            client.sendall(data)
            seen += data
            if b"Z\x00\x00\x00\x05I" in seen:
                return


# With a startup option the gateway decides it (OPA, the audit) before its first write of
# the set-up, so the target's hang-up is all but sure to come before that write: a write to
# the closed connection must end the login as the hang-up does, never as an internal error.
@pytest.mark.parametrize(
    "options", [{}, {"options": "-c search_path=public"}], ids=["bare", "option"]
)
def test_target_lost_while_the_session_is_set_up(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture, options: dict[str, str]
) -> None:
    caplog.set_level(logging.WARNING)
    relay = DropsAfterLogin(gateway.cluster.port)
    app = f"lost-setup-{uuid.uuid4().hex[:8]}"
    token = gateway.token("agent:relay-faults", groups=("admins",))
    try:
        with target_through(gateway, f"app_drops_{relay.port}", relay.port) as name:
            client = RawClient.connect(gateway.host, gateway.port, timeout=10)
            try:
                with pytest.raises(LoginRefused) as info:
                    client.login(name, token, application_name=app, **options)
                assert client.answers_or_closes(5) == "closed"
            finally:
                client.close()
    finally:
        relay.close()
    assert info.value.error.severity == "FATAL"
    assert info.value.error.message == "pgwarden: the target closed the connection during login"
    ends = wait_for(lambda: _session_records(gateway, app, "session_end"))
    assert [e["reason"] for e in ends] == ["target closed the connection"]
    _no_traceback(caplog)


def test_target_ending_the_session_itself_is_relayed_once(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """pg_terminate_backend: the server's own FATAL (57P01) reaches the client, and pgwarden
    adds no second one before closing."""
    caplog.set_level(logging.WARNING)
    app = f"terminated-{uuid.uuid4().hex[:8]}"
    client = _login(gateway, app)
    try:
        client.query("SELECT 1")
        assert client.key is not None
        with psycopg.connect(gateway.direct_dsn(), autocommit=True) as direct:
            direct.execute("SELECT pg_terminate_backend(%s)", (client.key.process_id,))
        fatals = []
        with contextlib.suppress(Closed, ConnectionError):
            while True:
                code, body = client.frame()
                if code == ord("E"):
                    fatals.append(ErrorResponse.decode(body))
    finally:
        client.close()
    assert [(e.severity, e.sqlstate) for e in fatals] == [("FATAL", "57P01")]
    ends = wait_for(lambda: _session_records(gateway, app, "session_end"))
    assert [e["reason"] for e in ends] == ["target closed the connection"]
    _no_traceback(caplog)


class CorruptsAnAnswer(TcpRelay):
    """Pipes both ways; the target's answer to the Query holding `marker` reaches the gateway
    behind a frame whose declared length (2) no message can have."""

    def __init__(self, upstream_port: int, marker: bytes) -> None:
        super().__init__(upstream_port)
        self.marker = marker

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        armed = threading.Event()

        def to_target() -> None:
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    if self.marker in data:
                        armed.set()
                    upstream.sendall(data)

        threading.Thread(target=to_target, daemon=True).start()
        while data := upstream.recv(65536):
            if armed.is_set():
                armed.clear()
                data = b"N\x00\x00\x00\x02" + data
            client.sendall(data)


def test_a_target_frame_with_an_impossible_length_ends_the_session(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stream is framed as strictly as the client's: a length below 4 is not
    relayed (it would desynchronise the client), the session ends with 08P01."""
    caplog.set_level(logging.WARNING)
    marker = f"corrupt-{uuid.uuid4().hex[:8]}"
    relay = CorruptsAnAnswer(gateway.cluster.port, marker.encode())
    app = f"bad-target-frame-{uuid.uuid4().hex[:8]}"
    token = gateway.token("agent:relay-faults", groups=("admins",))
    try:
        with target_through(gateway, f"app_corrupt_{relay.port}", relay.port) as name:
            client = RawClient.connect(gateway.host, gateway.port, timeout=10)
            try:
                client.login(name, token, application_name=app)
                assert any(code == ord("C") for code, _ in client.query("SELECT 1"))
                client.send(Query(f"SELECT '{marker}'".encode()).encode())
                seen: list[int] = []
                err = None
                with contextlib.suppress(Closed):
                    while err is None:
                        code, body = client.frame()
                        seen.append(code)
                        if code == ord("E"):
                            err = ErrorResponse.decode(body)
                assert client.answers_or_closes(5) == "closed"
            finally:
                client.close()
    finally:
        relay.close()
    # Nothing of the corrupted stream reached the client before the error.
    assert seen == [ord("E")]
    assert err is not None
    assert (err.severity, err.sqlstate) == ("FATAL", "08P01")
    assert err.message == "pgwarden: malformed message from the target; session closed"
    ends = wait_for(lambda: _session_records(gateway, app, "session_end"))
    assert [e["reason"] for e in ends] == ["protocol violation by the target"]
