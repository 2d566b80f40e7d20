"""The untyped first packets that open a connection, and their decoding by request code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final, Self, TypeAlias

from gateway.protocol._errors import ProtocolViolation
from gateway.protocol._wire import UINT32, BodyReader, check_secret_key, cstr, pack, packet

PROTOCOL_3_0: Final = 3 << 16
PROTOCOL_3_2: Final = (3 << 16) | 2
CANCEL_REQUEST_CODE: Final = 80877102
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The protocol version and the session parameters (user, database, options, `_pq_.*`)."""

    protocol_version: int = PROTOCOL_3_0
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def major(self) -> int:
        return self.protocol_version >> 16

    @property
    def minor(self) -> int:
        return self.protocol_version & 0xFFFF

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        version = r.uint32("protocol version")
        if version >> 16 != 3:
            raise r.fail(f"unsupported protocol version {version >> 16}.{version & 0xFFFF}")
        parameters: dict[str, str] = {}
        while name := r.cstring("parameter name"):
            # A repeated name would let two readers of the same packet disagree on, say, the
            # database; refusing it keeps what we decide on and what we forward the same.
            if name in parameters:
                raise r.fail(f"parameter {name!r} appears twice")
            parameters[name] = r.cstring(f"value of parameter {name!r}")
        r.end()
        return cls(version, parameters)

    def encode(self) -> bytes:
        parts = [pack(UINT32, self.protocol_version, "protocol version")]
        for name, value in self.parameters.items():
            if not name:
                raise ProtocolViolation("cannot encode an empty parameter name: it ends the list")
            parts.append(cstr(name, "parameter name"))
            parts.append(cstr(value, f"value of parameter {name!r}"))
        parts.append(b"\x00")
        return packet(b"".join(parts))


@dataclass(frozen=True, slots=True)
class _CodeOnlyRequest:
    """A request that is nothing but its code: the length is always 8."""

    request_code: ClassVar[int]

    @classmethod
    def decode(cls, body: bytes) -> Self:
        if body != UINT32.pack(cls.request_code):
            raise ProtocolViolation(f"malformed {cls.__name__}: expected 4 bytes, got {len(body)}")
        return cls()

    def encode(self) -> bytes:
        return packet(UINT32.pack(self.request_code))


@dataclass(frozen=True, slots=True)
class SSLRequest(_CodeOnlyRequest):
    request_code: ClassVar[int] = SSL_REQUEST_CODE


@dataclass(frozen=True, slots=True)
class GSSENCRequest(_CodeOnlyRequest):
    request_code: ClassVar[int] = GSSENC_REQUEST_CODE


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Sent on a new connection; the key is 4 bytes in 3.0 and up to 256 bytes in 3.2."""

    process_id: int
    secret_key: bytes

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        r.uint32("request code")
        pid = r.uint32("process ID")
        return cls(pid, check_secret_key(r.rest(), r.fail))

    def encode(self) -> bytes:
        key = check_secret_key(
            self.secret_key,
            lambda problem: ProtocolViolation(f"cannot encode CancelRequest: {problem}"),
        )
        return packet(
            UINT32.pack(CANCEL_REQUEST_CODE) + pack(UINT32, self.process_id, "process ID") + key
        )


StartupPacket: TypeAlias = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest

_REQUESTS: Final[dict[int, Callable[[bytes], StartupPacket]]] = {
    SSL_REQUEST_CODE: SSLRequest.decode,
    GSSENC_REQUEST_CODE: GSSENCRequest.decode,
    CANCEL_REQUEST_CODE: CancelRequest.decode,
}


def decode_startup(body: bytes) -> StartupPacket:
    """A first packet from the bytes after its length; any 3.x version is a StartupMessage."""
    r = BodyReader(body, "startup packet")
    code = r.uint32("request code")
    decode = _REQUESTS.get(code)
    if decode is not None:
        return decode(body)
    if code >> 16 == 3:
        return StartupMessage.decode(body)
    raise r.fail(f"unknown request code {code} (protocol {code >> 16}.{code & 0xFFFF})")
