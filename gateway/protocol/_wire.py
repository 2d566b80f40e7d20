"""Primitive readers and writers for message bodies, and the one helper that frames a body."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Final

from gateway.protocol._errors import MessageTooLarge, ProtocolViolation

# PostgreSQL refuses any message longer than MaxAllocSize - 1 (PQ_LARGE_MESSAGE_LIMIT);
# we never produce one either, so a peer never sees a frame it would reject on size alone.
MAX_MESSAGE_SIZE: Final = 0x3FFFFFFE

# PostgreSQL's MAX_STARTUP_PACKET_LENGTH: startup packets arrive before authentication,
# so the limit is small to keep unauthenticated peers cheap. As there, it bounds the body:
# the packet's length word counts itself too (at most 10004).
MAX_STARTUP_PACKET_SIZE: Final = 10000

INT16: Final = struct.Struct("!h")
UINT16: Final = struct.Struct("!H")
INT32: Final = struct.Struct("!i")
UINT32: Final = struct.Struct("!I")
HEADER: Final = struct.Struct("!BI")


def frame(type_code: int, body: bytes, max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """The whole wire form of a typed message: type byte, int32 length, body."""
    length = len(body) + 4
    if length > max_size:
        raise MessageTooLarge(length, max_size)
    return HEADER.pack(type_code, length) + body


def packet(body: bytes, max_size: int = MAX_STARTUP_PACKET_SIZE) -> bytes:
    """The whole wire form of an untyped first packet: int32 length, body (at most
    `max_size` bytes, as PostgreSQL bounds it)."""
    if len(body) > max_size:
        raise MessageTooLarge(len(body), max_size)
    return UINT32.pack(len(body) + 4) + body


class BodyReader:
    """A cursor over one message body; every read checks bounds and names what was missing."""

    __slots__ = ("_body", "_name", "_pos")

    def __init__(self, body: bytes, name: str) -> None:
        self._body = body
        self._name = name
        self._pos = 0

    def fail(self, problem: str) -> ProtocolViolation:
        return ProtocolViolation(f"malformed {self._name}: {problem}")

    def _need(self, n: int, what: str) -> int:
        pos = self._pos
        if len(self._body) - pos < n:
            raise self.fail(f"truncated {what} at offset {pos}")
        self._pos = pos + n
        return pos

    def byte(self, what: str) -> int:
        return self._body[self._need(1, what)]

    def int16(self, what: str) -> int:
        value: int = INT16.unpack_from(self._body, self._need(2, what))[0]
        return value

    def count16(self, what: str) -> int:
        # PostgreSQL reads these counts as unsigned (pq_getmsgint) and accepts up to 65535
        # parameters, so a "negative" int16 count is a large valid one, not an error.
        value: int = UINT16.unpack_from(self._body, self._need(2, what))[0]
        return value

    def int32(self, what: str) -> int:
        value: int = INT32.unpack_from(self._body, self._need(4, what))[0]
        return value

    def uint32(self, what: str) -> int:
        value: int = UINT32.unpack_from(self._body, self._need(4, what))[0]
        return value

    def count32(self, what: str) -> int:
        value = self.int32(what)
        if value < 0:
            raise self.fail(f"negative {what} {value}")
        return value

    def raw(self, n: int, what: str) -> bytes:
        pos = self._need(n, what)
        return self._body[pos : pos + n]

    def sized(self, what: str) -> bytes | None:
        """An int32 length then that many bytes; -1 means NULL."""
        n = self.int32(f"length of {what}")
        if n == -1:
            return None
        if n < 0:
            raise self.fail(f"negative length {n} of {what}")
        return self.raw(n, what)

    def cbytes(self, what: str) -> bytes:
        body = self._body
        pos = self._pos
        end = body.find(0, pos)
        if end < 0:
            raise self.fail(f"{what} at offset {pos} has no NUL terminator")
        self._pos = end + 1
        return body[pos:end]

    def cstring(self, what: str) -> str:
        return self.cbytes(what).decode("utf-8", "surrogateescape")

    def counted(self, n: int, size: int, what: str) -> None:
        """Reject a count whose items cannot fit in what is left, before building them."""
        if n * size > len(self._body) - self._pos:
            raise self.fail(
                f"{n} {what} cannot fit in the {len(self._body) - self._pos} bytes left"
            )

    def int16s(self, n: int, what: str) -> tuple[int, ...]:
        self.counted(n, 2, what)
        pos = self._need(2 * n, what)
        return struct.unpack_from(f"!{n}h", self._body, pos)

    def uint32s(self, n: int, what: str) -> tuple[int, ...]:
        self.counted(n, 4, what)
        pos = self._need(4 * n, what)
        return struct.unpack_from(f"!{n}I", self._body, pos)

    def rest(self) -> bytes:
        pos = self._pos
        self._pos = len(self._body)
        return self._body[pos:]

    def end(self) -> None:
        """Trailing bytes mean the peer and we disagree on a format: refuse, as PostgreSQL does."""
        left = len(self._body) - self._pos
        if left:
            raise self.fail(f"{left} unexpected trailing bytes")


def cstr(value: str, what: str) -> bytes:
    """A NUL-terminated UTF-8 string; raw bytes kept as surrogate escapes come back unchanged."""
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ProtocolViolation(f"cannot encode {what}: {exc.reason}") from None
    return cbytes(data, what)


def cbytes(data: bytes, what: str) -> bytes:
    if 0 in data:
        raise ProtocolViolation(f"cannot encode {what}: it contains a NUL byte")
    return data + b"\x00"


def pack(fmt: struct.Struct, value: int, what: str) -> bytes:
    try:
        return fmt.pack(value)
    except struct.error:
        raise ProtocolViolation(f"cannot encode {what}: {value} is out of range") from None


def pack_many(code: str, values: Iterable[int], what: str) -> bytes:
    items = tuple(values)
    try:
        return struct.pack(f"!{len(items)}{code}", *items)
    except struct.error:
        raise ProtocolViolation(f"cannot encode {what}: a value is out of range") from None


def count16(n: int, what: str) -> bytes:
    return pack(UINT16, n, f"number of {what}")


def sized(value: bytes | None) -> bytes:
    if value is None:
        return b"\xff\xff\xff\xff"
    return INT32.pack(len(value)) + value


def sized_many(values: Iterable[bytes | None]) -> bytes:
    return b"".join([sized(v) for v in values])


def show_type(type_code: int) -> str:
    """A type byte as a reader of an error message would want it: 'Q', or 0x00."""
    return repr(chr(type_code)) if 0x20 < type_code < 0x7F else f"0x{type_code:02x}"


# 3.0 keys are exactly 4 bytes; 3.2 lets the server choose up to 256 (PostgreSQL 18 uses 32).
MIN_SECRET_KEY: Final = 4
MAX_SECRET_KEY: Final = 256


def check_secret_key(key: bytes, fail: Callable[[str], ProtocolViolation]) -> bytes:
    if not MIN_SECRET_KEY <= len(key) <= MAX_SECRET_KEY:
        raise fail(f"secret key of {len(key)} bytes, must be {MIN_SECRET_KEY}..{MAX_SECRET_KEY}")
    return key
