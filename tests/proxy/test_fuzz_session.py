"""Live-session fuzz: random and mutated frames after a real login never hang the gateway."""

from __future__ import annotations

import struct

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway.protocol import Bind, Close, CopyData, Describe, Execute, Flush, Parse, Query, Sync
from tests.harness import RunningGateway

from .wire import Closed, RawClient

pytestmark = pytest.mark.server

# Frontend message types (plus a few that are not) weighted toward the ones the gateway reads.
TYPES = st.sampled_from(b"QPBEDCSHdcfFXp?z\x00")
BODY = st.binary(max_size=300)

VALID = [
    Query(b"SELECT 1").encode(),
    Query(b"SELECT $1").encode(),
    Query(b"BEGIN; SELECT 1/0; COMMIT").encode(),
    Parse("s1", b"SELECT $1::int + 1", (23,)).encode(),
    Parse("", b"SELECT * FROM orders WHERE id = $1").encode(),
    Bind("", "s1", (0,), (b"41",), (1,)).encode(),
    Bind("p1", "", (1,), (b"\x00\x00\x00\x02",), ()).encode(),
    Describe("S", "s1").encode(),
    Describe("P", "").encode(),
    Execute("", 0).encode(),
    Execute("p1", 1).encode(),
    Close("S", "s1").encode(),
    Close("P", "p1").encode(),
    Sync().encode(),
    Flush().encode(),
    CopyData(b"1\tx\n").encode(),
]


def _frame(code: int, body: bytes) -> bytes:
    return bytes([code]) + struct.pack("!I", len(body) + 4) + body


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    wire = draw(st.sampled_from(VALID))
    code, body = wire[0], bytearray(wire[5:])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "grow", "type"]))
        if op == "flip" and body:
            i = draw(st.integers(0, len(body) - 1))
            body[i] = draw(st.integers(0, 255))
        elif op == "cut" and body:
            del body[draw(st.integers(0, len(body) - 1)) :]
        elif op == "grow":
            body += draw(st.binary(min_size=1, max_size=16))
        elif op == "type":
            code = draw(TYPES)
    # Framing stays honest: the length always matches the body sent.
    return _frame(code, bytes(body))


RANDOM_FRAME = st.builds(_frame, TYPES, BODY)
SEQUENCE_RANDOM = st.lists(RANDOM_FRAME, min_size=1, max_size=6)
SEQUENCE_MUTATED = st.lists(st.one_of(mutated(), st.sampled_from(VALID)), min_size=1, max_size=8)
FUZZ = settings(
    max_examples=100,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# ROLLBACK first: the frames may have left a failed transaction open, where a SELECT errors.
PROBE = b"ROLLBACK; SELECT 'probe-answered'"


def _exercise(gateway: RunningGateway, token: str, frames: list[bytes]) -> str:
    """Send frames then Sync and a probe query; the gateway must answer the probe or close."""
    client = RawClient.connect(gateway.host, gateway.port, timeout=5)
    try:
        client.login("app_trust", token)
        try:
            client.send(b"".join(frames) + Sync().encode() + Query(PROBE).encode())
        except ConnectionError:
            return "closed"
        while True:
            try:
                code, body = client.frame()
            except (Closed, ConnectionError):
                return "closed"
            except TimeoutError:
                raise AssertionError(
                    f"no answer and no close within 5 s after {frames!r}"
                ) from None
            if code == ord("D") and b"probe-answered" in body:
                return "answered"
    finally:
        client.close()


def _still_serves(gateway: RunningGateway, token: str) -> None:
    with psycopg.connect(gateway.dsn(token), connect_timeout=10) as conn:
        assert conn.execute("SELECT 'fresh'").fetchone() == ("fresh",)


@FUZZ
@given(frames=SEQUENCE_RANDOM)
def test_random_frames(gateway: RunningGateway, admin_token: str, frames: list[bytes]) -> None:
    _exercise(gateway, admin_token, frames)


@FUZZ
@given(frames=SEQUENCE_MUTATED)
def test_mutated_valid_frames(
    gateway: RunningGateway, admin_token: str, frames: list[bytes]
) -> None:
    _exercise(gateway, admin_token, frames)


def test_gateway_serves_after_fuzz(gateway: RunningGateway, admin_token: str) -> None:
    """Runs after the fuzz tests in file order; it also checks no session is stuck open."""
    _still_serves(gateway, admin_token)


def test_valid_sequences_are_answered(gateway: RunningGateway, admin_token: str) -> None:
    """The unmutated corpus itself is a legal conversation: the probe must be answered."""
    assert _exercise(gateway, admin_token, VALID) == "answered"
