"""Malformed bodies and random bytes: the codec raises ProtocolViolation and nothing else."""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gateway.protocol as p

from .corpus import BACKEND_FRAMES, FRONTEND_FRAMES, STARTUP_PACKETS
from .strategies import BACKEND, FRONTEND, STARTUP

AUTH_TYPES: tuple[p.AuthResponseType, ...] = (
    p.PasswordMessage,
    p.SASLInitialResponse,
    p.SASLResponse,
    p.GSSResponse,
)

# Types whose last field runs to the end of the body: cutting bytes off still leaves a valid
# (shorter) value, so only the self-delimiting types must reject every truncation.
OPEN_ENDED = {
    p.CopyData,
    p.SASLResponse,
    p.GSSResponse,
    p.AuthenticationGSSContinue,
    p.AuthenticationSASLContinue,
    p.AuthenticationSASLFinal,
    p.BackendKeyData,
    p.CancelRequest,
}


def decoders(type_code: int) -> list[Callable[[bytes], Any]]:
    """Every way a body with this type byte may be decoded, in either direction."""
    found: list[Callable[[bytes], Any]] = [lambda b: p.decode_backend(type_code, b)]
    if type_code == ord("p"):
        found += [functools.partial(p.decode_frontend, type_code, auth=a) for a in AUTH_TYPES]
    else:
        found.append(lambda b: p.decode_frontend(type_code, b))
    return found


def decodes_canonically_or_violates(type_code: int, body: bytes) -> None:
    """Decoding either fails cleanly, or yields a value that encodes back to the same bytes."""
    wire = struct.pack("!BI", type_code, len(body) + 4) + body
    for decode in decoders(type_code):
        try:
            message = decode(body)
        except p.ProtocolViolation:
            continue
        assert message.encode() == wire


# ---------------------------------------------------------------- hand-made malformed bodies


@pytest.mark.parametrize(
    ("decode", "body", "problem"),
    [
        (p.Query.decode, b"SELECT 1", "no NUL terminator"),
        (p.Query.decode, b"SELECT 1\x00\x00", "trailing"),
        (p.Parse.decode, b"s\x00SELECT 1", "no NUL terminator"),
        (p.Parse.decode, b"s\x00SELECT $1\x00\x00\x02\x00\x00\x00\x17", "cannot fit"),
        (p.Bind.decode, b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00", "negative length"),
        (p.Bind.decode, b"\x00\x00\x00\x00\x03\xe8\x00\x00\x00\x00", "cannot fit"),
        (p.Bind.decode, b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x09ab\x00\x00", "truncated"),
        (p.Bind.decode, b"\x00\x00\x00\x05\x00\x00", "cannot fit"),
        (p.Bind.decode, b"\x00\x00", "truncated"),
        (p.Execute.decode, b"\x00\x00\x00", "truncated"),
        (p.Describe.decode, b"Xname\x00", "'S' or 'P'"),
        (p.Close.decode, b"", "truncated"),
        (
            p.FunctionCall.decode,
            b"\x00\x00\x03\xa8\x00\x00\x00\x01\xff\xff\xff\xf0\x00\x00",
            "negative",
        ),
        (p.CopyFail.decode, b"oops", "no NUL terminator"),
        (p.PasswordMessage.decode, b"secret", "no NUL terminator"),
        (p.SASLInitialResponse.decode, b"SCRAM-SHA-256\x00\xff\xff\xff\xfd", "negative length"),
        (p.SASLInitialResponse.decode, b"SCRAM-SHA-256\x00\x00\x00\x00\x10n,,", "truncated"),
        (p.Sync.decode, b"\x00", "expected none"),
        (p.DataRow.decode, b"\x00\x01\xff\xff\xff\xfb", "length -5"),
        (p.DataRow.decode, b"\x00\x02\x00\x00\x00\x011", "cannot fit"),
        (p.DataRow.decode, b"\x00\x01\x00\x00\x00\x051", "length 5"),
        (p.DataRow.decode, b"\x00\x00\x00", "trailing"),
        (p.DataRow.decode, b"\x00", "truncated"),
        (p.RowDescription.decode, b"\x00\x05id\x00" + bytes(18), "cannot fit"),
        (p.RowDescription.decode, b"\x00\x01id" + b"\x01" * 18, "no NUL terminator"),
        (p.RowDescription.decode, b"\x00\x01id\x00" + bytes(17), "truncated field"),
        (p.ParameterDescription.decode, b"\x00\x03\x00\x00\x00\x17", "cannot fit"),
        (p.NegotiateProtocolVersion.decode, b"\x00\x00\x00\x00\xff\xff\xff\xff", "negative"),
        (p.NegotiateProtocolVersion.decode, b"\x00\x00\x00\x00\x00\x00\x00\x02a\x00", "no NUL"),
        (p.NegotiateProtocolVersion.decode, b"\x00\x00\x00\x00\x00\x00\x00\x01a", "no NUL"),
        (p.ErrorResponse.decode, b"SERROR\x00CXX000\x00", "truncated"),
        (p.ErrorResponse.decode, b"SERROR\x00MM\x00SERROR\x00\x00", "twice"),
        (p.NoticeResponse.decode, b"SNOTICE", "no NUL terminator"),
        (p.ReadyForQuery.decode, b"X", "unknown status"),
        (p.ReadyForQuery.decode, b"", "expected 1"),
        (p.BackendKeyData.decode, b"\x00\x00\x00\x01abc", "secret key of 3 bytes"),
        (p.BackendKeyData.decode, b"\x00\x00\x00\x01" + bytes(257), "secret key of 257 bytes"),
        (p.CommandComplete.decode, b"SELECT 1", "no NUL"),
        (p.NotificationResponse.decode, b"\x00\x00\x00\x01chan\x00payload", "no NUL"),
        (p.FunctionCallResponse.decode, b"\xff\xff\xff\xfe", "negative length"),
        (p.CopyInResponse.decode, b"\x00\x00\x02\x00\x00", "cannot fit"),
        (p.AuthenticationMD5Password.decode, b"\x00\x00\x00\x05ab", "truncated salt"),
        (p.AuthenticationSASL.decode, b"\x00\x00\x00\x0aSCRAM-SHA-256\x00", "no NUL"),
        (p.AuthenticationOk.decode, b"\x00\x00\x00\x00\x00", "trailing"),
        (p.AuthenticationOk.decode, b"\x00\x00", "truncated"),
        (lambda b: p.decode_backend(ord("R"), b), b"\x00\x00\x00\x63", "unknown authentication"),
        (lambda b: p.decode_backend(ord("Q"), b), b"", "unknown backend message type 'Q'"),
        (lambda b: p.decode_frontend(ord("T"), b), b"", "unknown frontend message type 'T'"),
        (lambda b: p.decode_frontend(0, b), b"", "type 0x00"),
        (p.decode_startup, b"\x00\x03\x00\x00user\x00u\x00", "no NUL"),
        (p.decode_startup, b"\x00\x03\x00\x00user\x00a\x00user\x00b\x00\x00", "twice"),
        (p.decode_startup, b"\x00\x03\x00\x00user", "no NUL"),
        (p.decode_startup, b"\x00\x02\x00\x00\x00", "unknown request code"),
        (p.decode_startup, b"\x00\x03", "truncated"),
        (p.decode_startup, b"\x04\xd2\x16\x2f\x00", "expected 4 bytes"),
        (p.decode_startup, b"\x04\xd2\x16\x2e\x00\x00\x00\x01ab", "secret key of 2 bytes"),
        (p.decode_startup, b"\x04\xd2\x16\x2e\x00\x00", "truncated"),
        (p.StartupMessage.decode, b"\x00\x02\x00\x00\x00", "unsupported protocol version 2.0"),
    ],
)
def test_malformed_bodies_raise_protocol_violation(
    decode: Callable[[bytes], Any], body: bytes, problem: str
) -> None:
    with pytest.raises(p.ProtocolViolation) as info:
        decode(body)
    assert problem in str(info.value)


@given(st.one_of(*FRONTEND.values(), *BACKEND.values(), *STARTUP.values()))
def test_every_truncation_and_every_extension_is_refused(
    message: p.FrontendMessage | p.BackendMessage | p.StartupPacket,
) -> None:
    cls = type(message)
    wire = message.encode()
    body = wire[4:] if cls in STARTUP else wire[5:]
    if cls in OPEN_ENDED:
        return
    for cut in range(len(body)):
        with pytest.raises(p.ProtocolViolation):
            cls.decode(body[:cut])
    with pytest.raises(p.ProtocolViolation):
        cls.decode(body + b"\x00")


# ---------------------------------------------------------------- fuzzing

_LIMIT = 4096


def fuzz_typed_stream(data: bytes) -> None:
    reader = p.FrameReader(_LIMIT)
    reader.feed(data)
    try:
        for frame in reader.frames():
            decodes_canonically_or_violates(frame.type, frame.body)
    except p.ProtocolViolation:
        pass
    try:
        frames, _ = p.split_frames(data, 0, _LIMIT)
    except p.ProtocolViolation:
        return
    for type_code, start, end in frames:
        decodes_canonically_or_violates(type_code, data[start + 5 : end])


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
@example(b"D\x00\x00\x00\x06\xff\xff")
@example(b"R\x00\x00\x00\x08\x00\x00\x00\x0a")
def test_random_bytes_only_ever_raise_protocol_violation(data: bytes) -> None:
    fuzz_typed_stream(data)


@settings(max_examples=500)
@given(st.integers(0, 255), st.binary(max_size=300))
def test_random_bodies_for_every_type_byte_only_ever_raise_protocol_violation(
    type_code: int, body: bytes
) -> None:
    decodes_canonically_or_violates(type_code, body)


_CORPUS = [bytes.fromhex(h) for h in FRONTEND_FRAMES + BACKEND_FRAMES]


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    wire = bytearray(draw(st.sampled_from(_CORPUS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        pos = draw(st.integers(0, len(wire)))
        if kind == "insert":
            wire.insert(pos, draw(st.integers(0, 255)))
        elif pos < len(wire) and kind == "delete":
            del wire[pos]
        elif pos < len(wire) and kind == "flip":
            wire[pos] ^= 1 << draw(st.integers(0, 7))
        elif pos < len(wire):
            wire[pos] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
    return bytes(wire)


@settings(max_examples=1000)
@given(mutated_frames())
def test_mutated_frames_only_ever_raise_protocol_violation(wire: bytes) -> None:
    fuzz_typed_stream(wire)
    # The length prefix may now disagree with the body: decode the body as sent, too.
    decodes_canonically_or_violates(wire[0], wire[5:])


@settings(max_examples=500)
@given(
    st.sampled_from([bytes.fromhex(h) for h in STARTUP_PACKETS]), st.binary(max_size=8), st.data()
)
def test_mutated_startup_packets_only_ever_raise_protocol_violation(
    wire: bytes, noise: bytes, data: st.DataObject
) -> None:
    pos = data.draw(st.integers(0, len(wire)))
    mutated = wire[:pos] + noise + wire[pos + data.draw(st.integers(0, 4)) :]
    reader = p.StartupReader()
    reader.feed(mutated)
    try:
        packet = reader.next_packet()
    except p.ProtocolViolation:
        return
    if packet is not None:
        consumed = len(mutated) - len(reader.unconsumed)
        assert packet.encode() == mutated[:consumed]
