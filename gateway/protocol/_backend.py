"""Messages a server sends, and the tables that decode them by type byte and authentication code."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final, Literal, Self, TypeAlias

from gateway.protocol import codes
from gateway.protocol._copy import CopyData, CopyDone
from gateway.protocol._errors import ProtocolViolation
from gateway.protocol._message import EmptyMessage, Message
from gateway.protocol._wire import (
    INT32,
    UINT16,
    UINT32,
    BodyReader,
    check_secret_key,
    count16,
    cstr,
    pack,
    pack_many,
    show_type,
    sized,
    sized_many,
)

# ---------------------------------------------------------------- authentication ('R')


@dataclass(frozen=True, slots=True)
class Authentication(Message):
    """The 'R' family: one type per request code; decode(body) checks the code is its own."""

    type_code: ClassVar[int] = codes.AUTHENTICATION
    auth_code: ClassVar[int]

    @classmethod
    def _reader(cls, body: bytes) -> BodyReader:
        r = BodyReader(body, cls.__name__)
        code = r.int32("authentication code")
        if code != cls.auth_code:
            raise r.fail(f"authentication code {code}, expected {cls.auth_code}")
        return r

    def _body(self) -> bytes:
        return INT32.pack(self.auth_code) + self._payload()

    def _payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class _AuthenticationRequest(Authentication):
    """A request with no payload beyond its code."""

    @classmethod
    def decode(cls, body: bytes) -> Self:
        cls._reader(body).end()
        return cls()


@dataclass(frozen=True, slots=True)
class _AuthenticationData(Authentication):
    """A request whose payload is opaque mechanism data running to the end of the body."""

    data: bytes

    @classmethod
    def decode(cls, body: bytes) -> Self:
        return cls(cls._reader(body).rest())

    def _payload(self) -> bytes:
        return self.data


@dataclass(frozen=True, slots=True)
class AuthenticationOk(_AuthenticationRequest):
    auth_code: ClassVar[int] = 0


@dataclass(frozen=True, slots=True)
class AuthenticationKerberosV5(_AuthenticationRequest):
    auth_code: ClassVar[int] = 2


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword(_AuthenticationRequest):
    auth_code: ClassVar[int] = 3


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password(Authentication):
    auth_code: ClassVar[int] = 5
    salt: bytes

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = cls._reader(body)
        salt = r.raw(4, "salt")
        r.end()
        return cls(salt)

    def _payload(self) -> bytes:
        if len(self.salt) != 4:
            raise ProtocolViolation(f"cannot encode MD5 salt of {len(self.salt)} bytes: must be 4")
        return self.salt


@dataclass(frozen=True, slots=True)
class AuthenticationGSS(_AuthenticationRequest):
    auth_code: ClassVar[int] = 7


@dataclass(frozen=True, slots=True)
class AuthenticationGSSContinue(_AuthenticationData):
    auth_code: ClassVar[int] = 8


@dataclass(frozen=True, slots=True)
class AuthenticationSSPI(_AuthenticationRequest):
    auth_code: ClassVar[int] = 9


@dataclass(frozen=True, slots=True)
class AuthenticationSASL(Authentication):
    auth_code: ClassVar[int] = 10
    mechanisms: tuple[str, ...]

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = cls._reader(body)
        mechanisms = []
        while name := r.cstring("mechanism name"):
            mechanisms.append(name)
        r.end()
        return cls(tuple(mechanisms))

    def _payload(self) -> bytes:
        if "" in self.mechanisms:
            raise ProtocolViolation("cannot encode an empty SASL mechanism name: it ends the list")
        return b"".join([cstr(m, "mechanism name") for m in self.mechanisms]) + b"\x00"


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue(_AuthenticationData):
    auth_code: ClassVar[int] = 11


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal(_AuthenticationData):
    auth_code: ClassVar[int] = 12


_AUTHENTICATION_TYPES: Final = (
    AuthenticationOk,
    AuthenticationKerberosV5,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationGSS,
    AuthenticationGSSContinue,
    AuthenticationSSPI,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
)

AuthenticationMessage: TypeAlias = (
    AuthenticationOk
    | AuthenticationKerberosV5
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationGSS
    | AuthenticationGSSContinue
    | AuthenticationSSPI
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
)

_AUTHENTICATION: Final[dict[int, Callable[[bytes], AuthenticationMessage]]] = {
    cls.auth_code: cls.decode for cls in _AUTHENTICATION_TYPES
}


def _decode_authentication(body: bytes) -> AuthenticationMessage:
    r = BodyReader(body, "Authentication")
    code = r.int32("authentication code")
    decode = _AUTHENTICATION.get(code)
    if decode is None:
        raise r.fail(f"unknown authentication code {code}")
    return decode(body)


# ---------------------------------------------------------------- session and results


def _encode_failure(what: str) -> Callable[[str], ProtocolViolation]:
    return lambda problem: ProtocolViolation(f"cannot encode {what}: {problem}")


@dataclass(frozen=True, slots=True)
class BackendKeyData(Message):
    type_code: ClassVar[int] = codes.BACKEND_KEY_DATA
    process_id: int
    secret_key: bytes

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        pid = r.uint32("process ID")
        return cls(pid, check_secret_key(r.rest(), r.fail))

    def _body(self) -> bytes:
        key = check_secret_key(self.secret_key, _encode_failure("BackendKeyData"))
        return pack(UINT32, self.process_id, "process ID") + key


@dataclass(frozen=True, slots=True)
class ParameterStatus(Message):
    type_code: ClassVar[int] = codes.PARAMETER_STATUS
    name: str
    value: str

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        name = r.cstring("parameter name")
        value = r.cstring("parameter value")
        r.end()
        return cls(name, value)

    def _body(self) -> bytes:
        return cstr(self.name, "parameter name") + cstr(self.value, "parameter value")


TransactionStatus: TypeAlias = Literal["I", "T", "E"]


@dataclass(frozen=True, slots=True)
class ReadyForQuery(Message):
    """I: idle, T: in a transaction block, E: in a failed transaction block."""

    type_code: ClassVar[int] = codes.READY_FOR_QUERY
    status: TransactionStatus

    def __post_init__(self) -> None:
        if self.status not in ("I", "T", "E"):
            raise ProtocolViolation(
                f"transaction status must be 'I', 'T' or 'E', got {self.status!r}"
            )

    @classmethod
    def decode(cls, body: bytes) -> Self:
        if len(body) != 1:
            raise ProtocolViolation(f"malformed ReadyForQuery: {len(body)} bytes, expected 1")
        status = chr(body[0])
        if status not in ("I", "T", "E"):
            raise ProtocolViolation(f"malformed ReadyForQuery: unknown status {status!r}")
        return cls(status)  # type: ignore[arg-type]  # narrowed by the membership test above

    def _body(self) -> bytes:
        return self.status.encode("ascii")


@dataclass(frozen=True, slots=True)
class ParseComplete(EmptyMessage):
    type_code: ClassVar[int] = codes.PARSE_COMPLETE


@dataclass(frozen=True, slots=True)
class BindComplete(EmptyMessage):
    type_code: ClassVar[int] = codes.BIND_COMPLETE


@dataclass(frozen=True, slots=True)
class CloseComplete(EmptyMessage):
    type_code: ClassVar[int] = codes.CLOSE_COMPLETE


@dataclass(frozen=True, slots=True)
class NoData(EmptyMessage):
    type_code: ClassVar[int] = codes.NO_DATA


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(EmptyMessage):
    type_code: ClassVar[int] = codes.EMPTY_QUERY_RESPONSE


@dataclass(frozen=True, slots=True)
class PortalSuspended(EmptyMessage):
    type_code: ClassVar[int] = codes.PORTAL_SUSPENDED


_ROW_COUNT_TAG: Final = re.compile(
    r"(?:INSERT \d+|SELECT|UPDATE|DELETE|MERGE|MOVE|FETCH|COPY) (\d+)"
)


@dataclass(frozen=True, slots=True)
class CommandComplete(Message):
    type_code: ClassVar[int] = codes.COMMAND_COMPLETE
    tag: str

    @classmethod
    def decode(cls, body: bytes) -> Self:
        # One per statement: a tag whose NUL ends the body is read in one pass.
        end = len(body) - 1
        if end >= 0 and body.find(0) == end:
            return cls(body[:end].decode("utf-8", "surrogateescape"))
        return cls.decode_checked(body)

    @classmethod
    def decode_checked(cls, body: bytes) -> Self:
        """decode() through the general reader: every read checked and named."""
        r = BodyReader(body, cls.__name__)
        tag = r.cstring("command tag")
        r.end()
        return cls(tag)

    def _body(self) -> bytes:
        return cstr(self.tag, "command tag")

    @property
    def row_count(self) -> int | None:
        """Rows the command affected or returned, for the tags that report one."""
        m = _ROW_COUNT_TAG.fullmatch(self.tag)
        return int(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class FieldDescription:
    """One output column of a RowDescription."""

    name: str
    table_oid: int = 0
    column_attnum: int = 0
    type_oid: int = 0
    type_size: int = -1
    type_modifier: int = -1
    format_code: int = 0


# table OID, attnum, type OID, type size, type modifier, format code.
_FIELD_TAIL: Final = struct.Struct("!IhIhih")


@dataclass(frozen=True, slots=True)
class RowDescription(Message):
    type_code: ClassVar[int] = codes.ROW_DESCRIPTION
    fields: tuple[FieldDescription, ...]

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        n = r.count16("field count")
        r.counted(n, 1 + _FIELD_TAIL.size, "fields")
        fields = []
        for _ in range(n):
            name = r.cstring("field name")
            fields.append(
                FieldDescription(name, *_FIELD_TAIL.unpack(r.raw(_FIELD_TAIL.size, "field")))
            )
        r.end()
        return cls(tuple(fields))

    def _body(self) -> bytes:
        parts = [count16(len(self.fields), "fields")]
        for f in self.fields:
            parts.append(cstr(f.name, "field name"))
            try:
                parts.append(
                    _FIELD_TAIL.pack(
                        f.table_oid,
                        f.column_attnum,
                        f.type_oid,
                        f.type_size,
                        f.type_modifier,
                        f.format_code,
                    )
                )
            except struct.error:
                raise ProtocolViolation(
                    f"cannot encode field {f.name!r}: a value is out of range"
                ) from None
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class DataRow(Message):
    """One result row; a value is the column's bytes in its format, or None for NULL."""

    type_code: ClassVar[int] = codes.DATA_ROW
    values: tuple[bytes | None, ...]

    @classmethod
    def decode(cls, body: bytes) -> Self:
        # The masking path decodes every DataRow of a masked result, so this loop avoids the
        # general-purpose reader's per-call overhead while keeping every bounds check.
        size = len(body)
        if size < 2:
            raise ProtocolViolation("malformed DataRow: truncated column count")
        (n,) = UINT16.unpack_from(body, 0)
        if n * 4 > size - 2:
            raise ProtocolViolation(f"malformed DataRow: {n} columns cannot fit in {size} bytes")
        unpack = INT32.unpack_from
        values: list[bytes | None] = []
        append = values.append
        pos = 2
        for i in range(n):
            if pos + 4 > size:
                raise ProtocolViolation(f"malformed DataRow: truncated length of column {i}")
            (length,) = unpack(body, pos)
            pos += 4
            if length == -1:
                append(None)
                continue
            end = pos + length
            if length < 0 or end > size:
                raise ProtocolViolation(f"malformed DataRow: column {i} length {length} is invalid")
            append(body[pos:end])
            pos = end
        if pos != size:
            raise ProtocolViolation(f"malformed DataRow: {size - pos} unexpected trailing bytes")
        return cls(tuple(values))

    def _body(self) -> bytes:
        return count16(len(self.values), "columns") + sized_many(self.values)


@dataclass(frozen=True, slots=True)
class _CopyResponse(Message):
    """CopyIn/CopyOut/CopyBoth share one layout: overall format, then per-column formats."""

    overall_format: int = 0
    column_formats: tuple[int, ...] = ()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        overall = r.byte("overall format")
        formats = r.int16s(r.count16("column count"), "column formats")
        r.end()
        return cls(overall, formats)

    def _body(self) -> bytes:
        if not 0 <= self.overall_format <= 0xFF:
            raise ProtocolViolation(f"cannot encode overall format {self.overall_format}")
        return (
            bytes([self.overall_format])
            + count16(len(self.column_formats), "column formats")
            + pack_many("h", self.column_formats, "column formats")
        )


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    type_code: ClassVar[int] = codes.COPY_IN_RESPONSE


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    type_code: ClassVar[int] = codes.COPY_OUT_RESPONSE


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    type_code: ClassVar[int] = codes.COPY_BOTH_RESPONSE


@dataclass(frozen=True, slots=True)
class ParameterDescription(Message):
    type_code: ClassVar[int] = codes.PARAMETER_DESCRIPTION
    type_oids: tuple[int, ...]

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        oids = r.uint32s(r.count16("parameter count"), "parameter type OIDs")
        r.end()
        return cls(oids)

    def _body(self) -> bytes:
        return count16(len(self.type_oids), "parameters") + pack_many(
            "I", self.type_oids, "parameter type OIDs"
        )


@dataclass(frozen=True, slots=True)
class FunctionCallResponse(Message):
    type_code: ClassVar[int] = codes.FUNCTION_CALL_RESPONSE
    result: bytes | None

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        result = r.sized("result")
        r.end()
        return cls(result)

    def _body(self) -> bytes:
        return sized(self.result)


@dataclass(frozen=True, slots=True)
class NotificationResponse(Message):
    type_code: ClassVar[int] = codes.NOTIFICATION_RESPONSE
    process_id: int
    channel: str
    payload: str = ""

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        pid = r.uint32("process ID")
        channel = r.cstring("channel")
        payload = r.cstring("payload")
        r.end()
        return cls(pid, channel, payload)

    def _body(self) -> bytes:
        return b"".join(
            (
                pack(UINT32, self.process_id, "process ID"),
                cstr(self.channel, "channel"),
                cstr(self.payload, "payload"),
            )
        )


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion(Message):
    """The server's newest supported minor version and the `_pq_.` options it did not know."""

    type_code: ClassVar[int] = codes.NEGOTIATE_PROTOCOL_VERSION
    newest_minor: int
    unsupported_options: tuple[str, ...] = ()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        minor = r.uint32("newest minor version")
        n = r.count32("option count")
        r.counted(n, 1, "options")
        options = tuple([r.cstring("option name") for _ in range(n)])
        r.end()
        return cls(minor, options)

    def _body(self) -> bytes:
        return b"".join(
            (
                pack(UINT32, self.newest_minor, "newest minor version"),
                pack(INT32, len(self.unsupported_options), "option count"),
                *[cstr(o, "option name") for o in self.unsupported_options],
            )
        )


# ---------------------------------------------------------------- errors and notices

_SQLSTATE: Final = re.compile(r"[0-9A-Z]{5}")


@dataclass(frozen=True, slots=True)
class _Diagnostic(Message):
    """ErrorResponse and NoticeResponse: fields keyed by their one-letter code, in wire order."""

    fields: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        severity: str,
        sqlstate: str,
        message: str,
        detail: str | None = None,
        hint: str | None = None,
    ) -> Self:
        """A report as PostgreSQL would write it: S and V both carry the (unlocalised) severity."""
        if not _SQLSTATE.fullmatch(sqlstate):
            raise ProtocolViolation(f"SQLSTATE must be 5 digits or capitals, got {sqlstate!r}")
        fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
        if detail is not None:
            fields["D"] = detail
        if hint is not None:
            fields["H"] = hint
        return cls(fields)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        fields: dict[str, str] = {}
        while code := r.byte("field code"):
            key = chr(code)
            if key in fields:
                raise r.fail(f"field {key!r} appears twice")
            fields[key] = r.cstring(f"field {key!r}")
        r.end()
        return cls(fields)

    def _body(self) -> bytes:
        parts = []
        for key, value in self.fields.items():
            if len(key) != 1 or not 0 < ord(key) <= 0xFF:
                raise ProtocolViolation(
                    f"cannot encode field code {key!r}: must be one non-NUL byte"
                )
            parts.append(key.encode("latin-1") + cstr(value, f"field {key!r}"))
        parts.append(b"\x00")
        return b"".join(parts)

    @property
    def severity(self) -> str | None:
        """The unlocalised severity (V) when the server sent one, else the localised one (S)."""
        return self.fields.get("V", self.fields.get("S"))

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")

    @property
    def message(self) -> str | None:
        return self.fields.get("M")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Diagnostic):
    type_code: ClassVar[int] = codes.ERROR_RESPONSE


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Diagnostic):
    type_code: ClassVar[int] = codes.NOTICE_RESPONSE


# ---------------------------------------------------------------- dispatch

BackendMessage: TypeAlias = (
    AuthenticationMessage
    | BackendKeyData
    | BindComplete
    | CloseComplete
    | CommandComplete
    | CopyData
    | CopyDone
    | CopyInResponse
    | CopyOutResponse
    | CopyBothResponse
    | DataRow
    | EmptyQueryResponse
    | ErrorResponse
    | FunctionCallResponse
    | NegotiateProtocolVersion
    | NoData
    | NoticeResponse
    | NotificationResponse
    | ParameterDescription
    | ParameterStatus
    | ParseComplete
    | PortalSuspended
    | ReadyForQuery
    | RowDescription
)

_BACKEND: Final[dict[int, Callable[[bytes], BackendMessage]]] = {
    Authentication.type_code: _decode_authentication,
    **{
        cls.type_code: cls.decode
        for cls in (
            BackendKeyData,
            BindComplete,
            CloseComplete,
            CommandComplete,
            CopyData,
            CopyDone,
            CopyInResponse,
            CopyOutResponse,
            CopyBothResponse,
            DataRow,
            EmptyQueryResponse,
            ErrorResponse,
            FunctionCallResponse,
            NegotiateProtocolVersion,
            NoData,
            NoticeResponse,
            NotificationResponse,
            ParameterDescription,
            ParameterStatus,
            ParseComplete,
            PortalSuspended,
            ReadyForQuery,
            RowDescription,
        )
    },
}


def decode_backend(type_code: int, body: bytes) -> BackendMessage:
    """The message a server sent."""
    decode = _BACKEND.get(type_code)
    if decode is None:
        raise ProtocolViolation(f"unknown backend message type {show_type(type_code)}")
    return decode(body)
