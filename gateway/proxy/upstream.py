"""The gateway's own connection to a target: TLS per sslmode, login with the target's
credential (SCRAM-SHA-256, md5, trust), then a transport handed to the session's relay."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

import scramp

from gateway.control.targets import Target, TargetError
from gateway.protocol import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    CancelRequest,
    ErrorResponse,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    PasswordMessage,
    ProtocolViolation,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    StartupMessage,
    decode_backend,
    frame_header,
)
from gateway.protocol.codes import ENCRYPTION_ACCEPTED
from gateway.proxy.tls import upstream_context

# No login message of a server comes near this; a length beyond it is a broken stream.
_LOGIN_MESSAGE_LIMIT = 1 << 24
log = logging.getLogger("pgwarden.upstream")


class UpstreamError(Exception):
    """The target could not be reached or refused the gateway's login.

    The message is safe to show the client: it never holds the target's credential.
    """

    def __init__(self, message: str, sqlstate: str = "08001", detail: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        # For the gateway's log only, never the client.
        self.detail = detail


class UpstreamProtocol(asyncio.Protocol):
    """Buffers frames during login; afterwards hands every chunk to the session's relay."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self._closed = False
        # Set by the session once the login is done.
        self.on_data: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[BaseException | None], None] | None = None
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Nagle would hold each small message back waiting for the previous ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
            return
        self._buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        return False

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, data: bytes) -> None:
        """A write of the login or the session's set-up: a target already gone is the
        UpstreamError the reads raise, not the transport's own error (uvloop raises
        RuntimeError on a closed handle) surfacing as a bug."""
        transport = self.transport
        if self._closed or transport is None or transport.is_closing():
            raise UpstreamError("the target closed the connection during login")
        transport.write(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self._lost = exc
        self._wake()
        if self.on_lost is not None:
            self.on_lost(exc)

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause()

    def resume_writing(self) -> None:
        if self.on_resume is not None:
            self.on_resume()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        if self._closed:
            raise UpstreamError("the target closed the connection during login")
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter
        self._waiter = None

    async def wait_closed(self) -> None:
        """Until the connection is lost: after close(), a TLS shutdown takes a few turns of
        the loop, and a loop closed before then leaves the socket to the garbage collector."""
        while not self._closed:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None

    async def read_byte(self) -> int:
        while not self._buf:
            await self._wait()
        b = self._buf[0]
        del self._buf[0]
        return b

    async def read_frame(self) -> tuple[int, bytes]:
        while True:
            if len(self._buf) >= 5:
                try:
                    code, length = frame_header(self._buf, 0, _LOGIN_MESSAGE_LIMIT)
                except ProtocolViolation:
                    raise UpstreamError(
                        "the target sent a malformed message during login"
                    ) from None
                if len(self._buf) >= length + 1:
                    body = bytes(self._buf[5 : length + 1])
                    del self._buf[: length + 1]
                    return code, body
            await self._wait()

    def take_buffered(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data


@dataclass
class UpstreamConnection:
    protocol: UpstreamProtocol
    transport: asyncio.Transport
    process_id: int
    secret_key: bytes
    parameters: dict[str, str] = field(default_factory=dict)
    # Bytes that arrived after ReadyForQuery during login (normally none).
    leftover: bytes = b""
    # How the target authenticated the gateway: trust, password, md5, SCRAM-SHA-256[-PLUS].
    auth_method: str = "trust"


def _md5_password(user: str, password: str, salt: bytes) -> str:
    inner = hashlib.md5((password + user).encode()).hexdigest()  # noqa: S324 - PostgreSQL's md5 auth
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()  # noqa: S324


async def connect_upstream(
    target: Target,
    environ: Mapping[str, str],
    parameters: Mapping[str, str],
    *,
    database: str | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - bounds the whole login, not one await
) -> UpstreamConnection:
    """Open a logged-in connection to `target`'s `database` (None: its default), sending the
    client's allowed `parameters`."""
    params = {**parameters, "database": database or target.dbname}
    try:
        return await asyncio.wait_for(_connect(target, environ, params), timeout)
    except TimeoutError:
        raise UpstreamError(f"timed out connecting to target {target.name}") from None
    except OSError as exc:
        raise UpstreamError(
            f"cannot connect to target {target.name}: {exc.strerror or exc}"
        ) from None
    except ssl.SSLError as exc:
        raise UpstreamError(f"TLS with target {target.name} failed: {exc.reason or exc}") from None


async def _connect(
    target: Target, environ: Mapping[str, str], parameters: Mapping[str, str]
) -> UpstreamConnection:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(UpstreamProtocol, target.host, target.port)
    try:
        return await _login(loop, transport, proto, target, environ, parameters)
    except BaseException:
        transport.abort()
        raise


async def _login(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.Transport,
    proto: UpstreamProtocol,
    target: Target,
    environ: Mapping[str, str],
    parameters: Mapping[str, str],
) -> UpstreamConnection:
    ctx = upstream_context(target)
    if ctx is not None:
        proto.send(SSLRequest().encode())
        answer = await proto.read_byte()
        if proto.take_buffered():
            # Bytes after the 'S' were not protected by TLS (CVE-2021-23222): refuse them.
            raise UpstreamError(
                f"target {target.name} sent unencrypted data after accepting TLS", "08P01"
            )
        if answer == ENCRYPTION_ACCEPTED:
            new_transport = await loop.start_tls(
                transport, proto, ctx, server_hostname=target.host if ctx.check_hostname else None
            )
            transport = cast(asyncio.Transport, new_transport)
            proto.transport = transport
        elif target.sslmode != "prefer":
            raise UpstreamError(
                f"target {target.name} does not accept TLS (sslmode={target.sslmode})"
            )
    params = {"database": target.dbname, **parameters, "user": target.user}
    proto.send(StartupMessage(parameters=params).encode())
    try:
        password = target.password(environ)
    except TargetError as exc:
        # The detail (variable or file) is for the operator's log; the client learns only
        # that the gateway lacks the credential.
        raise UpstreamError(
            f"the gateway cannot read the credential of target {target.name}"
            f" (an administrator can check it with: pgwarden targets test {target.name})",
            sqlstate="08004",
            detail=str(exc),
        ) from None
    scram: scramp.ScramClient | None = None
    auth_method = "trust"
    process_id, secret = 0, b""
    server_params: dict[str, str] = {}
    while True:
        code, body = await proto.read_frame()
        msg = decode_backend(code, body)
        if isinstance(msg, AuthenticationOk):
            continue
        if isinstance(msg, AuthenticationCleartextPassword | AuthenticationMD5Password):
            if password is None:
                raise UpstreamError(
                    f"target {target.name} asks for a password and none is configured", "28000"
                )
            answer_pw = (
                _md5_password(target.user, password, msg.salt)
                if isinstance(msg, AuthenticationMD5Password)
                else password
            )
            proto.send(PasswordMessage(answer_pw).encode())
            auth_method = "md5" if isinstance(msg, AuthenticationMD5Password) else "password"
        elif isinstance(msg, AuthenticationSASL):
            if password is None:
                raise UpstreamError(
                    f"target {target.name} asks for a password and none is configured", "28000"
                )
            mechanisms = list(msg.mechanisms)
            ssl_obj = transport.get_extra_info("ssl_object")
            channel_binding = None
            if ssl_obj is not None and "SCRAM-SHA-256-PLUS" in mechanisms:
                channel_binding = ("tls-server-end-point", ssl_obj)
            else:
                mechanisms = [m for m in mechanisms if not m.endswith("-PLUS")]
            scram = scramp.ScramClient(
                mechanisms, target.user, password, channel_binding=channel_binding
            )
            first = scram.get_client_first()
            auth_method = scram.mechanism_name
            proto.send(SASLInitialResponse(scram.mechanism_name, first.encode()).encode())
        elif isinstance(msg, AuthenticationSASLContinue):
            if scram is None:
                raise UpstreamError("target sent SASLContinue before SASL", "08P01")
            scram.set_server_first(msg.data.decode())
            proto.send(SASLResponse(scram.get_client_final().encode()).encode())
        elif isinstance(msg, AuthenticationSASLFinal):
            if scram is None:
                raise UpstreamError("target sent SASLFinal before SASL", "08P01")
            try:
                scram.set_server_final(msg.data.decode())
            except scramp.ScramException:
                raise UpstreamError(
                    f"target {target.name} failed SCRAM server verification", "28000"
                ) from None
        elif isinstance(msg, ParameterStatus):
            # Interned: every session keeps these, and their names and most values (UTF8,
            # on, the server's version) are the same in all of them.
            server_params[sys.intern(msg.name)] = sys.intern(msg.value)
        elif isinstance(msg, BackendKeyData):
            process_id, secret = msg.process_id, msg.secret_key
        elif isinstance(msg, ReadyForQuery):
            return UpstreamConnection(
                proto,
                transport,
                process_id,
                secret,
                server_params,
                proto.take_buffered(),
                auth_method,
            )
        elif isinstance(msg, ErrorResponse):
            # The server's own words may name the role or database, never the password.
            raise UpstreamError(
                f"target {target.name} refused the gateway's login: {msg.message}",
                "28000" if (msg.sqlstate or "").startswith("28") else "08004",
            )
        elif isinstance(msg, NoticeResponse | NegotiateProtocolVersion):
            continue
        else:
            raise UpstreamError(
                f"target {target.name} sent an unsupported authentication request", "08P01"
            )


def forward_cancel(
    target: Target, process_id: int, secret_key: bytes, *, timeout: float = 5.0
) -> asyncio.Future[None]:
    """Ask the target to cancel the query running on one of the gateway's connections; the
    future is done once the target has closed that cancel connection, which PostgreSQL does
    only after it has signalled the backend (or after `timeout`, or a failure, logged).

    The exchange runs on a thread of its own: a cancel must never wait for a turn of an
    event loop busy relaying (a COPY OUT streaming at full speed)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def exchange() -> None:
        try:
            with socket.create_connection((target.host, target.port), timeout=timeout) as sock:
                sock.sendall(CancelRequest(process_id, secret_key).encode())
                while sock.recv(64):
                    pass  # the server answers a cancel with nothing but closing
        except OSError as exc:
            log.warning("cancel for target %s not delivered: %s", target.name, exc)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle)

    threading.Thread(target=exchange, name="pgwarden-cancel", daemon=True).start()
    return done
