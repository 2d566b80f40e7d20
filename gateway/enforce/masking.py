"""Replace masked column values in DataRow messages with values that stay valid for their type."""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from gateway.protocol import FieldDescription, ProtocolViolation
from gateway.protocol.codes import DATA_ROW
from gateway.protocol.types import BPCHAR, JSON, JSONB, NAME, TEXTLIKE

__all__ = [
    "MIN_HASH_KEY",
    "MIN_PARTIAL_LENGTH",
    "REDACTED",
    "MaskPlan",
    "OutputMask",
    "mask_value",
    "stronger_method",
]

REDACTED: Final = "***"
# A shorter key makes `hash` guessable offline (emails, phone numbers are small spaces).
MIN_HASH_KEY: Final = 16
# `partial` shows the last 4 characters only when at least as many stay hidden: on a
# 5-character value "keep the last 4" would reveal 80% of it.
MIN_PARTIAL_LENGTH: Final = 8

# NAMEDATALEN - 1: namerecv refuses longer values in binary format.
_NAME_MAX_BYTES: Final = 63

# Lower is weaker; used when two masks land on one column, so the one that hides more wins.
_STRENGTH: Final = {"partial": 1, "email": 1, "hash": 2, "redact": 3, "null": 4}

_U16: Final = struct.Struct("!H")
_I32: Final = struct.Struct("!i")
_HEADER: Final = struct.Struct("!Bi")
_NULL_LENGTH: Final = _I32.pack(-1)

Masker = Callable[[bytes], bytes | None]

# What the parser's lineage says of one entry of a statement's output list: the method its
# value needs (None: no masked column flows into it), and whether the entry stands for a
# number of columns only the server knows (`(f()).*`).
OutputMask = tuple[str | None, bool]


def stronger_method(a: str, b: str) -> str:
    """The method that hides more of two; unknown methods win (they mask to NULL)."""
    if a == b:
        return a
    sa, sb = _STRENGTH.get(a, 99), _STRENGTH.get(b, 99)
    if sa == sb:
        # partial vs email reveal different parts; neither is safe in place of the other.
        return "redact"
    return a if sa > sb else b


def _null(_: bytes) -> None:
    return None


def _masker(
    method: str, type_oid: int, format_code: int, type_modifier: int, key: bytes, encoding: str
) -> Masker:
    """A function that masks one non-NULL value of a column; everything constant is bound here."""
    if method == "null" or format_code not in (0, 1):
        return _null
    if method == "hash" and len(key) < MIN_HASH_KEY:
        raise ValueError(f"hash masking needs a key of at least {MIN_HASH_KEY} bytes")
    if type_oid in (JSON, JSONB):
        return _json_masker(method, type_oid == JSONB and format_code == 1, key, encoding)
    if type_oid not in TEXTLIKE or method not in _STRENGTH:
        # No valid masked value exists for the type (or the method is unknown): NULL.
        return _null

    transform = _TRANSFORMS[method]
    is_bpchar = type_oid == BPCHAR
    width = type_modifier - 4 if type_modifier >= 5 else None
    byte_cap = _NAME_MAX_BYTES if type_oid == NAME else None

    def mask(value: bytes) -> bytes | None:
        try:
            text: str | None = value.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            # Undecodable text cannot be cut by characters; hide all of it.
            text = None
        if is_bpchar and text is not None:
            # Trailing blanks are padding, not data: mask the value, then pad again.
            text = text.rstrip(" ")
        out = transform(text, value, key)
        if width is not None:
            out = out[:width].ljust(width) if is_bpchar else out[:width]
        data = out.encode(encoding, "replace")
        if byte_cap is not None and len(data) > byte_cap:
            # Cut at a character boundary: a split multibyte character is invalid text.
            data = data[:byte_cap].decode(encoding, "ignore").encode(encoding)
        return data

    return mask


def _json_masker(method: str, jsonb_binary: bool, key: bytes, encoding: str) -> Masker:
    if method not in ("redact", "hash"):
        # partial/email have no meaning inside a JSON document; a JSON string of part of
        # the document could leak structure, so NULL.
        return _null
    prefix = b"\x01" if jsonb_binary else b""

    def mask(value: bytes) -> bytes | None:
        if method == "redact":
            inner = REDACTED
        else:
            logical = value[1:] if jsonb_binary else value
            inner = _hash_text(_normalise(logical, encoding), key)
        return prefix + b'"' + inner.encode("ascii") + b'"'

    return mask


def _normalise(value: bytes, encoding: str) -> bytes:
    """The value's UTF-8 form, so a hash does not depend on the client's encoding."""
    try:
        return value.decode(encoding).encode("utf-8")
    except (UnicodeDecodeError, LookupError):
        return value


def _hash_text(data: bytes, key: bytes) -> str:
    return hmac.digest(key, data, "sha256")[:16].hex()


def _redact(text: str | None, raw: bytes, key: bytes) -> str:
    return REDACTED


def _hash(text: str | None, raw: bytes, key: bytes) -> str:
    return _hash_text(raw if text is None else text.encode("utf-8"), key)


def _partial(text: str | None, raw: bytes, key: bytes) -> str:
    if text is None:
        return REDACTED
    n = len(text)
    if n < MIN_PARTIAL_LENGTH:
        return "*" * n
    return "*" * (n - 4) + text[-4:]


def _email(text: str | None, raw: bytes, key: bytes) -> str:
    if text is None:
        return REDACTED
    local, at, domain = text.rpartition("@")
    if not at:
        return REDACTED
    return local[:1] + REDACTED + "@" + domain


_TRANSFORMS: Final[dict[str, Callable[[str | None, bytes, bytes], str]]] = {
    "redact": _redact,
    "hash": _hash,
    "partial": _partial,
    "email": _email,
}


def mask_value(
    method: str,
    value: bytes | None,
    type_oid: int,
    format_code: int,
    key: bytes,
    *,
    type_modifier: int = -1,
    encoding: str = "utf-8",
) -> bytes | None:
    """`value` (a column's bytes in `format_code`) masked with `method`; None means NULL.

    `type_modifier` keeps bpchar(n)/varchar(n) lengths valid; `encoding` is the Python name
    of the session's client_encoding (text in both formats is sent in it).
    """
    if value is None:
        return None
    return _masker(method, type_oid, format_code, type_modifier, key, encoding)(value)


# One output column's treatment in a plan: None passes it through; bytes replace every
# non-NULL value (already length-prefixed: redact and NULL do not depend on the value);
# a function masks each value.
Step = bytes | Masker | None


class MaskPlan:
    """Which output columns of one result set are masked and how; apply() rewrites DataRows."""

    __slots__ = ("_column_count", "_steps", "_uniform", "masked_columns")

    def __init__(
        self,
        steps: Sequence[Step],
        masked_columns: Sequence[str],
        *,
        uniform: bytes | None = None,
    ) -> None:
        self._steps: tuple[Step, ...] = tuple(steps)
        self._column_count: int | None = None if uniform is not None else len(self._steps)
        self._uniform = uniform
        self.masked_columns: list[str] = list(masked_columns)

    @classmethod
    def build(
        cls,
        fields: Sequence[FieldDescription],
        targets: Mapping[tuple[int, int], str],
        *,
        masks_present: bool,
        lineage: Sequence[OutputMask] | None = None,
        result_formats: Sequence[int] | None = None,
        key: bytes,
        encoding: str = "utf-8",
    ) -> MaskPlan | None:
        """The plan for a result described by `fields`, or None when no column is masked.

        `targets` maps (table OID, attnum) of masked base columns to a method: PostgreSQL
        names the base column of an output that is one, and then it decides. A column it
        reports none for (an expression, a UNION, a function's rows) is masked whole
        ("redact") when the parser's `lineage` of that output says a masked column flows
        into it, and passed through when it says none does (a literal, count(*)). Where
        lineage cannot be matched to the columns one to one, or is None (unknown), such a
        column is masked whenever `masks_present`. `result_formats` are the client's Bind
        result formats, which override the RowDescription's (a statement Describe reports
        text before Bind chooses).
        """
        n = len(fields)
        formats = _formats(fields, result_formats)
        traced = _aligned(lineage, n) if lineage is not None else None
        steps: list[Step] = [None] * n
        names: list[str] = []
        for i, f in enumerate(fields):
            method = targets.get((f.table_oid, f.column_attnum))
            if method is None and (f.table_oid == 0 or f.column_attnum == 0):
                if traced is not None:
                    method = traced[i]
                elif masks_present:
                    method = "redact"
            if method is None:
                continue
            masker = _masker(method, f.type_oid, formats[i], f.type_modifier, key, encoding)
            if masker is _null or method == "redact":
                steps[i] = _sized(masker(b""))
            else:
                steps[i] = masker
            names.append(f.name)
        if not names:
            return None
        return cls(steps, names)

    @classmethod
    def all_null(cls, column_count: int | None = None) -> MaskPlan:
        """Every value NULL (valid for any type): masks apply but the columns are unknown.

        With `column_count` None, rows of any width are accepted.
        """
        if column_count is None:
            return cls((), ["*"], uniform=_NULL_LENGTH)
        return cls([_NULL_LENGTH] * column_count, ["*"])

    def apply(self, body: bytes | bytearray | memoryview) -> bytes:
        """The full DataRow frame for `body` (the message after its 5-byte header), masked.

        Raises ProtocolViolation for a malformed body or a row whose width does not match
        the plan: the caller must end the session rather than relay the row unmasked.
        """
        size = len(body)
        if size < 2:
            raise ProtocolViolation("malformed DataRow: truncated column count")
        (n,) = _U16.unpack_from(body, 0)
        count = self._column_count
        if count is not None and n != count:
            raise ProtocolViolation(f"DataRow has {n} columns, the masking plan {count}")
        steps = self._steps
        uniform = self._uniform
        unpack = _I32.unpack_from
        parts: list[bytes | memoryview] = []
        append = parts.append
        view = memoryview(body)
        start = 0
        pos = 2
        for i in range(n):
            if pos + 4 > size:
                raise ProtocolViolation(f"malformed DataRow: truncated length of column {i}")
            (length,) = unpack(body, pos)
            if length == -1:
                pos += 4
                continue
            end = pos + 4 + length
            if length < 0 or end > size:
                raise ProtocolViolation(f"malformed DataRow: column {i} length {length} is invalid")
            step = uniform if uniform is not None else steps[i]
            if step is not None:
                append(view[start:pos])
                if isinstance(step, bytes):
                    append(step)
                else:
                    append(_sized(step(bytes(view[pos + 4 : end]))))
                start = end
            pos = end
        if pos != size:
            raise ProtocolViolation(f"malformed DataRow: {size - pos} unexpected trailing bytes")
        if start == 0:
            return _HEADER.pack(DATA_ROW, size + 4) + bytes(body)
        append(view[start:])
        out = b"".join(parts)
        return _HEADER.pack(DATA_ROW, len(out) + 4) + out


def _aligned(lineage: Sequence[OutputMask], n: int) -> list[str | None] | None:
    """The method of each of `n` result columns from the output entries' lineage, or None
    when they cannot be matched one to one: a count that differs, or more than one entry of
    unknown width (one takes up whatever columns the others leave)."""
    spreads = sum(1 for _, spread in lineage if spread)
    fixed = len(lineage) - spreads
    if spreads == 0:
        return [method for method, _ in lineage] if fixed == n else None
    if spreads > 1 or fixed > n:
        return None
    methods: list[str | None] = []
    for method, spread in lineage:
        methods.extend([method] * (n - fixed) if spread else [method])
    return methods


def _sized(value: bytes | None) -> bytes:
    """A DataRow column: int32 length (-1 for NULL), then the bytes."""
    return _NULL_LENGTH if value is None else _I32.pack(len(value)) + value


def _formats(fields: Sequence[FieldDescription], result_formats: Sequence[int] | None) -> list[int]:
    """Per-column format codes; -1 (masks to NULL) where the client's list does not fit."""
    n = len(fields)
    if result_formats is None:
        return [f.format_code for f in fields]
    if len(result_formats) == 0:
        return [0] * n
    if len(result_formats) == 1:
        return [result_formats[0]] * n
    if len(result_formats) != n:
        # The server rejects such a Bind; if a row comes anyway its formats are unknown.
        return [-1] * n
    return list(result_formats)
