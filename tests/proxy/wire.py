"""A raw-socket PostgreSQL client for tests that must control every byte sent to the gateway."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.protocol import (
    PROTOCOL_3_0,
    BackendKeyData,
    ErrorResponse,
    PasswordMessage,
    Query,
    StartupMessage,
)

_HEADER = struct.Struct("!BI")


class Closed(Exception):
    """The peer closed the connection."""


@dataclass
class RawClient:
    """Blocking socket plus a receive buffer; every read has a deadline."""

    sock: socket.socket | ssl.SSLSocket
    timeout: float = 10.0
    buf: bytearray = field(default_factory=bytearray)
    key: BackendKeyData | None = None

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 10.0) -> RawClient:
        sock = socket.create_connection((host, port), timeout=timeout)
        return cls(sock, timeout)

    @classmethod
    def direct(cls, socket_dir: Path, port: int, user: str, database: str) -> RawClient:
        """Straight to PostgreSQL over its Unix socket (trust), logged in, for comparisons."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10.0)
        sock.connect(str(socket_dir / f".s.PGSQL.{port}"))
        client = cls(sock)
        client.send(StartupMessage(PROTOCOL_3_0, {"user": user, "database": database}).encode())
        for code, body in client.until_ready_or_error():
            if code == ord("K"):
                client.key = BackendKeyData.decode(body)
        return client

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer from the gateway in time")
        self.sock.settimeout(left)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise Closed
        self.buf += chunk

    def read_byte(self) -> int:
        deadline = time.monotonic() + self.timeout
        while not self.buf:
            self._fill(deadline)
        b = self.buf[0]
        del self.buf[:1]
        return b

    def frame(self) -> tuple[int, bytes]:
        """The next typed frame (type, body); Closed at EOF, TimeoutError past the deadline."""
        deadline = time.monotonic() + self.timeout
        while True:
            if len(self.buf) >= 5:
                code, length = _HEADER.unpack_from(self.buf, 0)
                if len(self.buf) >= 1 + length:
                    body = bytes(self.buf[5 : 1 + length])
                    del self.buf[: 1 + length]
                    return code, body
            self._fill(deadline)

    def until_ready(self) -> list[tuple[int, bytes]]:
        """Frames up to and including ReadyForQuery."""
        out = []
        while True:
            code, body = self.frame()
            out.append((code, body))
            if code == ord("Z"):
                return out

    def login(self, target: str, token: str, **params: str) -> list[tuple[int, bytes]]:
        """Startup and the cleartext-password exchange, up to the first ReadyForQuery."""
        startup = {"user": "tester", "database": target, **params}
        self.send(StartupMessage(PROTOCOL_3_0, startup).encode())
        code, body = self.frame()
        if code == ord("E"):
            raise LoginRefused(ErrorResponse.decode(body))
        assert code == ord("R") and body[:4] == b"\x00\x00\x00\x03", (code, body)
        self.send(PasswordMessage(token).encode())
        frames = self.until_ready_or_error()
        for c, b in frames:
            if c == ord("K"):
                self.key = BackendKeyData.decode(b)
        return frames

    def until_ready_or_error(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            code, body = self.frame()
            out.append((code, body))
            if code == ord("E"):
                err = ErrorResponse.decode(body)
                if err.severity in ("FATAL", "PANIC"):
                    raise LoginRefused(err)
            if code == ord("Z"):
                return out

    def query(self, sql: str) -> list[tuple[int, bytes]]:
        self.send(Query(sql.encode()).encode())
        return self.until_ready()

    def answers_or_closes(self, seconds: float) -> str:
        """'answer' if a frame arrives, 'closed' if the peer closes; TimeoutError otherwise."""
        saved = self.timeout
        self.timeout = seconds
        try:
            self.frame()
            return "answer"
        except (Closed, ConnectionError):
            return "closed"
        finally:
            self.timeout = saved

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class LoginRefused(Exception):
    def __init__(self, error: ErrorResponse) -> None:
        super().__init__(f"{error.sqlstate}: {error.message}")
        self.error = error


def codes(frames: list[tuple[int, bytes]]) -> str:
    """The messages' type codes in order, as a string ("12DCZ")."""
    return "".join(chr(c) for c, _ in frames)


def errors(frames: list[tuple[int, bytes]]) -> list[ErrorResponse]:
    return [ErrorResponse.decode(b) for c, b in frames if c == ord("E")]
