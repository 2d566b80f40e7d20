"""End-to-end policy tests: real clients through the real gateway, real OPA, real PostgreSQL.

Helpers shared by the test_policy_* modules live here (the package owns no conftest).
"""

from __future__ import annotations

import atexit
import contextlib
import re
import socket
import socketserver
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
import pytest
from psycopg import sql
from psycopg.abc import Params
from psycopg.rows import TupleRow

import tests.harness
from cli.localpg import LocalCluster
from gateway.protocol import (
    ErrorResponse,
    FrontendMessage,
    PasswordMessage,
    StartupMessage,
    StartupPacket,
    Terminate,
)
from tests.harness import RunningGateway

REFUSED = "42501"
TESTS = Path(__file__).resolve().parent.parent


class GatewayHarness(Protocol):
    """What a test that runs gateways of its own uses of tests/harness.py."""

    def start_gateway(
        self, state_dir: Path, cluster: LocalCluster, opa: Path, **overrides: Any
    ) -> RunningGateway: ...

    def stop_gateway(self, gw: RunningGateway) -> None: ...

    def create_scratch_database(self, cluster: LocalCluster, prefix: str) -> tuple[str, str]: ...

    def drop_scratch_database(self, cluster: LocalCluster, name: str) -> None: ...


def harness(request: pytest.FixtureRequest) -> GatewayHarness:
    """The harness tests/conftest.py serves its gateway fixtures from (start_gateway,
    stop_gateway, scratch databases)."""
    module = request.config.pluginmanager.get_plugin(str(TESTS / "conftest.py"))
    assert module is not None and module.start_gateway is tests.harness.start_gateway
    return tests.harness


IN_FAILED_TRANSACTION = "25P02"
DECISION_ID = re.compile(r"decision id: [0-9A-Za-z-]{8,}")


@dataclass(frozen=True)
class Refusal:
    sqlstate: str | None
    message: str
    detail: str | None


def refusal_of(exc: BaseException) -> Refusal:
    assert isinstance(exc, psycopg.Error), f"not a database error: {exc!r}"
    diag = exc.diag
    return Refusal(diag.sqlstate, diag.message_primary or str(exc), diag.message_detail)


def assert_policy_refusal(
    r: Refusal, *, approval: bool = False, reason: str | None = None, decided: bool = True
) -> None:
    """A pgwarden refusal: 42501, names pgwarden (and the reason: in the message, or among
    the decision's other reasons in DETAIL's "also:"), decision id in DETAIL."""
    assert r.sqlstate == REFUSED, r
    assert "pgwarden" in r.message, r
    if approval:
        assert "approval required" in r.message, r
    else:
        assert "approval required" not in r.message, r
        if decided:
            assert "denied" in r.message, r
    if reason is not None:
        others = next(
            (line for line in (r.detail or "").splitlines() if line.startswith("also: ")), ""
        )
        assert reason in r.message or reason in others, r
    if decided:
        assert r.detail is not None and DECISION_ID.search(r.detail), r


# The cleartext of every classified column of customers (see cli/localpg.py), by column.
CUSTOMER_SECRETS = {
    "email": ("ada@example.com", "grace@example.org"),
    "phone": ("+44 20 7946 0001", "+1 202 555 0143"),
    "ssn": ("123-45-6789", "987-65-4321"),
    "card_number": ("4111111111111111", "5500000000000004"),
}
ALL_CUSTOMER_SECRETS = tuple(s for values in CUSTOMER_SECRETS.values() for s in values)


def assert_no_customer_secret(seen: Any) -> None:
    """No classified value of customers, whole, anywhere in what the client was given."""
    text = repr(seen)
    for secret in ALL_CUSTOMER_SECRETS:
        assert secret not in text, (secret, text[:500])


def connect(dsn: str, *, autocommit: bool = True) -> psycopg.Connection[TupleRow]:
    return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10)


def run_sql(dsn: str, text: str, params: Params | None = None) -> list[tuple[Any, ...]]:
    """One statement (or message) on a fresh autocommit connection; rows of the last result."""
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(text.encode() if params is None else text, params, prepare=False)
        return cur.fetchall() if cur.description is not None else []


def simple(conn: psycopg.Connection[TupleRow], text: str) -> list[tuple[Any, ...]]:
    """Send `text` as one simple-protocol Query message; the rows of its last result."""
    with psycopg.ClientCursor(conn) as cur:
        cur.execute(text.encode())
        rows = cur.fetchall() if cur.description is not None else []
        while cur.nextset():
            rows = cur.fetchall() if cur.description is not None else []
        return rows


def refused_by(dsn: str, text: str) -> Refusal:
    """Send `text` as a simple Query, expect an error, check the session is still usable."""
    with connect(dsn) as conn:
        try:
            rows = simple(conn, text)
        except psycopg.Error as exc:
            r = refusal_of(exc)
        else:
            raise AssertionError(f"not refused: {text!r} returned {rows!r}")
        # The session stays usable after a refusal.
        assert simple(conn, "SELECT 1") == [(1,)]
        return r


_DIRECT: dict[str, psycopg.Connection[TupleRow]] = {}


@atexit.register
def _close_direct() -> None:
    for conn in _DIRECT.values():
        conn.close()


def direct_conn(gateway: RunningGateway) -> psycopg.Connection[TupleRow]:
    dsn = gateway.direct_dsn()
    conn = _DIRECT.get(dsn)
    if conn is None or conn.closed:
        conn = _DIRECT[dsn] = psycopg.connect(dsn, autocommit=True)
    return conn


def direct(
    gateway: RunningGateway, text: str, params: Params | None = None
) -> list[tuple[Any, ...]]:
    """Straight to the database as superuser, bypassing the gateway."""
    with direct_conn(gateway).cursor() as cur:
        cur.execute(text if params is not None else text.encode(), params)
        return cur.fetchall() if cur.description is not None else []


_TOKENS: dict[tuple[str, tuple[str, ...]], str] = {}


def token_for(gateway: RunningGateway, *groups: str) -> str:
    """One token per gateway and groups (issuing loads the signing key each time)."""
    key = (str(gateway.settings.state_dir), groups)
    if key not in _TOKENS:
        _TOKENS[key] = gateway.token(f"agent:{'+'.join(groups) or 'nobody'}", groups=groups)
    return _TOKENS[key]


def fresh_table(gateway: RunningGateway, prefix: str = "t", rows: int = 3) -> str:
    """A table of our own (created directly) with `rows` rows: id int, v text."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = direct_conn(gateway)
    with conn.transaction():
        conn.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(sql.Identifier(name))
        )
        conn.execute(
            sql.SQL("INSERT INTO {} SELECT g, 'v' || g FROM generate_series(1, %s) g").format(
                sql.Identifier(name)
            ),
            (rows,),
        )
    return name


def table_rows(gateway: RunningGateway, name: str) -> list[tuple[Any, ...]]:
    return direct(gateway, f'SELECT id, v FROM "{name}" ORDER BY id')  # noqa: S608


def table_exists(gateway: RunningGateway, name: str) -> bool:
    return bool(direct(gateway, "SELECT to_regclass(%s) IS NOT NULL", (f'public."{name}"',))[0][0])


def original_rows(n: int = 3) -> list[tuple[int, str]]:
    return [(i, f"v{i}") for i in range(1, n + 1)]


def prepared_names(gateway: RunningGateway) -> list[str]:
    return [r[0] for r in direct(gateway, "SELECT name FROM pg_prepared_statements")]


# -- a misbehaving OPA -------------------------------------------------------------------


# Where the gateway reads the session rule (policy.session_path, default pgwarden/session).
SESSION_RULE_PATH = b"/v1/data/pgwarden/session"


class FaultServer:
    """A tiny HTTP server on 127.0.0.1 standing in for OPA, on its own threads.

    Every request is answered with `reply` (raw bytes, None: hang up without a word) after
    `delay` seconds; both can be changed while it runs. The session rule's path (read once
    per login) is answered with `session_reply`, by default as a real OPA without that rule
    answers it (undefined); it is not counted in `requests`.
    """

    def __init__(self, reply: bytes | None = None, delay: float = 0.0) -> None:
        self.reply = reply
        self.delay = delay
        self.session_reply: bytes | None = http_answer("200 OK", b"{}")
        self.requests = 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(10)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        chunk = sock.recv(65536)
                        if not chunk:
                            return
                        data += chunk
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    while len(body) < length:
                        chunk = sock.recv(65536)
                        if not chunk:
                            return
                        body += chunk
                    if head.split(b" ", 2)[1:2] == [SESSION_RULE_PATH]:
                        if outer.session_reply is not None:
                            sock.sendall(outer.session_reply)
                        return
                    outer.requests += 1
                    if outer.delay:
                        time.sleep(outer.delay)
                    if outer.reply is not None:
                        sock.sendall(outer.reply)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def http_answer(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


ALLOW_ALL = http_answer(
    "200 OK",
    b'{"result": {"action": "allow", "reasons": ["fault server allows"], '
    b'"approvers": [], "masks": []}}',
)


# -- a raw protocol client ---------------------------------------------------------------


class RawClient:
    """Speaks the v3 protocol over a plain socket, with pgwarden's own codec for messages."""

    def __init__(
        self, gateway: RunningGateway, token: str, target: str = "app", **params: str
    ) -> None:
        self.sock = socket.create_connection((gateway.host, gateway.port), timeout=15)
        startup = StartupMessage(parameters={"user": "tester", "database": target, **params})
        self.sock.sendall(startup.encode())
        code, body = self.read()
        assert code == ord("R") and body[:4] == b"\x00\x00\x00\x03", (chr(code), body)
        self.sock.sendall(PasswordMessage(token).encode())
        self.startup_reply = self.until_ready()

    def read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk
        return data

    def read(self) -> tuple[int, bytes]:
        code, length = struct.unpack("!BI", self.read_exact(5))
        return code, self.read_exact(length - 4)

    def until_ready(self) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        while True:
            code, body = self.read()
            out.append((chr(code), body))
            if code == ord("Z"):
                return out
            if code == ord("E") and ErrorResponse.decode(body).severity == "FATAL":
                return out

    def send(self, *messages: FrontendMessage | StartupPacket) -> None:
        self.sock.sendall(b"".join(m.encode() for m in messages))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(Terminate().encode())
        self.sock.close()


def errors_in(reply: list[tuple[str, bytes]]) -> list[ErrorResponse]:
    return [ErrorResponse.decode(body) for code, body in reply if code == "E"]
