"""The client-to-server core without sockets: bytes in at every split, actions out exactly."""

from __future__ import annotations

import pytest

from gateway.protocol import (
    Bind,
    Close,
    CopyData,
    CopyDone,
    CopyFail,
    Describe,
    Execute,
    Flush,
    Parse,
    Query,
    Sync,
    Terminate,
)
from gateway.protocol.codes import BIND, EXECUTE, PARSE, QUERY
from gateway.session.frontend import (
    CLOSED,
    GATED,
    RELAY,
    TRANSITIONS,
    Action,
    FrontendCore,
    FrontendState,
)

LIMIT = 1 << 16

# What a test records of one action: its name and payload.
Event = tuple[object, ...]

PARSE_MSG = Parse("s1", b"SELECT $1::int", (23,)).encode()
BIND_MSG = Bind("", "s1", (0,), (b"41",), ()).encode()
DESCRIBE_MSG = Describe("P", "").encode()
EXECUTE_MSG = Execute("", 0).encode()
SYNC_MSG = Sync().encode()
PIPELINE = PARSE_MSG + BIND_MSG + DESCRIBE_MSG + EXECUTE_MSG + SYNC_MSG


def run(core: FrontendCore) -> list[Event]:
    """Act as the shell does, with a gate that allows every message at once."""
    events: list[Event] = []
    while True:
        action = core.next_action()
        if action is Action.EXPECT:
            events.append(("expect", core.expected))
            continue
        if action is Action.BIND:
            events.append(("bind", core.bind))
            continue
        if action is Action.ANSWER:
            events.append(("answer", core.described))
            continue
        if core.send is not None:
            events.append(("send", core.send))
        if action is Action.IDLE:
            return events
        if action is Action.GATE:
            assert core.state is GATED
            events.append(("gate", core.code, core.message))
            core.queue(core.message)  # the gate allowed it: it leaves with what follows
            core.gate_done()
            continue
        if action is Action.VIOLATION:
            events.append(("violation", core.problem, core.sqlstate))
        else:
            events.append(("terminate",))
        assert core.state is CLOSED
        return events


def feed(core: FrontendCore, *chunks: bytes) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        core.buffer += chunk
        events += run(core)
    return events


def one_by_one(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def not_sends(events: list[Event]) -> list[Event]:
    return [e for e in events if e[0] != "send"]


def sent(events: list[Event]) -> bytes:
    return b"".join(e[1] for e in events if e[0] == "send" and isinstance(e[1], bytes))


def test_a_pipeline_in_one_read() -> None:
    events = feed(FrontendCore(LIMIT), PIPELINE)
    assert events == [
        ("gate", PARSE, PARSE_MSG),
        ("bind", Bind.decode(BIND_MSG[5:])),
        ("answer", Describe("P", "")),
        # The decided Parse leaves before the Execute is decided; the Bind and Describe
        # wait to leave with the Execute, so an error at the Bind is that statement's.
        ("send", PARSE_MSG),
        ("gate", EXECUTE, EXECUTE_MSG),
        ("expect", "sync"),
        ("send", BIND_MSG + DESCRIBE_MSG + EXECUTE_MSG + SYNC_MSG),
    ]


def test_a_pipeline_byte_by_byte() -> None:
    core = FrontendCore(LIMIT)
    events = feed(core, *one_by_one(PIPELINE))
    # Each read is dealt with whole before the next arrives: what it completed goes at once.
    assert events == [
        ("gate", PARSE, PARSE_MSG),
        ("send", PARSE_MSG),
        ("bind", Bind.decode(BIND_MSG[5:])),
        ("send", BIND_MSG),
        ("answer", Describe("P", "")),
        ("send", DESCRIBE_MSG),
        ("gate", EXECUTE, EXECUTE_MSG),
        ("send", EXECUTE_MSG),
        ("expect", "sync"),
        ("send", SYNC_MSG),
    ]
    assert core.buffer == b""
    assert core.held == 0
    assert core.state is RELAY


@pytest.mark.parametrize("split", range(len(PIPELINE) + 1))
def test_a_pipeline_split_anywhere(split: int) -> None:
    whole = feed(FrontendCore(LIMIT), PIPELINE)
    events = feed(FrontendCore(LIMIT), PIPELINE[:split], PIPELINE[split:])
    assert not_sends(events) == not_sends(whole)
    assert sent(events) == PIPELINE
    # Nothing reaches the server before the gate has seen it or it passed a decided one.
    first_execute = next(i for i, e in enumerate(events) if e[0] == "gate" and e[1] == EXECUTE)
    assert EXECUTE_MSG not in sent(events[:first_execute])


def test_a_query_waits_for_the_gate_then_leaves() -> None:
    query = Query(b"SELECT 1").encode()
    core = FrontendCore(LIMIT)
    core.buffer += query[:3]
    assert run(core) == []
    core.buffer += query[3:] + query
    assert core.next_action() is Action.GATE
    assert (core.code, core.message, core.send) == (QUERY, query, None)
    # With the gate: the second Query waits in the buffer, nothing more is framed.
    assert core.next_action() is Action.IDLE
    assert core.send is None
    assert core.held == len(query)
    core.queue(query)
    core.gate_done()
    assert run(core) == [("send", query), ("gate", QUERY, query), ("send", query)]


def test_a_flush_sends_what_passed_before_the_next_decision() -> None:
    flush = Flush().encode()
    data = PARSE_MSG + BIND_MSG + flush + EXECUTE_MSG
    events = feed(FrontendCore(LIMIT), data)
    assert events == [
        ("gate", PARSE, PARSE_MSG),
        ("bind", Bind.decode(BIND_MSG[5:])),
        # The client awaits the Flush's answers: they do not wait for the Execute.
        ("send", PARSE_MSG + BIND_MSG + flush),
        ("gate", EXECUTE, EXECUTE_MSG),
        ("send", EXECUTE_MSG),
    ]


def test_terminate_sends_what_came_before_and_closes() -> None:
    close = Close("S", "s1").encode()
    data = close + SYNC_MSG + Terminate().encode() + Query(b"SELECT 1").encode()
    for chunks in ([data], one_by_one(data)):
        core = FrontendCore(LIMIT)
        events = feed(core, *chunks)
        assert not_sends(events) == [
            ("answer", Close("S", "s1")),
            ("expect", "sync"),
            ("terminate",),
        ]
        assert sent(events) == close + SYNC_MSG + Terminate().encode()
        assert core.state is CLOSED
        # Bytes after the Terminate are never framed.
        assert core.next_action() is Action.IDLE
        assert core.send is None


def test_copy_in_data_passes_and_its_end_is_not_an_answer() -> None:
    data = CopyData(b"1\tx\n").encode()
    copy = data + data + SYNC_MSG + CopyDone().encode() + SYNC_MSG
    for chunks in ([copy], one_by_one(copy)):
        core = FrontendCore(LIMIT)
        core.copy_in = True  # the shell saw CopyInResponse
        events = feed(core, *chunks)
        # The Sync inside COPY IN goes unanswered; the one after CopyDone is answered.
        assert not_sends(events) == [("expect", "sync")]
        assert sent(events) == copy
        assert not core.copy_in


def test_a_copy_end_outside_copy_in_is_answered() -> None:
    for message in (CopyDone().encode(), CopyFail("no").encode()):
        events = feed(FrontendCore(LIMIT), message)
        assert events == [("expect", "copy_end"), ("send", message)]


def test_sync_ends_a_discard() -> None:
    core = FrontendCore(LIMIT)
    core.discarding = True
    assert feed(core, DESCRIBE_MSG) == [("answer", Describe("P", "")), ("send", DESCRIBE_MSG)]
    assert core.discarding
    assert feed(core, SYNC_MSG) == [("expect", "sync"), ("send", SYNC_MSG)]
    assert not core.discarding


@pytest.mark.parametrize(("length", "sqlstate"), [(3, "08P01"), (0, "08P01"), (LIMIT + 1, "54000")])
def test_a_bad_length_ends_the_stream_after_what_came_before(length: int, sqlstate: str) -> None:
    bad = b"Q" + length.to_bytes(4, "big")
    for chunks in ([SYNC_MSG + bad], one_by_one(SYNC_MSG + bad)):
        core = FrontendCore(LIMIT)
        events = feed(core, *chunks)
        problem = f"invalid message length {length} (limit {LIMIT})"
        assert not_sends(events) == [("expect", "sync"), ("violation", problem, sqlstate)]
        # Known from the five header bytes: no body is waited for.
        assert sent(events) == SYNC_MSG
        assert core.state is CLOSED
        assert core.held == 0


def test_a_malformed_bind_is_a_protocol_violation() -> None:
    malformed = b"B" + (4 + 3).to_bytes(4, "big") + b"\x00\x00\x01"  # no statement name end
    for chunks in ([DESCRIBE_MSG + malformed], one_by_one(DESCRIBE_MSG + malformed)):
        events = feed(FrontendCore(LIMIT), *chunks)
        assert not_sends(events)[0] == ("answer", Describe("P", ""))
        kind, problem, sqlstate = not_sends(events)[1]
        assert kind == "violation"
        assert sqlstate == "08P01"
        assert "malformed Bind" in str(problem)
        # The Describe before it still goes; the Bind does not.
        assert sent(events) == DESCRIBE_MSG


def test_a_pass_through_message_with_a_bad_layout_is_refused() -> None:
    sync_with_body = b"S" + (4 + 1).to_bytes(4, "big") + b"x"
    events = feed(FrontendCore(LIMIT), sync_with_body)
    assert [e[0] for e in events] == ["violation"]
    assert events[0][2] == "08P01"


def test_nothing_is_read_after_the_end() -> None:
    core = FrontendCore(LIMIT)
    feed(core, Terminate().encode())
    core.buffer += SYNC_MSG
    assert core.next_action() is Action.IDLE
    assert core.send is None


def test_bind_is_decoded_for_the_shell() -> None:
    core = FrontendCore(LIMIT)
    core.buffer += BIND_MSG
    assert core.next_action() is Action.BIND
    assert core.bind == Bind("", "s1", (0,), (b"41",), ())
    assert BIND_MSG[0] == BIND


def test_the_state_table() -> None:
    assert {
        FrontendState.RELAY: {FrontendState.GATED, FrontendState.CLOSED},
        FrontendState.GATED: {FrontendState.RELAY, FrontendState.CLOSED},
        FrontendState.CLOSED: set(),
    } == TRANSITIONS
    core = FrontendCore(LIMIT)
    feed(core, Terminate().encode())
    core.gate_done()  # nothing with the gate: a closed stream stays closed
    assert core.state is CLOSED


def test_the_next_message_is_seen_at_the_gate_and_what_came_before_is_sent_with_its_sync() -> None:
    """What the shell reads while a message is at the gate (next_code: is the client's Sync
    next?), and flush_through at that Sync: the gated message, then everything up to and with
    the Sync, nothing after it."""
    core = FrontendCore(LIMIT)
    after = Query(b"COMMIT").encode()
    core.buffer += BIND_MSG + EXECUTE_MSG + SYNC_MSG + after
    assert core.next_action() is Action.BIND
    assert core.next_action() is Action.GATE
    assert core.code == EXECUTE
    assert core.next_code() == ord("S")
    core.queue(core.message)
    core.gate_done()
    assert core.next_action() is Action.EXPECT and core.expected == "sync"
    assert core.flush_through() == BIND_MSG + EXECUTE_MSG + SYNC_MSG
    assert core.next_code() == ord("Q")
    assert core.next_action() is Action.GATE and core.message == after
    assert core.next_code() is None
