"""Property: every message of every type survives encode → frame → decode unchanged."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

import gateway.protocol as p

from .strategies import BACKEND, FRONTEND, STARTUP

ALL_TYPES = {*FRONTEND, *BACKEND, *STARTUP}


def decode_as_sent(
    message: p.FrontendMessage | p.BackendMessage, type_code: int, body: bytes
) -> p.FrontendMessage | p.BackendMessage:
    """Decode with what the receiving side would know: direction, and the auth context for 'p'."""
    if type(message) in FRONTEND:
        auth = None
        if type_code == ord("p"):
            assert isinstance(message, p.AuthResponse)
            auth = type(message)
        return p.decode_frontend(type_code, body, auth=auth)
    return p.decode_backend(type_code, body)


def test_every_exported_message_type_has_a_strategy() -> None:
    exported = {
        obj
        for name in p.__all__
        if isinstance(obj := getattr(p, name), type) and hasattr(obj, "encode")
    }
    assert exported == ALL_TYPES


@given(st.one_of(*FRONTEND.values()) | st.one_of(*BACKEND.values()))
def test_typed_messages_round_trip(message: p.FrontendMessage | p.BackendMessage) -> None:
    wire = message.encode()
    assert wire[0] == message.type_code
    assert int.from_bytes(wire[1:5], "big") == len(wire) - 1
    decoded = decode_as_sent(message, wire[0], wire[5:])
    assert decoded == message
    assert type(decoded) is type(message)
    assert type(message).decode(wire[5:]) == message


@given(st.one_of(*STARTUP.values()))
def test_startup_packets_round_trip(packet: p.StartupPacket) -> None:
    wire = packet.encode()
    assert int.from_bytes(wire[:4], "big") == len(wire)
    assert p.decode_startup(wire[4:]) == packet
    reader = p.StartupReader()
    reader.feed(wire)
    assert reader.next_packet() == packet
    assert reader.unconsumed == b""


@given(
    st.lists(st.one_of(*FRONTEND.values()) | st.one_of(*BACKEND.values()), max_size=20), st.data()
)
def test_a_stream_of_messages_round_trips_through_the_frame_reader(
    messages: list[Any], data: st.DataObject
) -> None:
    stream = b"".join(m.encode() for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = p.FrameReader(p.MAX_MESSAGE_SIZE)
    frames: list[p.RawFrame] = []
    for lo, hi in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        reader.feed(stream[lo:hi])
        frames.extend(reader.frames())
    assert [f.wire for f in frames] == [m.encode() for m in messages]
    decoded = [decode_as_sent(m, f.type, f.body) for m, f in zip(messages, frames, strict=True)]
    assert decoded == messages
    assert reader.unconsumed == b""
