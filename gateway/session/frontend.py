"""The client-to-server stream of a relaying session, sans-IO: the client's bytes in, one
action at a time out (forward, note an answer the server will owe, hand a message to the
gate, refuse, end). No transport, no tasks: the shell executes what it is told."""

from __future__ import annotations

from enum import Enum, auto
from typing import Final, Literal

from gateway.protocol import (
    Bind,
    Close,
    Describe,
    MessageTooLarge,
    ProtocolViolation,
    decode_frontend,
    frame_header,
)
from gateway.protocol._wire import HEADER
from gateway.protocol.codes import (
    BIND,
    CLOSE,
    COPY_DATA,
    COPY_DONE,
    COPY_FAIL,
    DESCRIBE,
    FLUSH,
    SYNC,
    TERMINATE,
)


class FrontendState(Enum):
    """Where the stream is; every change goes through FrontendCore._enter and TRANSITIONS."""

    # Whole messages pass through or are noted; the next that needs a decision goes to the
    # gate.
    RELAY = auto()
    # One message is with the gate: what the client sends meanwhile waits in the buffer.
    GATED = auto()
    # Terminate, or a protocol violation: nothing more is read.
    CLOSED = auto()


TRANSITIONS: Final[dict[FrontendState, frozenset[FrontendState]]] = {
    FrontendState.RELAY: frozenset({FrontendState.GATED, FrontendState.CLOSED}),
    FrontendState.GATED: frozenset({FrontendState.RELAY, FrontendState.CLOSED}),
    FrontendState.CLOSED: frozenset(),
}


class Action(Enum):
    """What FrontendCore.next_action asks of the shell; the payload is on the core."""

    # Every whole message is dealt with: `send`, when not None, goes to the server now.
    IDLE = auto()
    # Note `expected` ("sync" or "copy_end") on the response tracker.
    EXPECT = auto()
    # `bind` is a Bind, forwarded with what passes through: note its portal; its
    # BindComplete is expected.
    BIND = auto()
    # `described` is a Describe or a Close, forwarded likewise: its answer is expected.
    ANSWER = auto()
    # `send` goes to the server now; then `code` and `message` go to the gate (the stream is
    # GATED until gate_done).
    GATE = auto()
    # `send` (what came before the bad message) goes to the server; then the session ends
    # with `problem` and `sqlstate`.
    VIOLATION = auto()
    # `send`, the Terminate included, goes to the server; the session ends.
    TERMINATE = auto()


# The actions as plain module constants: an Enum member looked up on its class costs more
# than the rest of a pass-through message's handling (Python 3.11).
IDLE: Final = Action.IDLE
EXPECT: Final = Action.EXPECT
BIND_NOTED: Final = Action.BIND
ANSWER: Final = Action.ANSWER
GATE: Final = Action.GATE
VIOLATION: Final = Action.VIOLATION
TERMINATE_SENT: Final = Action.TERMINATE

_unpack_header = HEADER.unpack_from
# What `bind` and `described` hold before the first (and `bind` between passes, so that a
# large Bind's parameters are not kept).
_NO_BIND: Final = Bind("", "", (), (), ())
_NO_DESCRIBE: Final = Describe("S", "")

# Client messages that pass through untouched (noted where the server will answer them).
_PASS: Final = frozenset({DESCRIBE, CLOSE, SYNC, FLUSH, COPY_DATA, COPY_DONE, COPY_FAIL})
# Of those, the ones whose body is always empty: one of length 4 is well formed as it is.
_BODILESS: Final = frozenset({SYNC, FLUSH, COPY_DONE})

RELAY: Final = FrontendState.RELAY
GATED: Final = FrontendState.GATED
CLOSED: Final = FrontendState.CLOSED


class FrontendCore:
    """The client's stream once the session relays: frames it with the codec, lets through
    what needs no decision and holds the rest for the gate, one message at a time.

    Messages that pass through are gathered and forwarded in one write. A message the gate
    decided (`queue`) leaves with what passes after it, at the latest before the next one
    goes to the gate, so that a pipeline runs on the server while the rest is decided and
    stops at its first error as it does direct. What passed through since (a Bind, a
    Describe) leaves with the next gated message once that one is decided and recorded, so
    that an error at that Bind is the outcome of the statement it binds; unless it holds a
    Sync or Flush whose answer the client awaits (`answerable`).
    """

    __slots__ = (
        "_pos",
        "_start",
        "answerable",
        "bind",
        "buffer",
        "code",
        "copy_in",
        "decided",
        "described",
        "discarding",
        "expected",
        "limit",
        "message",
        "out",
        "problem",
        "send",
        "sqlstate",
        "state",
    )

    def __init__(self, max_message_size: int, buffer: bytearray | None = None) -> None:
        # The client's bytes not dealt with yet (the shell may share its startup buffer).
        self.buffer = bytearray() if buffer is None else buffer
        self.limit = max_message_size
        self.state = RELAY
        # Bytes for the server gathered and not yet sent.
        self.out: list[bytes] = []
        # A Sync or Flush is among them: the client awaits their answer.
        self.answerable = False
        # A message the gate decided is among them: it leaves before the next is decided.
        self.decided = False
        # After an extended-protocol message failed or was refused, the server discards
        # until Sync (set by the shell, which sees the server's errors).
        self.discarding = False
        # The server is in COPY IN and the client has not ended it: Syncs go unanswered
        # (set by the shell at CopyInResponse).
        self.copy_in = False
        # Where the passed-through bytes not yet in `out` start, and where framing resumes.
        self._start = 0
        self._pos = 0
        # The payload of the last action (see Action).
        self.send: bytes | None = None
        self.expected: Literal["sync", "copy_end"] = "sync"
        # Typed without None so that the shell reads them with no cast on the hot path.
        self.bind = _NO_BIND
        self.described: Describe | Close = _NO_DESCRIBE
        self.code = 0
        self.message = b""
        self.problem = ""
        self.sqlstate = ""

    @property
    def held(self) -> int:
        """Bytes the client sent that are held and not handed to the server yet."""
        return len(self.buffer) + sum(len(b) for b in self.out)

    def _enter(self, state: FrontendState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"frontend stream cannot go from {self.state.name} to {state.name}")
        self.state = state

    def queue(self, data: bytes) -> None:
        """A message the gate decided: it leaves with what passes through after it."""
        self.out.append(data)
        self.decided = True

    def flush(self) -> bytes | None:
        """Everything gathered for the server, to send now (None: nothing)."""
        out = self.out
        self.answerable = False
        self.decided = False
        if not out:
            return None
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def flush_through(self) -> bytes | None:
        """flush(), with the client's messages acted on so far (passed through) among it."""
        buf, start, pos = self.buffer, self._start, self._pos
        if start < pos:
            self.out.append(bytes(buf) if start == 0 and pos == len(buf) else bytes(buf[start:pos]))
            del buf[:pos]
        self._start = self._pos = 0
        return self.flush()

    def next_code(self) -> int | None:
        """The type of the next message the client sent, not yet acted on (None: none
        buffered)."""
        buf = self.buffer
        return buf[self._pos] if self._pos < len(buf) else None

    def gate_done(self) -> None:
        """The message handed to the gate is dealt with: the client's next ones go on."""
        self.message = b""
        if self.state is GATED:
            self.state = RELAY

    def next_action(self) -> Action:
        """The next thing to do with the buffered bytes; IDLE once all whole ones are done."""
        if self.state is not RELAY:
            self.send = None
            return IDLE
        buf = self.buffer
        size = len(buf)
        pos = self._pos
        while size - pos >= 5:
            code, length = _unpack_header(buf, pos)
            if length < 4 or length > self.limit:
                # The codec's framing says which of the two it is.
                sqlstate = "08P01"
                try:
                    frame_header(buf, pos, self.limit)
                except MessageTooLarge:
                    sqlstate = "54000"
                except ProtocolViolation:
                    pass
                return self._violation(
                    pos,
                    f"invalid message length {length} (limit {self.limit})",
                    sqlstate,
                )
            end = pos + 1 + length
            if end > size:
                break
            if code in _PASS:
                if code != COPY_DATA:  # all but CopyData have a layout: a malformed one ends here
                    if length == 4 and code in _BODILESS:
                        decoded = None  # Sync, Flush, CopyDone: nothing to read
                    else:
                        try:
                            decoded = decode_frontend(code, bytes(buf[pos + 5 : end]))
                        except ProtocolViolation as exc:
                            return self._violation(pos, str(exc))
                    if code == SYNC:
                        # The server answers what came before; a Sync also ends a discard.
                        self.answerable = True
                        self.discarding = False
                        if not self.copy_in:  # during COPY IN the server ignores it
                            self._pos = end
                            self.expected = "sync"
                            return EXPECT
                    elif code == FLUSH:
                        self.answerable = True
                    elif code in (COPY_DONE, COPY_FAIL):
                        if self.copy_in:
                            self.copy_in = False
                        else:
                            self._pos = end
                            self.expected = "copy_end"
                            return EXPECT
                    else:  # Describe, Close: their answers are expected
                        assert isinstance(decoded, (Describe, Close))
                        self._pos = end
                        self.described = decoded
                        return ANSWER
                pos = end
                continue
            if code == BIND:  # needs no decision: its portal is noted and it passes on
                try:
                    self.bind = Bind.decode(bytes(buf[pos + 5 : end]))
                except ProtocolViolation as exc:
                    return self._violation(pos, str(exc))
                self._pos = end
                return BIND_NOTED
            start = self._start
            passed = bytes(buf[start:pos]) if start < pos else None
            out = self.out
            if code == TERMINATE:
                if passed is not None:
                    out.append(passed)
                out.append(bytes(buf[pos:end]))
                self.send = self.flush()
                self._reset()
                self._enter(CLOSED)
                return TERMINATE_SENT
            if self.answerable:
                if passed is not None:
                    out.append(passed)
                self.send = self.flush()
            else:
                self.send = self.flush() if self.decided else None
                if passed is not None:
                    out.append(passed)
            self.code = code
            self.message = bytes(buf[pos:end])
            del buf[:end]
            self._start = self._pos = 0
            # RELAY to GATED, the one transition per statement: checked at entry above.
            self.state = GATED
            return GATE
        self._pos = pos
        # The last Bind noted is no longer needed (its parameters may be large).
        self.bind = _NO_BIND
        self.send = self.flush_through()
        return IDLE

    def _violation(self, pos: int, problem: str, sqlstate: str = "08P01") -> Action:
        """A malformed message at `pos`: the valid ones before it still go, then the end."""
        start = self._start
        if start < pos:
            self.out.append(bytes(self.buffer[start:pos]))
        self.send = self.flush()
        self._reset()
        self.problem = problem
        self.sqlstate = sqlstate
        self._enter(CLOSED)
        return VIOLATION

    def _reset(self) -> None:
        self.buffer.clear()
        self._start = self._pos = 0
