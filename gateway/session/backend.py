"""The server-to-client stream of a relaying session, sans-IO: frames the server's bytes
with the codec, passes through what nobody needs to read (a frame too large to buffer in
pieces), asks the shell's handler about the rest, and returns the bytes for the client."""

from __future__ import annotations

from typing import Final, Protocol

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
# The frames the handler is asked about: those, and rows and COPY data (counted, masked,
# withheld over a budget). Anything else passes unread unless `intercept` is on.
LOOKED_AT: Final = SERVER_NEEDS | {DATA_ROW, COPY_DATA, COPY_DONE}

# The handler's verdict on one frame.
PASS: Final = 0  # forward it as the server sent it
DROP: Final = 1  # the client never sees it
REPLACE: Final = 2  # forward BackendCore.replacement in its place
STOP: Final = 3  # not now: it and what follows stay buffered until the next receive


class FrameHandler(Protocol):
    """The shell's judgement of one frame at view[pos:end]; `whole`: all of it is in view
    (a frame not whole may only PASS, relayed in pieces unread, or STOP to wait for it)."""

    def __call__(
        self, code: int, view: bytes | bytearray, pos: int, end: int, whole: bool
    ) -> int: ...


class BackendCore:
    """The server's stream: whole frames the handler looks at, the rest forwarded in runs.

    Bytes leave in one piece per receive, in the server's order, with each frame the handler
    dropped or replaced cut out of its run. A frame that passes unread may be larger than
    what arrived: it is relayed as it comes (`skip` counts what is still to relay) rather
    than buffered whole.
    """

    __slots__ = ("_handler", "buffer", "intercept", "limit", "replacement", "skip")

    def __init__(self, handler: FrameHandler, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self._handler = handler
        self.limit = max_message_size
        # Bytes received and not yet relayed (a frame not whole, or frames after a STOP).
        self.buffer = bytearray()
        # Bytes of a pass-through frame still to relay without buffering.
        self.skip = 0
        # Every frame goes to the handler, not only LOOKED_AT: pgwarden's own request is
        # being answered, and what answers it (notices included) is not the client's.
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
        handler = self._handler
        looked_at = LOOKED_AT
        limit = self.limit
        pos = 0
        start = 0
        total = len(view)
        unpack = HEADER.unpack_from
        while total - pos >= 5:
            code, length = unpack(view, pos)
            if length < 4 or length > limit:
                frame_header(view, pos, limit)  # the codec's framing says what is wrong
            end = pos + 1 + length
            if code in looked_at or self.intercept:
                verdict = handler(code, view, pos, end, end <= total)
                if verdict:
                    if verdict == STOP:
                        break
                    if start < pos:
                        out.append(view[start:pos])
                    if verdict == REPLACE:
                        out.append(self.replacement)
                    start = pos = end
                    continue
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
