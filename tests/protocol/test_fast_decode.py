"""Bind, Execute, Describe, Close and CommandComplete have a one-pass decoder (every
Execute of a prepared statement brings them) beside the checked reader: the two must agree
on every body, the fast one handing whatever it does not take to the checked one, which
then names the problem."""

from __future__ import annotations

from typing import cast

from hypothesis import given
from hypothesis import strategies as st

from gateway import protocol as p

from .strategies import BACKEND, FRONTEND

Decoded = p.Bind | p.Execute | p.Describe | p.Close | p.CommandComplete
FastDecoded = type[p.Bind] | type[p.Execute] | type[p.Describe] | type[p.Close]
FAST: tuple[FastDecoded | type[p.CommandComplete], ...] = (
    p.Bind,
    p.Execute,
    p.Describe,
    p.Close,
    p.CommandComplete,
)


def _agree(cls: FastDecoded | type[p.CommandComplete], body: bytes) -> None:
    try:
        expected: Decoded | p.ProtocolViolation = cls.decode_checked(body)
    except p.ProtocolViolation as exc:
        expected = exc
    try:
        got: Decoded | p.ProtocolViolation = cls.decode(body)
    except p.ProtocolViolation as exc:
        got = exc
    if isinstance(expected, p.ProtocolViolation):
        assert isinstance(got, p.ProtocolViolation) and str(got) == str(expected)
    else:
        assert got == expected


@st.composite
def mutated(draw: st.DrawFn, cls: FastDecoded | type[p.CommandComplete]) -> bytes:
    message = draw(
        BACKEND[p.CommandComplete] if cls is p.CommandComplete else FRONTEND[cast(FastDecoded, cls)]
    )
    body = bytearray(message.encode()[5:])
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        pos = draw(st.integers(0, len(body)))
        if kind == "flip" and pos < len(body):
            body[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            body[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del body[pos : pos + draw(st.integers(1, 4))]
        else:
            del body[pos:]
    return bytes(body)


@given(mutated(p.Bind))
def test_bind_fast_and_checked_decoders_agree(body: bytes) -> None:
    _agree(p.Bind, body)


@given(mutated(p.Execute))
def test_execute_fast_and_checked_decoders_agree(body: bytes) -> None:
    _agree(p.Execute, body)


@given(st.sampled_from([p.Describe, p.Close, p.CommandComplete]), st.data())
def test_describe_close_and_command_complete_decoders_agree(
    cls: type[p.Describe] | type[p.Close] | type[p.CommandComplete], data: st.DataObject
) -> None:
    _agree(cls, data.draw(mutated(cls)))


@given(st.binary(max_size=64))
def test_the_decoders_agree_on_any_bytes(body: bytes) -> None:
    for cls in FAST:
        _agree(cls, body)


def test_a_bind_with_null_and_empty_parameters_and_formats_decodes_whole() -> None:
    bind = p.Bind("portal", "stmt", (1, 0), (None, b"", b"\x00\xff"), (1,))
    assert p.Bind.decode(bind.encode()[5:]) == bind
    execute = p.Execute("portal", 2**32 - 1)
    assert p.Execute.decode(execute.encode()[5:]) == execute
    assert p.Describe.decode(b"P\x00") == p.Describe("P", "")
    assert p.Close.decode(b"Sst\xffmt\x00") == p.Close("S", "st\udcffmt")
    assert p.CommandComplete.decode(b"SELECT 1\x00").row_count == 1
