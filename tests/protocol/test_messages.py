"""Worked examples of messages on the wire, the convenience constructors, and the public API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gateway.protocol as p
from gateway.protocol._wire import frame

from .strategies import BACKEND, FRONTEND, STARTUP

PACKAGE = Path(p.__file__).parent


def test_public_api_is_pinned() -> None:
    message_types = {cls.__name__ for cls in (*FRONTEND, *BACKEND, *STARTUP)}
    others = {
        "CANCEL_REQUEST_CODE",
        "GSSENC_REQUEST_CODE",
        "MAX_MESSAGE_SIZE",
        "MAX_STARTUP_PACKET_SIZE",
        "PROTOCOL_3_0",
        "PROTOCOL_3_2",
        "SSL_REQUEST_CODE",
        "AuthResponse",
        "AuthResponseType",
        "AuthenticationMessage",
        "BackendMessage",
        "FieldDescription",
        "FrameReader",
        "FrontendMessage",
        "MessageTooLarge",
        "ProtocolViolation",
        "RawFrame",
        "StartupPacket",
        "StartupReader",
        "TransactionStatus",
        "decode_backend",
        "decode_frontend",
        "decode_startup",
        "frame_header",
        "split_frames",
    }
    assert set(p.__all__) == message_types | others
    assert len(p.__all__) == len(set(p.__all__))
    for name in p.__all__:
        assert getattr(p, name) is not None


def test_codec_does_no_io() -> None:
    forbidden = {"asyncio", "socket", "ssl", "time", "logging", "selectors", "os"}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name} has no module docstring"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & forbidden, f"{path.name} imports {roots & forbidden}"


def test_messages_are_frozen_and_slotted() -> None:
    for cls in (*FRONTEND, *BACKEND, *STARTUP, p.FieldDescription, p.RawFrame):
        assert "__slots__" in vars(cls), cls
        # Set by @dataclass on each class; typeshed does not declare it.
        assert cls.__dataclass_params__.frozen, cls  # type: ignore[union-attr]
    with pytest.raises(AttributeError):
        p.Query(b"x").query = b"y"  # type: ignore[misc]  # frozen: the error is the point


def test_frontend_and_backend_types_are_distinct_where_bytes_collide() -> None:
    # 'C', 'D', 'E', 'H', 'S' mean different messages in each direction.
    assert type(p.decode_frontend(ord("S"), b"")) is p.Sync
    assert type(p.decode_backend(ord("S"), b"a\x00b\x00")) is p.ParameterStatus
    assert type(p.decode_frontend(ord("C"), b"S\x00")) is p.Close
    assert type(p.decode_backend(ord("C"), b"SELECT 1\x00")) is p.CommandComplete
    assert type(p.decode_frontend(ord("H"), b"")) is p.Flush
    assert type(p.decode_backend(ord("H"), b"\x00\x00\x00")) is p.CopyOutResponse


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (p.Query(b"SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
        (p.Sync(), b"S\x00\x00\x00\x04"),
        (p.Terminate(), b"X\x00\x00\x00\x04"),
        (
            p.Parse("s", b"SELECT $1", (23,)),
            b"P\x00\x00\x00\x16s\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17",
        ),
        (
            p.Bind("", "s", (0,), (b"42", None), (1,)),
            b"B\x00\x00\x00\x1b\x00s\x00\x00\x01\x00\x00\x00\x02"
            b"\x00\x00\x00\x0242\xff\xff\xff\xff\x00\x01\x00\x01",
        ),
        (p.Execute("", 0), b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"),
        (p.Describe("P", ""), b"D\x00\x00\x00\x06P\x00"),
        (p.Close("S", "s"), b"C\x00\x00\x00\x07Ss\x00"),
        (p.PasswordMessage("jwt"), b"p\x00\x00\x00\x08jwt\x00"),
        (
            p.SASLInitialResponse("SCRAM-SHA-256", b"n,,"),
            b"p\x00\x00\x00\x19SCRAM-SHA-256\x00\x00\x00\x00\x03n,,",
        ),
        (p.AuthenticationOk(), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
        (
            p.AuthenticationMD5Password(b"salt"),
            b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt",
        ),
        (
            p.AuthenticationSASL(("SCRAM-SHA-256",)),
            b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00",
        ),
        (p.ReadyForQuery("I"), b"Z\x00\x00\x00\x05I"),
        (
            p.DataRow((b"1", None)),
            b"D\x00\x00\x00\x0f\x00\x02\x00\x00\x00\x011\xff\xff\xff\xff",
        ),
        (
            p.RowDescription((p.FieldDescription("id", 16385, 1, 23, 4, -1, 0),)),
            b"T\x00\x00\x00\x1b\x00\x01id\x00\x00\x00\x40\x01\x00\x01\x00\x00\x00\x17"
            b"\x00\x04\xff\xff\xff\xff\x00\x00",
        ),
        (
            p.BackendKeyData(7, b"\x01\x02\x03\x04"),
            b"K\x00\x00\x00\x0c\x00\x00\x00\x07\x01\x02\x03\x04",
        ),
        (
            p.NegotiateProtocolVersion(0, ("_pq_.x",)),
            b"v\x00\x00\x00\x13\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\x00",
        ),
        (p.SSLRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
        (p.GSSENCRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x30"),
        (
            p.CancelRequest(7, b"\x01\x02\x03\x04"),
            b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x07\x01\x02\x03\x04",
        ),
        (
            p.StartupMessage(p.PROTOCOL_3_2, {"user": "u"}),
            b"\x00\x00\x00\x10\x00\x03\x00\x02user\x00u\x00\x00",
        ),
    ],
)
def test_wire_bytes_match_the_documented_layout(
    message: p.FrontendMessage | p.BackendMessage | p.StartupPacket, wire: bytes
) -> None:
    assert message.encode() == wire
    if isinstance(message, p.StartupPacket):
        assert p.decode_startup(wire[4:]) == message
    elif wire[0] == ord("p"):
        assert isinstance(message, p.AuthResponse)
        assert p.decode_frontend(wire[0], wire[5:], auth=type(message)) == message
    elif type(message) in FRONTEND:
        assert p.decode_frontend(wire[0], wire[5:]) == message
    else:
        assert p.decode_backend(wire[0], wire[5:]) == message


def test_error_response_build_sets_the_fields_postgresql_sets() -> None:
    err = p.ErrorResponse.build(
        "ERROR", "42501", "pgwarden: denied", detail="decision 7f3c", hint="ask an admin"
    )
    assert err.fields == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "42501",
        "M": "pgwarden: denied",
        "D": "decision 7f3c",
        "H": "ask an admin",
    }
    assert (err.severity, err.sqlstate, err.message) == ("ERROR", "42501", "pgwarden: denied")
    assert (err.detail, err.hint) == ("decision 7f3c", "ask an admin")
    wire = err.encode()
    assert p.decode_backend(wire[0], wire[5:]) == err


def test_notice_response_build_is_a_notice_not_an_error() -> None:
    notice = p.NoticeResponse.build("WARNING", "01000", "held for approval")
    assert notice.encode()[0] == ord("N")
    assert "D" not in notice.fields and "H" not in notice.fields
    as_error: object = p.ErrorResponse(dict(notice.fields))
    assert notice != as_error


def test_severity_prefers_the_unlocalised_field() -> None:
    assert p.ErrorResponse({"S": "FEHLER", "V": "ERROR"}).severity == "ERROR"
    assert p.ErrorResponse({"S": "ERROR"}).severity == "ERROR"
    assert p.ErrorResponse({}).sqlstate is None


def test_build_rejects_a_malformed_sqlstate() -> None:
    with pytest.raises(p.ProtocolViolation, match="SQLSTATE"):
        p.ErrorResponse.build("ERROR", "4250", "short")


def test_ready_for_query_accepts_only_the_three_statuses() -> None:
    assert p.ReadyForQuery("E").status == "E"
    with pytest.raises(p.ProtocolViolation):
        p.ReadyForQuery("X")  # type: ignore[arg-type]  # a status the type forbids, on purpose


@pytest.mark.parametrize(
    ("tag", "rows"),
    [
        ("SELECT 3", 3),
        ("INSERT 0 5", 5),
        ("UPDATE 0", 0),
        ("DELETE 12", 12),
        ("MERGE 2", 2),
        ("COPY 100", 100),
        ("FETCH 1", 1),
        ("CREATE TABLE", None),
        ("BEGIN", None),
    ],
)
def test_command_complete_row_count(tag: str, rows: int | None) -> None:
    assert p.CommandComplete(tag).row_count == rows


def test_sql_stays_bytes_and_decodes_in_the_sessions_encoding() -> None:
    latin1 = "SELECT 'café'".encode("latin-1")
    q = p.Query(latin1)
    assert q.query == latin1
    assert q.text("latin-1") == "SELECT 'café'"
    with pytest.raises(UnicodeDecodeError):
        q.text()
    assert p.Parse("", "SELECT 'é'".encode()).text() == "SELECT 'é'"


def test_non_utf8_names_survive_a_round_trip() -> None:
    body = b"\xffname\x00\xfevalue\x00"
    status = p.decode_backend(ord("S"), body)
    assert isinstance(status, p.ParameterStatus)
    assert status.encode()[5:] == body


def test_startup_parameters_keep_their_order() -> None:
    params = {"user": "u", "database": "d", "application_name": "psql", "options": "-c x=1"}
    msg = p.StartupMessage(p.PROTOCOL_3_0, params)
    decoded = p.decode_startup(msg.encode()[4:])
    assert isinstance(decoded, p.StartupMessage)
    assert list(decoded.parameters) == list(params)
    assert (decoded.major, decoded.minor) == (3, 0)


def test_a_newer_minor_version_still_decodes_so_the_gateway_can_negotiate() -> None:
    msg = p.StartupMessage((3 << 16) | 9, {"user": "u", "_pq_.new_thing": "on"})
    decoded = p.decode_startup(msg.encode()[4:])
    assert isinstance(decoded, p.StartupMessage) and decoded.minor == 9


def test_password_byte_needs_the_auth_context() -> None:
    body = b"SCRAM-SHA-256\x00\xff\xff\xff\xff"
    with pytest.raises(p.ProtocolViolation, match="authentication"):
        p.decode_frontend(ord("p"), body)
    assert p.decode_frontend(ord("p"), body, auth=p.SASLInitialResponse) == p.SASLInitialResponse(
        "SCRAM-SHA-256", None
    )
    assert p.decode_frontend(ord("p"), body, auth=p.SASLResponse) == p.SASLResponse(body)
    assert p.decode_frontend(ord("p"), body, auth=p.GSSResponse) == p.GSSResponse(body)
    with pytest.raises(p.ProtocolViolation):
        p.decode_frontend(ord("p"), body, auth=p.PasswordMessage)


def test_authentication_types_check_their_own_code() -> None:
    ok = p.AuthenticationOk().encode()[5:]
    with pytest.raises(p.ProtocolViolation, match="expected 3"):
        p.AuthenticationCleartextPassword.decode(ok)


@pytest.mark.parametrize(
    "message",
    [
        p.Query(b"SELECT\x001"),
        p.Parse("a\x00b"),
        p.Parse("", b"", (2**32,)),
        p.Bind(param_formats=(2**15,)),
        p.Bind(params=(None,) * 65536),
        p.Execute("", -1),
        p.Describe("X"),  # type: ignore[arg-type]  # a kind the type forbids, on purpose
        p.ParameterStatus("a", "\x00"),
        p.ParameterStatus("\ud800", "lone surrogate that is not an escaped byte"),
        p.AuthenticationMD5Password(b"abc"),
        p.AuthenticationSASL(("",)),
        p.BackendKeyData(1, b"abc"),
        p.BackendKeyData(1, bytes(257)),
        p.BackendKeyData(-1, bytes(4)),
        p.CancelRequest(1, bytes(300)),
        p.StartupMessage(p.PROTOCOL_3_0, {"": "x"}),
        p.ErrorResponse({"SV": "two letters"}),
        p.ErrorResponse({"\x00": "NUL code"}),
        p.CopyInResponse(256),
        p.RowDescription((p.FieldDescription("x", column_attnum=2**15),)),
        p.NotificationResponse(2**32, "c"),
    ],
)
def test_values_that_cannot_be_put_on_the_wire_raise_protocol_violation(
    message: p.FrontendMessage | p.BackendMessage | p.StartupPacket,
) -> None:
    with pytest.raises(p.ProtocolViolation, match="cannot encode"):
        message.encode()


def test_the_framing_helper_enforces_the_maximum_size() -> None:
    assert frame(ord("d"), b"abcd", max_size=8) == b"d\x00\x00\x00\x08abcd"
    with pytest.raises(p.MessageTooLarge) as info:
        frame(ord("d"), b"abcde", max_size=8)
    assert (info.value.length, info.value.limit) == (9, 8)
    assert p.MAX_MESSAGE_SIZE < 2**31
    with pytest.raises(p.MessageTooLarge):
        p.StartupMessage(p.PROTOCOL_3_0, {"options": "x" * p.MAX_STARTUP_PACKET_SIZE}).encode()


def test_protocol_violation_is_a_value_error() -> None:
    assert issubclass(p.ProtocolViolation, ValueError)
    assert issubclass(p.MessageTooLarge, p.ProtocolViolation)
