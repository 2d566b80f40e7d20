"""Framing under any chunking, and refusal of bad lengths before their bodies are buffered."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import gateway.protocol as p

from .corpus import BACKEND_FRAMES, FRONTEND_FRAMES, STARTUP_PACKETS
from .strategies import typed_messages

TYPED = [bytes.fromhex(h) for h in FRONTEND_FRAMES + BACKEND_FRAMES]
STARTUP = [bytes.fromhex(h) for h in STARTUP_PACKETS]


def header(type_code: int, length: int) -> bytes:
    return struct.pack("!BI", type_code, length)


@pytest.mark.parametrize("wire", TYPED, ids=lambda w: chr(w[0]))
def test_every_corpus_frame_read_one_byte_at_a_time(wire: bytes) -> None:
    reader = p.FrameReader(1 << 20)
    for i in range(len(wire) - 1):
        reader.feed(wire[i : i + 1])
        assert reader.next_frame() is None
    reader.feed(wire[-1:])
    frame = reader.next_frame()
    assert frame == p.RawFrame(wire[0], wire)
    assert frame.body == wire[5:]
    assert reader.next_frame() is None


@given(typed_messages)
def test_every_message_read_one_byte_at_a_time(
    message: p.FrontendMessage | p.BackendMessage,
) -> None:
    wire = message.encode()
    reader = p.FrameReader(p.MAX_MESSAGE_SIZE)
    got: list[p.RawFrame] = []
    for i in range(len(wire)):
        reader.feed(wire[i : i + 1])
        got.extend(reader.frames())
    assert got == [p.RawFrame(wire[0], wire)]


@pytest.mark.parametrize("wire", STARTUP)
def test_every_startup_packet_read_one_byte_at_a_time(wire: bytes) -> None:
    reader = p.StartupReader()
    for i in range(len(wire) - 1):
        reader.feed(wire[i : i + 1])
        assert reader.next_packet() is None
    reader.feed(wire[-1:])
    packet = reader.next_packet()
    assert packet is not None and packet.encode() == wire


def test_several_frames_in_one_chunk_and_a_partial_tail() -> None:
    a, b = p.Query(b"SELECT 1").encode(), p.Sync().encode()
    reader = p.FrameReader(1024)
    reader.feed(a + b + a[:7])
    assert [f.wire for f in reader.frames()] == [a, b]
    assert reader.unconsumed == a[:7]
    reader.feed(a[7:])
    assert reader.next_frame() == p.RawFrame(ord("Q"), a)


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    reader = p.FrameReader(max_message_size=1000)
    reader.feed(header(ord("D"), 1001))
    with pytest.raises(p.MessageTooLarge) as info:
        reader.next_frame()
    assert (info.value.length, info.value.limit) == (1001, 1000)


def test_a_length_of_two_gigabytes_is_refused_without_waiting_for_it() -> None:
    reader = p.FrameReader(p.MAX_MESSAGE_SIZE)
    reader.feed(header(ord("d"), 0xFFFFFFFF) + b"x")
    with pytest.raises(p.MessageTooLarge):
        reader.next_frame()


def test_the_limit_itself_is_allowed() -> None:
    reader = p.FrameReader(max_message_size=9)
    reader.feed(p.CopyData(b"12345").encode())
    assert reader.next_frame() is not None


@pytest.mark.parametrize("length", [0, 1, 3])
def test_a_length_below_four_is_a_violation(length: int) -> None:
    reader = p.FrameReader(1024)
    reader.feed(header(ord("Q"), length))
    with pytest.raises(p.ProtocolViolation, match="below 4") as info:
        reader.next_frame()
    assert not isinstance(info.value, p.MessageTooLarge)


def test_a_failed_reader_stays_failed() -> None:
    reader = p.FrameReader(16)
    reader.feed(header(ord("Q"), 17))
    with pytest.raises(p.MessageTooLarge):
        reader.next_frame()
    with pytest.raises(p.MessageTooLarge):
        reader.next_frame()
    with pytest.raises(p.MessageTooLarge):
        reader.feed(p.Sync().encode())


def test_reader_rejects_a_limit_that_no_frame_could_meet() -> None:
    with pytest.raises(ValueError):
        p.FrameReader(3)
    with pytest.raises(ValueError):
        p.StartupReader(7)


# ---------------------------------------------------------------- split_frames


def test_split_frames_returns_offsets_without_copying() -> None:
    a, b = p.DataRow((b"1", None)).encode(), p.CommandComplete("SELECT 1").encode()
    buf = bytearray(b"junk" + a + b + b[:3])
    frames, consumed = p.split_frames(buf, 4, 1024)
    assert frames == [(ord("D"), 4, 4 + len(a)), (ord("C"), 4 + len(a), 4 + len(a) + len(b))]
    assert consumed == 4 + len(a) + len(b)
    assert p.split_frames(buf, consumed, 1024) == ([], consumed)


def test_split_frames_refuses_bad_lengths() -> None:
    with pytest.raises(p.MessageTooLarge):
        p.split_frames(header(ord("D"), 2000), 0, 1000)
    with pytest.raises(p.ProtocolViolation, match="below 4"):
        p.split_frames(p.Sync().encode() + header(ord("D"), 2), 0, 1000)


@given(st.lists(typed_messages, max_size=12), st.data())
def test_split_frames_agrees_with_frame_reader(
    messages: list[p.FrontendMessage | p.BackendMessage], data: st.DataObject
) -> None:
    stream = b"".join(m.encode() for m in messages)
    end = data.draw(st.integers(0, len(stream)))
    buf = memoryview(stream[:end])
    frames, consumed = p.split_frames(buf, 0, p.MAX_MESSAGE_SIZE)
    reader = p.FrameReader(p.MAX_MESSAGE_SIZE)
    reader.feed(stream[:end])
    expected = list(reader.frames())
    assert [(t, bytes(buf[s:e])) for t, s, e in frames] == [(f.type, f.wire) for f in expected]
    assert stream[consumed:end] == reader.unconsumed


# ---------------------------------------------------------------- StartupReader


def test_startup_reader_reads_ssl_request_then_startup_and_keeps_what_follows() -> None:
    ssl, startup = p.SSLRequest().encode(), p.StartupMessage(p.PROTOCOL_3_2, {"user": "u"}).encode()
    reader = p.StartupReader()
    reader.feed(ssl + b"\x16\x03\x01")
    assert reader.next_packet() == p.SSLRequest()
    # Bytes behind an SSLRequest, before TLS, are what CVE-2021-23214 was about: visible here.
    assert reader.unconsumed == b"\x16\x03\x01"

    reader = p.StartupReader()
    reader.feed(ssl + startup)
    assert reader.next_packet() == p.SSLRequest()
    assert reader.next_packet() == p.StartupMessage(p.PROTOCOL_3_2, {"user": "u"})
    assert reader.next_packet() is None


def test_startup_reader_refuses_an_absurd_length_before_the_body() -> None:
    # As PostgreSQL: the limit bounds the body, so the length word may say 10004.
    reader = p.StartupReader(max_startup_size=10000)
    reader.feed(struct.pack("!I", 10004))
    assert reader.next_packet() is None  # waits for the body
    reader = p.StartupReader(max_startup_size=10000)
    reader.feed(struct.pack("!I", 10005))
    with pytest.raises(p.MessageTooLarge):
        reader.next_packet()


def test_startup_reader_refuses_a_tls_client_hello_sent_without_negotiation() -> None:
    reader = p.StartupReader()
    reader.feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    with pytest.raises(p.MessageTooLarge):
        reader.next_packet()


@pytest.mark.parametrize("length", [0, 4, 7])
def test_startup_reader_refuses_a_length_too_short_for_a_code(length: int) -> None:
    reader = p.StartupReader()
    reader.feed(struct.pack("!I", length) + bytes(8))
    with pytest.raises(p.ProtocolViolation, match="below 8"):
        reader.next_packet()


@pytest.mark.parametrize(
    "code",
    [
        2 << 16,  # protocol 2.0
        4 << 16,  # a future major version
        80877105,  # next to the request codes, but not one
        0,
    ],
)
def test_startup_reader_refuses_unknown_codes(code: int) -> None:
    reader = p.StartupReader()
    reader.feed(struct.pack("!II", 9, code) + b"\x00")
    with pytest.raises(p.ProtocolViolation):
        reader.next_packet()
    with pytest.raises(p.ProtocolViolation):
        reader.feed(b"more")
