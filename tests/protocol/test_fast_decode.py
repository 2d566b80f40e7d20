"""Bind and Execute have a one-pass decoder (every Execute of a prepared statement brings
both) beside the checked reader: the two must agree on every body, the fast one handing
whatever it does not take to the checked one, which then names the problem."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway import protocol as p

from .strategies import FRONTEND


def _agree(cls: type[p.Bind] | type[p.Execute], body: bytes) -> None:
    try:
        expected: p.Bind | p.Execute | p.ProtocolViolation = cls.decode_checked(body)
    except p.ProtocolViolation as exc:
        expected = exc
    try:
        got: p.Bind | p.Execute | p.ProtocolViolation = cls.decode(body)
    except p.ProtocolViolation as exc:
        got = exc
    if isinstance(expected, p.ProtocolViolation):
        assert isinstance(got, p.ProtocolViolation) and str(got) == str(expected)
    else:
        assert got == expected


@st.composite
def mutated(draw: st.DrawFn, cls: type[p.Bind] | type[p.Execute]) -> bytes:
    body = bytearray(draw(FRONTEND[cls]).encode()[5:])
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


@given(st.binary(max_size=64))
def test_the_decoders_agree_on_any_bytes(body: bytes) -> None:
    _agree(p.Bind, body)
    _agree(p.Execute, body)


def test_a_bind_with_null_and_empty_parameters_and_formats_decodes_whole() -> None:
    bind = p.Bind("portal", "stmt", (1, 0), (None, b"", b"\x00\xff"), (1,))
    assert p.Bind.decode(bind.encode()[5:]) == bind
    execute = p.Execute("portal", 2**32 - 1)
    assert p.Execute.decode(execute.encode()[5:]) == execute
