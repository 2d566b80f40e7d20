"""A write to a target that has already hung up, during the login or the session's set-up,
is the UpstreamError the reads raise ("the target closed the connection during login"), so
the client is told that and the session records why it ended: not a RuntimeError from
uvloop's closed handle, which the session reports as an internal error (seen under load in
tests/integration/test_faults_relay.py::test_target_lost_while_the_session_is_set_up).

A real socket under uvloop, the event loop the gateway runs on."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from gateway.proxy.upstream import UpstreamError, UpstreamProtocol


async def _hung_up() -> tuple[UpstreamProtocol, asyncio.Transport]:
    """A connection whose peer closed at once, after the loop has seen it go."""
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        closed.set()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, proto = await loop.create_connection(
        UpstreamProtocol, "127.0.0.1", port, family=socket.AF_INET
    )
    await closed.wait()
    for _ in range(200):
        if proto.closed:
            break
        await asyncio.sleep(0.01)
    server.close()
    await server.wait_closed()
    return proto, transport


def test_a_write_after_the_target_hung_up_is_an_upstream_error() -> None:
    async def scenario() -> None:
        proto, transport = await _hung_up()
        assert proto.closed
        # What the set-up used to do: uvloop refuses a write on the closed handle.
        with pytest.raises(RuntimeError):
            transport.write(b"Q\x00\x00\x00\x05\x00")
        with pytest.raises(UpstreamError) as info:
            proto.send(b"Q\x00\x00\x00\x05\x00")
        assert str(info.value) == "the target closed the connection during login"

    uvloop.run(scenario())
