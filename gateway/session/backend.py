"""The server-to-client stream of a relaying session, sans-IO: frames the server's bytes
with the codec, passes through what nobody needs to read (a large frame in pieces), asks the
shell's hooks about the rest, and returns the bytes for the client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from gateway.protocol import MAX_MESSAGE_SIZE, frame_header
from gateway.protocol._wire import HEADER
from gateway.protocol.codes import (
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    COMMAND_COMPLETE,
    COPY_BOTH_RESPONSE,
    COPY_DATA,
    COPY_DONE,
    COPY_IN_RESPONSE,
    COPY_OUT_RESPONSE,
    DATA_ROW,
    EMPTY_QUERY_RESPONSE,
    ERROR_RESPONSE,
    FUNCTION_CALL_RESPONSE,
    NO_DATA,
    PARAMETER_DESCRIPTION,
    PARAMETER_STATUS,
    PARSE_COMPLETE,
    PORTAL_SUSPENDED,
    READY_FOR_QUERY,
    ROW_DESCRIPTION,
)

# Server messages whose bodies the session reads (statement outcomes, the tracker's answers,
# transaction state, result descriptions for masks, settings the session follows).
SERVER_NEEDS: Final = frozenset(
    {
        COMMAND_COMPLETE,
        ERROR_RESPONSE,
        EMPTY_QUERY_RESPONSE,
        READY_FOR_QUERY,
        PORTAL_SUSPENDED,
        PARSE_COMPLETE,
        BIND_COMPLETE,
        CLOSE_COMPLETE,
        NO_DATA,
        PARAMETER_DESCRIPTION,
        ROW_DESCRIPTION,
        COPY_IN_RESPONSE,
        COPY_OUT_RESPONSE,
        COPY_BOTH_RESPONSE,
        FUNCTION_CALL_RESPONSE,
        PARAMETER_STATUS,
    }
)
# Rows and COPY data: counted, masked, recorded or withheld over a budget.
ROWS: Final = frozenset({DATA_ROW, COPY_DATA, COPY_DONE})

# A judge's verdict on one frame.
PASS: Final = 0  # forward it as the server sent it
DROP: Final = 1  # the client never sees it
REPLACE: Final = 2  # forward BackendCore.replacement in its place
STOP: Final = 3  # not now: it and what follows stay buffered until the next receive
NOT_OWN: Final = 4  # (own_answer only) not an answer to pgwarden's own request

# The shell's judgement of one frame at view[pos:end]; `whole`: all of it is in view (a
# frame not whole may only PASS, relayed in pieces unread, or STOP to wait for it).
FrameJudge = Callable[[int, bytes | bytearray, int, int, bool], int]
# The shell's reading of one whole SERVER_NEEDS frame: the bytes to send in its place, or
# None to forward it as it is.
MessageReader = Callable[[int, bytes | bytearray, int, int], bytes | None]


class BackendCore:
    """The server's stream: whole frames the shell reads, the rest forwarded in runs.

    Three hooks, so that the common frame costs one call as it did inline: `read_message`
    for SERVER_NEEDS frames, `judge_row` for rows and COPY data, and `own_answer` for every
    frame while `intercept` is on (pgwarden's own request is being answered: what answers
    it is not the client's; NOT_OWN hands the frame on to the other two).

    Bytes leave in one piece per receive, in the server's order, with each frame dropped or
    replaced cut out of its run. A frame that passes unread may be larger than what arrived:
    it is relayed as it comes (`skip` counts what is still to relay) rather than buffered
    whole.
    """

    __slots__ = (
        "_judge_row",
        "_own_answer",
        "_read_message",
        "buffer",
        "intercept",
        "limit",
        "replacement",
        "skip",
    )

    def __init__(
        self,
        read_message: MessageReader,
        judge_row: FrameJudge,
        own_answer: FrameJudge,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        self._read_message = read_message
        self._judge_row = judge_row
        self._own_answer = own_answer
        self.limit = max_message_size
        # Bytes received and not yet relayed (a frame not whole, or frames after a STOP).
        self.buffer = bytearray()
        # Bytes of a pass-through frame still to relay without buffering.
        self.skip = 0
        # pgwarden's own request is being answered: every frame goes to own_answer first.
        self.intercept = False
        # The bytes a REPLACE verdict forwards.
        self.replacement = b""

    def skipped(self, data: bytes) -> int:
        """How many of `data`'s first bytes end a frame relayed unread: they go to the client
        before anything the handler does with what follows (an error it sends must not land
        inside that frame), and are not passed to receive."""
        n = min(self.skip, len(data))
        self.skip -= n
        return n

    def receive(self, data: bytes) -> bytes | bytearray | None:
        """Take the server's next bytes (after `skipped`); what to send the client now
        (None: nothing)."""
        out: list[bytes | bytearray] = []
        buf = self.buffer
        view: bytes | bytearray
        if buf:
            buf += data
            view = buf
        else:
            view = data
        read_message = self._read_message
        judge_row = self._judge_row
        needs = SERVER_NEEDS
        rows = ROWS
        limit = self.limit
        unpack = HEADER.unpack_from
        pos = 0
        start = 0
        total = len(view)
        while total - pos >= 5:
            code, length = unpack(view, pos)
            if length < 4 or length > limit:
                frame_header(view, pos, limit)  # the codec's framing says what is wrong
            end = pos + 1 + length
            if self.intercept:
                verdict = self._own_answer(code, view, pos, end, end <= total)
                if verdict != NOT_OWN:
                    if verdict == STOP:
                        break
                    if verdict == DROP:
                        if start < pos:
                            out.append(view[start:pos])
                        start = end
                    pos = end
                    continue
            if code in rows:
                verdict = judge_row(code, view, pos, end, end <= total)
                if verdict:
                    if verdict == STOP:
                        break
                    if start < pos:
                        out.append(view[start:pos])
                    if verdict == REPLACE:
                        out.append(self.replacement)
                    start = pos = end
                    continue
            elif code in needs:
                if end > total:
                    break
                replacement = read_message(code, view, pos, end)
                if replacement is not None:
                    if start < pos:
                        out.append(view[start:pos])
                    out.append(replacement)
                    start = end
            if end > total:
                # A large frame passed through unread: relay what is here, skip the rest.
                out.append(view[start:total])
                self.skip = end - total
                start = pos = total
                break
            pos = end
        if start < pos:
            out.append(view[start:pos])
        if view is buf:
            del buf[:pos]
        elif pos < total:
            buf += data[pos:]
        if not out:
            return None
        return out[0] if len(out) == 1 else b"".join(out)
