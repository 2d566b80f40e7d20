"""TLS for both legs: the listener's server context, the upstream's client context, and an
in-memory TLS layer for client connections."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable
from pathlib import Path

from gateway.control.targets import Target


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    # PostgreSQL 17+ clients using direct TLS require the ALPN protocol "postgresql".
    ctx.set_alpn_protocols(["postgresql"])
    return ctx


def upstream_context(target: Target) -> ssl.SSLContext | None:
    """The client context for a target's sslmode; None for disable."""
    mode = target.sslmode
    if mode == "disable":
        return None
    if mode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=target.sslrootcert)
        ctx.check_hostname = mode == "verify-full"
    else:
        # prefer/require encrypt without verifying, as libpq does without a root cert.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class TlsLayer:
    """Server-side TLS over memory BIOs, so bytes already read (direct TLS) can be fed in.

    asyncio's start_tls cannot take back bytes the protocol has already received; this layer
    can, which is what direct TLS (the first byte is a ClientHello) needs.
    """

    __slots__ = ("_incoming", "_obj", "_outgoing", "_write_raw", "handshake_done")

    def __init__(self, ctx: ssl.SSLContext, write_raw: Callable[[bytes], None]) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._write_raw = write_raw
        self.handshake_done = False

    @property
    def alpn(self) -> str | None:
        return self._obj.selected_alpn_protocol()

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self._write_raw(pending)

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext; returns the plaintext it yields (maybe empty). Raises ssl.SSLError."""
        self._incoming.write(data)
        if not self.handshake_done:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return b""
            self.handshake_done = True
            self._flush()
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._obj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        self._flush()
        return b"".join(chunks)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self._obj.write(data)
        self._flush()

    def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, ssl.SSLWantReadError):
            self._obj.unwrap()
        self._flush()
