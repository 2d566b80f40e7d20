"""Messages a client sends after startup, and the table that decodes them by type byte."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final, Literal, Self, TypeAlias, cast

from gateway.protocol import codes
from gateway.protocol._copy import CopyData, CopyDone
from gateway.protocol._errors import ProtocolViolation
from gateway.protocol._message import EmptyMessage, Message, OpaqueMessage
from gateway.protocol._wire import (
    INT16,
    INT32,
    UINT16,
    UINT32,
    BodyReader,
    cbytes,
    count16,
    cstr,
    pack,
    pack_many,
    show_type,
    sized,
    sized_many,
)

TargetKind: TypeAlias = Literal["S", "P"]


@dataclass(frozen=True, slots=True)
class Query(Message):
    """A simple query; the SQL stays bytes because only the session knows its client_encoding."""

    type_code: ClassVar[int] = codes.QUERY
    query: bytes

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        query = r.cbytes("query")
        r.end()
        return cls(query)

    def _body(self) -> bytes:
        return cbytes(self.query, "query")

    def text(self, encoding: str = "utf-8") -> str:
        """The SQL as text; raises UnicodeDecodeError when the bytes are not in `encoding`."""
        return self.query.decode(encoding)


@dataclass(frozen=True, slots=True)
class Parse(Message):
    type_code: ClassVar[int] = codes.PARSE
    name: str = ""
    query: bytes = b""
    param_types: tuple[int, ...] = ()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        name = r.cstring("statement name")
        query = r.cbytes("query")
        types = r.uint32s(r.count16("parameter type count"), "parameter types")
        r.end()
        return cls(name, query, types)

    def _body(self) -> bytes:
        return b"".join(
            (
                cstr(self.name, "statement name"),
                cbytes(self.query, "query"),
                count16(len(self.param_types), "parameter types"),
                pack_many("I", self.param_types, "parameter type OIDs"),
            )
        )

    def text(self, encoding: str = "utf-8") -> str:
        """The SQL as text; raises UnicodeDecodeError when the bytes are not in `encoding`."""
        return self.query.decode(encoding)


_PORTAL: Final = ord("P")
_STATEMENT: Final = ord("S")
_unpack_count = UINT16.unpack_from
_unpack_length = INT32.unpack_from


def _int16s(body: bytes, pos: int, n: int) -> tuple[int, ...]:
    """`n` (at least one) int16 format codes at `pos`."""
    if n == 1:
        return INT16.unpack_from(body, pos)
    return struct.unpack_from(f"!{n}h", body, pos)


def _bind_fields(
    body: bytes,
) -> tuple[str, str, tuple[int, ...], tuple[bytes | None, ...], tuple[int, ...]] | None:
    """A Bind's fields in one pass, with every bound checked; None where the body is not a
    well-formed Bind (Bind.decode_checked then says what is wrong with it)."""
    size = len(body)
    end = body.find(0)
    if end < 0:
        return None
    portal = body[:end].decode("utf-8", "surrogateescape")
    pos = end + 1
    end = body.find(0, pos)
    if end < 0:
        return None
    statement = body[pos:end].decode("utf-8", "surrogateescape")
    pos = end + 1
    if size - pos < 2:
        return None
    (n,) = _unpack_count(body, pos)
    pos += 2
    if size - pos < 2 * n + 2:
        return None
    formats = _int16s(body, pos, n) if n else ()
    pos += 2 * n
    (n,) = _unpack_count(body, pos)
    pos += 2
    params: list[bytes | None] = []
    for _ in range(n):
        if size - pos < 4:
            return None
        (length,) = _unpack_length(body, pos)
        pos += 4
        if length == -1:
            params.append(None)
        elif length < 0 or size - pos < length:
            return None
        else:
            params.append(body[pos : pos + length])
            pos += length
    if size - pos < 2:
        return None
    (n,) = _unpack_count(body, pos)
    pos += 2
    if size - pos != 2 * n:
        return None
    return portal, statement, formats, tuple(params), _int16s(body, pos, n) if n else ()


@dataclass(frozen=True, slots=True)
class Bind(Message):
    type_code: ClassVar[int] = codes.BIND
    portal: str = ""
    statement: str = ""
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        # Every Execute of a prepared statement brings a Bind: the common well-formed one is
        # read in one pass; anything the pass does not take is read again by the checked
        # reader below, which names what is wrong.
        fields = _bind_fields(body)
        if fields is not None:
            return cls(*fields)
        return cls.decode_checked(body)

    @classmethod
    def decode_checked(cls, body: bytes) -> Self:
        """decode() through the general reader: every read checked and named."""
        r = BodyReader(body, cls.__name__)
        portal = r.cstring("portal name")
        statement = r.cstring("statement name")
        param_formats = r.int16s(r.count16("parameter format count"), "parameter formats")
        n = r.count16("parameter count")
        r.counted(n, 4, "parameters")
        params = tuple([r.sized("parameter value") for _ in range(n)])
        result_formats = r.int16s(r.count16("result format count"), "result formats")
        r.end()
        return cls(portal, statement, param_formats, params, result_formats)

    def _body(self) -> bytes:
        return b"".join(
            (
                cstr(self.portal, "portal name"),
                cstr(self.statement, "statement name"),
                count16(len(self.param_formats), "parameter formats"),
                pack_many("h", self.param_formats, "parameter formats"),
                count16(len(self.params), "parameters"),
                sized_many(self.params),
                count16(len(self.result_formats), "result formats"),
                pack_many("h", self.result_formats, "result formats"),
            )
        )


@dataclass(frozen=True, slots=True)
class Execute(Message):
    type_code: ClassVar[int] = codes.EXECUTE
    portal: str = ""
    max_rows: int = 0

    @classmethod
    def decode(cls, body: bytes) -> Self:
        # A portal name, its NUL and the row limit, exactly: else the checked reader says why.
        end = body.find(0)
        if end >= 0 and end + 5 == len(body):
            return cls(
                body[:end].decode("utf-8", "surrogateescape"), UINT32.unpack_from(body, end + 1)[0]
            )
        return cls.decode_checked(body)

    @classmethod
    def decode_checked(cls, body: bytes) -> Self:
        """decode() through the general reader: every read checked and named."""
        r = BodyReader(body, cls.__name__)
        portal = r.cstring("portal name")
        # Unsigned, as PostgreSQL reads it; 0 means "all rows".
        max_rows = r.uint32("row limit")
        r.end()
        return cls(portal, max_rows)

    def _body(self) -> bytes:
        return cstr(self.portal, "portal name") + pack(UINT32, self.max_rows, "row limit")


@dataclass(frozen=True, slots=True)
class _PortalOrStatement(Message):
    """Describe and Close share one layout: what kind of object ('S' or 'P'), then its name."""

    kind: TargetKind
    name: str = ""

    @classmethod
    def decode(cls, body: bytes) -> Self:
        # libpq sends a Describe with every Execute: 'S' or 'P', then a name whose NUL
        # ends the body, is read in one pass; anything else by the checked reader below.
        end = len(body) - 1
        if end > 0 and body[end] == 0 and body.find(0, 1) == end:
            kind = body[0]
            if kind == _PORTAL:
                return cls("P", body[1:end].decode("utf-8", "surrogateescape"))
            if kind == _STATEMENT:
                return cls("S", body[1:end].decode("utf-8", "surrogateescape"))
        return cls.decode_checked(body)

    @classmethod
    def decode_checked(cls, body: bytes) -> Self:
        """decode() through the general reader: every read checked and named."""
        r = BodyReader(body, cls.__name__)
        kind = chr(r.byte("target kind"))
        if kind not in ("S", "P"):
            raise r.fail(f"target kind must be 'S' or 'P', got {kind!r}")
        name = r.cstring("name")
        r.end()
        return cls(cast(TargetKind, kind), name)

    def _body(self) -> bytes:
        if self.kind not in ("S", "P"):
            raise ProtocolViolation(f"cannot encode target kind {self.kind!r}: not 'S' or 'P'")
        return self.kind.encode("ascii") + cstr(self.name, "name")


@dataclass(frozen=True, slots=True)
class Describe(_PortalOrStatement):
    type_code: ClassVar[int] = codes.DESCRIBE


@dataclass(frozen=True, slots=True)
class Close(_PortalOrStatement):
    type_code: ClassVar[int] = codes.CLOSE


@dataclass(frozen=True, slots=True)
class Sync(EmptyMessage):
    type_code: ClassVar[int] = codes.SYNC


@dataclass(frozen=True, slots=True)
class Flush(EmptyMessage):
    type_code: ClassVar[int] = codes.FLUSH


@dataclass(frozen=True, slots=True)
class Terminate(EmptyMessage):
    type_code: ClassVar[int] = codes.TERMINATE


@dataclass(frozen=True, slots=True)
class FunctionCall(Message):
    type_code: ClassVar[int] = codes.FUNCTION_CALL
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        oid = r.uint32("function OID")
        arg_formats = r.int16s(r.count16("argument format count"), "argument formats")
        n = r.count16("argument count")
        r.counted(n, 4, "arguments")
        args = tuple([r.sized("argument value") for _ in range(n)])
        result_format = r.int16("result format")
        r.end()
        return cls(oid, arg_formats, args, result_format)

    def _body(self) -> bytes:
        return b"".join(
            (
                pack(UINT32, self.function_oid, "function OID"),
                count16(len(self.arg_formats), "argument formats"),
                pack_many("h", self.arg_formats, "argument formats"),
                count16(len(self.args), "arguments"),
                sized_many(self.args),
                pack(INT16, self.result_format, "result format"),
            )
        )


@dataclass(frozen=True, slots=True)
class CopyFail(Message):
    type_code: ClassVar[int] = codes.COPY_FAIL
    message: str

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        message = r.cstring("error message")
        r.end()
        return cls(message)

    def _body(self) -> bytes:
        return cstr(self.message, "error message")


# The four 'p' messages share a type byte; which one arrived depends on the authentication
# request the server sent, so each has its own decode and none is in the table below.


@dataclass(frozen=True, slots=True)
class PasswordMessage(Message):
    """A cleartext or MD5 password (for pgwarden's clients: the JWT)."""

    type_code: ClassVar[int] = codes.PASSWORD
    password: str

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        password = r.cstring("password")
        r.end()
        return cls(password)

    def _body(self) -> bytes:
        return cstr(self.password, "password")


@dataclass(frozen=True, slots=True)
class SASLInitialResponse(Message):
    type_code: ClassVar[int] = codes.PASSWORD
    mechanism: str
    data: bytes | None = None

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        mechanism = r.cstring("mechanism")
        data = r.sized("initial response")
        r.end()
        return cls(mechanism, data)

    def _body(self) -> bytes:
        return cstr(self.mechanism, "mechanism") + sized(self.data)


@dataclass(frozen=True, slots=True)
class SASLResponse(OpaqueMessage):
    type_code: ClassVar[int] = codes.PASSWORD


@dataclass(frozen=True, slots=True)
class GSSResponse(OpaqueMessage):
    type_code: ClassVar[int] = codes.PASSWORD


AuthResponse: TypeAlias = PasswordMessage | SASLInitialResponse | SASLResponse | GSSResponse
AuthResponseType: TypeAlias = (
    type[PasswordMessage] | type[SASLInitialResponse] | type[SASLResponse] | type[GSSResponse]
)

FrontendMessage: TypeAlias = (
    Query
    | Parse
    | Bind
    | Execute
    | Describe
    | Close
    | Sync
    | Flush
    | Terminate
    | FunctionCall
    | CopyData
    | CopyDone
    | CopyFail
    | AuthResponse
)

_FRONTEND: Final[dict[int, Callable[[bytes], FrontendMessage]]] = {
    cls.type_code: cls.decode
    for cls in (
        Query,
        Parse,
        Bind,
        Execute,
        Describe,
        Close,
        Sync,
        Flush,
        Terminate,
        FunctionCall,
        CopyData,
        CopyDone,
        CopyFail,
    )
}


def decode_frontend(
    type_code: int, body: bytes, *, auth: AuthResponseType | None = None
) -> FrontendMessage:
    """The message a client sent; `auth` names which 'p' message the session expects now."""
    if type_code == PasswordMessage.type_code:
        if auth is None:
            raise ProtocolViolation(
                "unexpected 'p' message: no authentication exchange is in progress"
            )
        return auth.decode(body)
    decode = _FRONTEND.get(type_code)
    if decode is None:
        raise ProtocolViolation(f"unknown frontend message type {show_type(type_code)}")
    return decode(body)
