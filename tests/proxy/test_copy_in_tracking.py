"""A Sync sent during COPY IN is ignored by the server; the gateway must keep each reply tied
to its statement, or a later statement's rows would go out unmasked (found by pg8000's suite)."""

from __future__ import annotations

import socket
import struct

import pytest

from gateway.protocol import (
    Bind,
    CopyData,
    CopyDone,
    DataRow,
    Execute,
    Parse,
    PasswordMessage,
    Query,
    StartupMessage,
    Sync,
    Terminate,
)
from tests.harness import RunningGateway

pytestmark = pytest.mark.server

PROBE = "SELECT ssn, card_number FROM customers ORDER BY id"


class WireClient:
    """Just enough of a frontend to send the exact message sequences under test."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.sendall(StartupMessage(parameters={"user": "x", "database": "app"}).encode())
        self._token = token
        self.until_ready()

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data

    def until_ready(self) -> list[tuple[bytes | None, ...]]:
        rows: list[tuple[bytes | None, ...]] = []
        while True:
            code = self._read(1)
            (length,) = struct.unpack("!i", self._read(4))
            body = self._read(length - 4)
            if code == b"R" and struct.unpack("!i", body[:4])[0] == 3:
                self.sock.sendall(PasswordMessage(self._token).encode())
            elif code == b"D":
                rows.append(DataRow.decode(body).values)
            elif code == b"E":
                raise AssertionError(f"error from the gateway: {body!r}")
            elif code == b"Z":
                return rows

    def query(self, sql: str) -> list[tuple[bytes | None, ...]]:
        self.sock.sendall(Query(sql.encode()).encode())
        return self.until_ready()

    def close(self) -> None:
        self.sock.sendall(Terminate().encode())
        self.sock.close()


@pytest.mark.parametrize("protocol", ["extended", "simple"])
def test_masks_still_apply_after_copy_in_with_a_sync_inside(
    gateway: RunningGateway, protocol: str
) -> None:
    token = gateway.token("admin:copy", groups=("admins",))  # admins are masked too
    client = WireClient(gateway.host, gateway.port, token)
    try:
        before = client.query(PROBE)
        assert before and all(b"123-45-6789" not in (v or b"") for row in before for v in row)
        client.query("CREATE TEMP TABLE copied (a int)")
        if protocol == "extended":  # what pg8000 sends for COPY FROM STDIN
            client.sock.sendall(
                Parse("", b"COPY copied FROM STDIN").encode()
                + Bind("", "").encode()
                + Execute("").encode()
                + Sync().encode()  # ignored by the server in COPY IN
                + CopyData(b"1\n").encode()
                + CopyDone().encode()
                + Sync().encode()
            )
        else:
            client.sock.sendall(
                Query(b"COPY copied FROM STDIN").encode()
                + Sync().encode()
                + CopyData(b"1\n").encode()
                + CopyDone().encode()
            )
        client.until_ready()
        assert client.query("SELECT count(*) FROM copied") == [(b"1",)]
        assert client.query(PROBE) == before
        assert client.query(PROBE) == before
    finally:
        client.close()
