"""Sans-IO framing: cut a byte stream into whole frames without trusting the peer's lengths."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gateway.protocol._errors import MessageTooLarge, ProtocolViolation
from gateway.protocol._startup import StartupPacket, decode_startup
from gateway.protocol._wire import HEADER, MAX_STARTUP_PACKET_SIZE, UINT32, show_type


@dataclass(frozen=True, slots=True)
class RawFrame:
    """One whole typed frame, undecoded: what the proxy forwards when policy needs no more."""

    type: int
    wire: bytes

    @property
    def body(self) -> bytes:
        return self.wire[5:]


def _check_length(type_code: int, length: int, max_message_size: int) -> None:
    if length < 4:
        raise ProtocolViolation(f"message {show_type(type_code)} declares length {length}, below 4")
    if length > max_message_size:
        raise MessageTooLarge(length, max_message_size)


def frame_header(
    buf: bytes | bytearray | memoryview, pos: int, max_message_size: int
) -> tuple[int, int]:
    """(type, declared length) of the frame whose five header bytes start at `pos`.

    The one framing every reader of typed frames uses, the relay's hot paths included: a
    length below 4 or above `max_message_size` raises (MessageTooLarge for the latter) from
    the header alone, before a body that would be refused is waited for or buffered.
    """
    header: tuple[int, int] = _unpack_header(buf, pos)
    length = header[1]
    if length < 4 or length > max_message_size:
        _check_length(header[0], length, max_message_size)
    return header


_unpack_header = HEADER.unpack_from


def split_frames(
    buf: bytes | bytearray | memoryview, start: int, max_message_size: int
) -> tuple[list[tuple[int, int, int]], int]:
    """(type, frame start, frame end) of each whole frame from `start`, and where the rest begins.

    The proxy's hot path: no copies, no decoding. A header that declares a length below 4 or
    above `max_message_size` raises as soon as its five bytes are in `buf`.
    """
    frames: list[tuple[int, int, int]] = []
    append = frames.append
    size = len(buf)
    pos = start
    while size - pos >= 5:
        type_code, length = frame_header(buf, pos, max_message_size)
        end = pos + 1 + length
        if end > size:
            break
        append((type_code, pos, end))
        pos = end
    return frames, pos


class FrameReader:
    """Typed frames from a stream that arrives in any chunking.

    A bad length is detected from the five header bytes alone, so a peer cannot make us wait
    for (and buffer) a body we would refuse. After a violation the reader stays failed.
    `max_message_size` bounds the declared length (body plus the four length bytes).
    """

    __slots__ = ("_buffer", "_error", "_max", "_pos")

    def __init__(self, max_message_size: int) -> None:
        if max_message_size < 4:
            raise ValueError(f"max_message_size must be at least 4, got {max_message_size}")
        self._buffer = bytearray()
        self._pos = 0
        self._max = max_message_size
        self._error: ProtocolViolation | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def next_frame(self) -> RawFrame | None:
        """The next whole frame, or None until more bytes are fed."""
        if self._error is not None:
            raise self._error
        buf = self._buffer
        pos = self._pos
        if len(buf) - pos < 5:
            return None
        try:
            type_code, length = frame_header(buf, pos, self._max)
        except ProtocolViolation as exc:
            self._error = exc
            raise
        end = pos + 1 + length
        if end > len(buf):
            return None
        self._pos = end
        return RawFrame(type_code, bytes(buf[pos:end]))

    def frames(self) -> Iterator[RawFrame]:
        """Every whole frame buffered so far."""
        while (frame := self.next_frame()) is not None:
            yield frame

    @property
    def unconsumed(self) -> bytes:
        """Bytes received but not yet part of a returned frame."""
        return bytes(self._buffer[self._pos :])


class StartupReader:
    """The untyped first packet of a connection (startup, SSL/GSS request, cancel).

    `unconsumed` after a packet matters: bytes a client sent behind an SSLRequest, before
    the TLS handshake, must be refused rather than read as if they were encrypted.
    """

    __slots__ = ("_buffer", "_error", "_max")

    def __init__(self, max_startup_size: int = MAX_STARTUP_PACKET_SIZE) -> None:
        if max_startup_size < 8:
            raise ValueError(f"max_startup_size must be at least 8, got {max_startup_size}")
        self._buffer = bytearray()
        self._max = max_startup_size
        self._error: ProtocolViolation | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._buffer += data

    def next_packet(self) -> StartupPacket | None:
        """The first packet once it is whole, or None until more bytes are fed."""
        if self._error is not None:
            raise self._error
        buf = self._buffer
        if len(buf) < 4:
            return None
        (length,) = UINT32.unpack_from(buf, 0)
        try:
            if length < 8:
                raise ProtocolViolation(f"startup packet declares length {length}, below 8")
            if length - 4 > self._max:  # the body, as PostgreSQL counts
                raise MessageTooLarge(length - 4, self._max)
            if len(buf) < length:
                return None
            packet = decode_startup(bytes(buf[4:length]))
        except ProtocolViolation as exc:
            self._error = exc
            raise
        del buf[:length]
        return packet

    @property
    def unconsumed(self) -> bytes:
        """Bytes received after the packets returned so far."""
        return bytes(self._buffer)
