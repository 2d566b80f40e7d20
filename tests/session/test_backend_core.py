"""The server-to-client core without sockets: scripted server replies at every split, the
bytes the client gets and the frames the handler is asked about, exactly."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gateway.protocol import (
    BindComplete,
    CommandComplete,
    DataRow,
    FieldDescription,
    NoticeResponse,
    ParseComplete,
    ProtocolViolation,
    ReadyForQuery,
    RowDescription,
)
from gateway.protocol.codes import DATA_ROW, NOTICE_RESPONSE
from gateway.session.backend import DROP, NOT_OWN, PASS, REPLACE, STOP, BackendCore

ROWS = [DataRow((str(i).encode(),)).encode() for i in range(3)]
DESCRIPTION = RowDescription((FieldDescription("n", 0, 0, 23, 4, -1, 0),)).encode()
NOTICE = NoticeResponse({"S": "NOTICE", "C": "00000", "M": "hello"}).encode()
REPLY = (
    ParseComplete().encode()
    + BindComplete().encode()
    + DESCRIPTION
    + ROWS[0]
    + NOTICE
    + ROWS[1]
    + ROWS[2]
    + CommandComplete("SELECT 3").encode()
    + ReadyForQuery("I").encode()
)
MASKED = DataRow((b"***",)).encode()

Verdict = Callable[[int, bytes], int]


class ScriptedShell:
    """The session's three hooks, scripted: they record what they were asked and answer with
    `verdict` on whole frames (STOP on a row not whole, as the session does for every row it
    reads); `own` judges every frame while the core intercepts."""

    def __init__(self, verdict: Verdict | None = None, own: Verdict | None = None) -> None:
        self.verdict: Verdict = verdict or (lambda code, frame: PASS)
        self.own: Verdict = own or (lambda code, frame: NOT_OWN)
        self.seen: list[tuple[int, bytes]] = []
        self.own_seen: list[tuple[int, bytes]] = []
        self.core = BackendCore(self.read_message, self.judge_row, self.own_answer)

    def read_message(self, code: int, view: bytes | bytearray, pos: int, end: int) -> bytes | None:
        frame = bytes(view[pos:end])
        self.seen.append((code, frame))
        verdict = self.verdict(code, frame)
        if verdict == REPLACE:
            return MASKED
        return b"" if verdict == DROP else None

    def judge_row(self, code: int, view: bytes | bytearray, pos: int, end: int, whole: bool) -> int:
        if not whole:
            return STOP
        frame = bytes(view[pos:end])
        self.seen.append((code, frame))
        verdict = self.verdict(code, frame)
        if verdict == REPLACE:
            self.core.replacement = MASKED
        return verdict

    def own_answer(
        self, code: int, view: bytes | bytearray, pos: int, end: int, whole: bool
    ) -> int:
        if not whole:
            return STOP
        frame = bytes(view[pos:end])
        self.own_seen.append((code, frame))
        return self.own(code, frame)

    def feed(self, *chunks: bytes) -> bytes:
        out = b""
        for chunk in chunks:
            # As the session: the end of a frame relayed unread goes first, on its own.
            n = self.core.skipped(chunk)
            out += chunk[:n]
            sent = self.core.receive(chunk[n:])
            if sent is not None:
                out += sent
        return out


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    pos = 0
    while pos < len(data):
        end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        frames.append((data[pos], data[pos:end]))
        pos = end
    return frames


LOOKED_AT = [f for f in frames_of(REPLY) if f[0] != NOTICE_RESPONSE]


@pytest.mark.parametrize("split", range(len(REPLY) + 1))
def test_a_reply_passes_unchanged_at_any_split(split: int) -> None:
    shell = ScriptedShell()
    assert shell.feed(REPLY[:split], REPLY[split:]) == REPLY
    # Every frame the session reads is seen whole, once; the notice passes unread.
    assert shell.seen == LOOKED_AT
    assert shell.core.buffer == b""


def test_a_reply_byte_by_byte() -> None:
    shell = ScriptedShell()
    chunks = [REPLY[i : i + 1] for i in range(len(REPLY))]
    assert shell.feed(*chunks) == REPLY
    assert shell.seen == LOOKED_AT


@pytest.mark.parametrize("split", range(0, len(REPLY) + 1, 7))
def test_rows_replaced_and_dropped_in_place(split: int) -> None:
    def verdict(code: int, frame: bytes) -> int:
        if frame == ROWS[0]:
            return REPLACE
        return DROP if frame == ROWS[2] else PASS

    shell = ScriptedShell(verdict)
    expected = REPLY.replace(ROWS[0], MASKED).replace(ROWS[2], b"")
    assert shell.feed(REPLY[:split], REPLY[split:]) == expected


def test_stop_holds_the_rest_in_order_until_asked_again() -> None:
    held = True

    def verdict(code: int, frame: bytes) -> int:
        return STOP if held and frame == ROWS[1] else PASS

    shell = ScriptedShell(verdict)
    before = REPLY[: REPLY.index(ROWS[1])]
    assert shell.feed(REPLY) == before
    assert bytes(shell.core.buffer) == REPLY[len(before) :]
    held = False
    assert shell.feed(b"") == REPLY[len(before) :]
    assert shell.core.buffer == b""


def test_a_large_frame_nobody_reads_is_relayed_in_pieces() -> None:
    notice = NoticeResponse({"S": "NOTICE", "M": "x" * 5000}).encode()
    data = notice + ReadyForQuery("I").encode()
    shell = ScriptedShell()
    assert shell.feed(data[:100]) == data[:100]  # not buffered whole: it passes as it comes
    assert shell.core.skip == len(notice) - 100
    assert shell.feed(data[100:3000]) == data[100:3000]
    assert shell.feed(data[3000:]) == data[3000:]
    assert shell.core.skip == 0
    assert [code for code, _ in shell.seen] == [ord("Z")]


def test_a_row_the_session_reads_is_buffered_whole() -> None:
    row = DataRow((b"y" * 5000,)).encode()
    shell = ScriptedShell(lambda code, frame: REPLACE if code == DATA_ROW else PASS)
    assert shell.feed(row[:100]) == b""
    assert shell.core.skip == 0
    assert shell.feed(row[100:]) == MASKED


def test_intercept_asks_about_every_frame_first() -> None:
    # pgwarden's own request is answered: the notice is its, the rest the client's.
    shell = ScriptedShell(own=lambda code, frame: DROP if code == NOTICE_RESPONSE else NOT_OWN)
    shell.core.intercept = True
    assert shell.feed(REPLY) == REPLY.replace(NOTICE, b"")
    assert shell.own_seen == frames_of(REPLY)
    assert shell.seen == LOOKED_AT


def test_an_own_answer_passed_on_is_not_read_again() -> None:
    shell = ScriptedShell(own=lambda code, frame: PASS if code == ord("Z") else NOT_OWN)
    shell.core.intercept = True
    assert shell.feed(REPLY) == REPLY
    assert shell.seen == LOOKED_AT[:-1]


def test_a_malformed_length_from_the_server_is_a_protocol_violation() -> None:
    shell = ScriptedShell()
    with pytest.raises(ProtocolViolation):
        shell.feed(ReadyForQuery("I").encode() + b"Z\x00\x00\x00\x02")
