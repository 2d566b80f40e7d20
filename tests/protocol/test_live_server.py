"""Frames from a real PostgreSQL decode, and re-encode to the very bytes the server sent."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

import gateway.protocol as p
from cli.localpg import MD5_USER, SUPERUSER, TRUST_USER, LocalCluster

pytestmark = pytest.mark.server


class Wire:
    """A blocking client connection that reads whole frames with the codec's FrameReader."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.sock = socket.create_connection(("127.0.0.1", cluster.port), timeout=10)
        self.reader = p.FrameReader(p.MAX_MESSAGE_SIZE)

    def send(self, *messages: p.FrontendMessage | p.StartupMessage) -> None:
        self.sock.sendall(b"".join(m.encode() for m in messages))

    def until(self, type_code: int) -> Iterator[p.BackendMessage]:
        """Decode and yield every frame up to and including the first of `type_code`."""
        while True:
            for frame in self.reader.frames():
                message = p.decode_backend(frame.type, frame.body)
                assert message.encode() == frame.wire
                yield message
                if frame.type == type_code:
                    return
            data = self.sock.recv(65536)
            assert data, "server closed the connection"
            self.reader.feed(data)

    def close(self) -> None:
        self.sock.close()


def test_a_real_session_decodes_frame_for_frame(pg_cluster: LocalCluster) -> None:
    wire = Wire(pg_cluster)
    try:
        wire.send(
            p.StartupMessage(
                p.PROTOCOL_3_2,
                {"user": TRUST_USER, "database": "postgres", "_pq_.pgwarden_probe": "on"},
            )
        )
        startup = list(wire.until(ord("Z")))
        negotiated = [m for m in startup if isinstance(m, p.NegotiateProtocolVersion)]
        # The server answers an option it lacks by naming it and its own newest minor version.
        assert [m.unsupported_options for m in negotiated] == [("_pq_.pgwarden_probe",)]
        assert p.AuthenticationOk() in startup
        assert any(isinstance(m, p.BackendKeyData) for m in startup)
        assert p.ParameterStatus("client_encoding", "UTF8") in startup
        assert startup[-1] == p.ReadyForQuery("I")

        wire.send(p.Query(b"SELECT 1 AS a, NULL::text AS b, 'x'::text AS c; SELECT 1/0"))
        simple = list(wire.until(ord("Z")))
        rows = [m for m in simple if isinstance(m, p.RowDescription)]
        assert [f.name for f in rows[0].fields] == ["a", "b", "c"]
        assert rows[0].fields[0].type_oid == 23
        assert p.DataRow((b"1", None, b"x")) in simple
        assert p.CommandComplete("SELECT 1") in simple
        (error,) = [m for m in simple if isinstance(m, p.ErrorResponse)]
        assert (error.severity, error.sqlstate) == ("ERROR", "22012")
        assert simple[-1] == p.ReadyForQuery("I")

        wire.send(
            p.Parse("s1", b"SELECT $1::int + 1 AS n, pg_sleep(0)", (23,)),
            p.Describe("S", "s1"),
            p.Bind("", "s1", (1,), ((41).to_bytes(4, "big"),), (1,)),
            p.Execute("", 0),
            p.Close("S", "s1"),
            p.Sync(),
        )
        extended = list(wire.until(ord("Z")))
        kinds = [type(m) for m in extended]
        assert kinds[:4] == [
            p.ParseComplete,
            p.ParameterDescription,
            p.RowDescription,
            p.BindComplete,
        ]
        assert p.ParameterDescription((23,)) in extended
        assert p.DataRow(((42).to_bytes(4, "big"), b"")) in extended
        assert p.CloseComplete() in extended

        wire.send(
            p.Query(b"LISTEN jobs; NOTIFY jobs, 'hello'; DO $$BEGIN RAISE NOTICE 'hi'; END$$")
        )
        notices = list(wire.until(ord("Z")))
        assert any(
            isinstance(m, p.NotificationResponse) and (m.channel, m.payload) == ("jobs", "hello")
            for m in notices
        )
        assert any(isinstance(m, p.NoticeResponse) and m.message == "hi" for m in notices)
        wire.send(p.Terminate())
    finally:
        wire.close()


@pytest.mark.parametrize(
    ("user", "request_type"),
    [(MD5_USER, p.AuthenticationMD5Password), (SUPERUSER, p.AuthenticationSASL)],
)
def test_real_authentication_requests_decode(
    pg_cluster: LocalCluster, user: str, request_type: type[p.AuthenticationMessage]
) -> None:
    wire = Wire(pg_cluster)
    try:
        wire.send(p.StartupMessage(p.PROTOCOL_3_0, {"user": user, "database": "postgres"}))
        (request,) = wire.until(ord("R"))
        assert type(request) is request_type
        if isinstance(request, p.AuthenticationSASL):
            assert "SCRAM-SHA-256" in request.mechanisms
    finally:
        wire.close()
