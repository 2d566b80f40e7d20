"""The floor a Python relay sets: frames parsed and relayed both ways, nothing else.

    uv run python bench/bare_relay.py --port P --upstream-port Q   # serves until killed

asyncio Protocols on uvloop, one upstream connection per client; every message's header is
read (as a gateway must, to know where statements start) and bytes are passed on as they
came, one write per read. No TLS, identity, policy, audit or masking: bench/relay.py runs
it beside pgwarden (`--variant bare`) so that what pgwarden adds to the relay is priced
against what any Python relay costs on the same machine in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
from typing import cast

import uvloop

_HEADER = struct.Struct("!cI")


class _Half(asyncio.Protocol):
    """One direction: counts whole messages in what it reads and writes it to its peer."""

    def __init__(self, startup: bool) -> None:
        self.peer: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None
        self._pending = bytearray()
        self._startup = startup
        self._held: list[bytes] = []
        self.messages = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is no subclass of asyncio.Transport, though it is one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )

    def data_received(self, data: bytes) -> None:
        buf = self._pending
        buf += data
        pos = 0
        if self._startup:
            # The first client packet has no type byte: a length, then the body.
            if len(buf) < 4:
                return
            (length,) = struct.unpack_from("!I", buf)
            if len(buf) < length:
                return
            pos = length
            # SSLRequest: answer N here; the real startup follows.
            if length == 8 and buf[4:8] == b"\x04\xd2\x16\x2f":
                assert self.transport is not None
                self.transport.write(b"N")
                del buf[:pos]
                return
            self._startup = False
        while len(buf) - pos >= 5:
            _, length = _HEADER.unpack_from(buf, pos)
            if len(buf) - pos < length + 1:
                break
            pos += length + 1
            self.messages += 1
        out = bytes(buf) if pos == len(buf) else bytes(buf[:pos])
        del buf[:pos]
        if not out:
            return
        if self.peer is None:
            self._held.append(out)
        else:
            self.peer.write(out)

    def connected(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        for chunk in self._held:
            peer.write(chunk)
        self._held.clear()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.peer is not None:
            self.peer.close()


async def _serve(port: int, upstream_host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def client() -> _Half:
        half = _Half(startup=True)

        async def connect() -> None:
            server_half = _Half(startup=False)
            up, _ = await loop.create_connection(lambda: server_half, upstream_host, upstream_port)
            assert half.transport is not None
            server_half.peer = half.transport
            half.connected(up)

        pending.add(task := loop.create_task(connect()))
        task.add_done_callback(pending.discard)
        return half

    server = await loop.create_server(client, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-host", default="127.0.0.1")
    p.add_argument("--upstream-port", type=int, required=True)
    args = p.parse_args()
    uvloop.run(_serve(args.port, args.upstream_host, args.upstream_port))


if __name__ == "__main__":
    main()
