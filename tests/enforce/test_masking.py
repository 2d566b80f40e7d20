"""Masking: each method on each type and format, plans, DataRow rewriting, the server's verdict."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import pq
from psycopg.pq.abc import PGresult
from psycopg.rows import TupleRow

from cli.localpg import LocalCluster
from gateway.enforce.masking import (
    MIN_PARTIAL_LENGTH,
    MaskPlan,
    mask_value,
    stronger_method,
)
from gateway.protocol import DataRow, FieldDescription, ProtocolViolation

KEY = b"0123456789abcdef-masking-key"
OTHER_KEY = b"fedcba9876543210-other-key"
METHODS = ("redact", "null", "hash", "partial", "email")
TEXT, VARCHAR, BPCHAR, NAME, JSON, JSONB = 25, 1043, 1042, 19, 114, 3802
INT4, INT8, NUMERIC, DATE, UUID, BYTEA, TEXT_ARRAY, BOOL = 23, 20, 1700, 1082, 2950, 17, 1009, 16
CITEXT_LIKE = 91234  # an extension type's OID: unknown, so never treated as text
TEXTLIKE = (TEXT, VARCHAR, BPCHAR, NAME)
NON_TEXT = (INT4, INT8, NUMERIC, DATE, UUID, BYTEA, TEXT_ARRAY, BOOL, CITEXT_LIKE, 0)


def hashed(value: bytes, key: bytes = KEY) -> bytes:
    return hmac.new(key, value, "sha256").digest()[:16].hex().encode()


# -- mask_value: text-like types ---------------------------------------------------------

EMAIL = b"john.doe@example.com"
EXPECTED_TEXT = {
    "redact": b"***",
    "null": None,
    "hash": hashed(EMAIL),
    "partial": b"****************.com",
    "email": b"j***@example.com",
}


@pytest.mark.parametrize("fmt", [0, 1])
@pytest.mark.parametrize("type_oid", TEXTLIKE)
@pytest.mark.parametrize("method", METHODS)
def test_text_like_types_in_both_formats(method: str, type_oid: int, fmt: int) -> None:
    # Binary format of a text type is its raw bytes, so both formats mask identically.
    assert mask_value(method, EMAIL, type_oid, fmt, KEY) == EXPECTED_TEXT[method]


@pytest.mark.parametrize("fmt", [0, 1])
@pytest.mark.parametrize("type_oid", NON_TEXT)
@pytest.mark.parametrize("method", METHODS)
def test_types_without_a_valid_masked_value_become_null(
    method: str, type_oid: int, fmt: int
) -> None:
    assert mask_value(method, b"\x00\x00\x00\x2a", type_oid, fmt, KEY) is None
    assert mask_value(method, b"42", type_oid, fmt, KEY) is None


@pytest.mark.parametrize("type_oid", (*TEXTLIKE, JSON, JSONB, *NON_TEXT))
@pytest.mark.parametrize("method", METHODS)
def test_null_stays_null(method: str, type_oid: int) -> None:
    assert mask_value(method, None, type_oid, 0, KEY) is None
    assert mask_value(method, None, type_oid, 1, KEY) is None


@pytest.mark.parametrize("method", ["bogus", "", "REDACT"])
def test_unknown_method_masks_to_null(method: str) -> None:
    assert mask_value(method, EMAIL, TEXT, 0, KEY) is None


@pytest.mark.parametrize("fmt", [2, -1, 7])
def test_unknown_format_masks_to_null(fmt: int) -> None:
    for method in METHODS:
        assert mask_value(method, EMAIL, TEXT, fmt, KEY) is None


def test_partial_counts_characters_not_bytes() -> None:
    value = "Ünïcødé-ß€ñ".encode()
    assert mask_value("partial", value, TEXT, 0, KEY) == ("*" * 7 + "-ß€ñ").encode()


@pytest.mark.parametrize("n", range(MIN_PARTIAL_LENGTH + 3))
def test_partial_stars_short_values_whole(n: int) -> None:
    value = "abcdefghijklmnop"[:n]
    out = mask_value("partial", value.encode(), TEXT, 0, KEY)
    assert out is not None and len(out) == n
    if n < MIN_PARTIAL_LENGTH:
        assert out == b"*" * n
    else:
        assert out == b"*" * (n - 4) + value[-4:].encode()
        # At least as much stays hidden as is shown.
        assert out.count(b"*") >= 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("jane@example.com", "j***@example.com"),
        ("no-at-sign", "***"),
        ("", "***"),
        ("@example.com", "***@example.com"),
        ("x@", "x***@"),
        ('"a@b"@corp.example', '"***@corp.example'),
        ("émile@exämple.fr", "é***@exämple.fr"),
    ],
)
def test_email(value: str, expected: str) -> None:
    assert mask_value("email", value.encode(), TEXT, 0, KEY) == expected.encode()


def test_hash_is_stable_keyed_and_format_independent() -> None:
    a = mask_value("hash", EMAIL, TEXT, 0, KEY)
    assert a == mask_value("hash", EMAIL, VARCHAR, 1, KEY) == hashed(EMAIL)
    assert len(a or b"") == 32
    assert mask_value("hash", EMAIL, TEXT, 0, OTHER_KEY) != a
    assert mask_value("hash", b"other@example.com", TEXT, 0, KEY) != a


def test_hash_refuses_a_short_key() -> None:
    with pytest.raises(ValueError, match="key"):
        mask_value("hash", EMAIL, TEXT, 0, b"short")
    # Methods without a key do not care.
    assert mask_value("redact", EMAIL, TEXT, 0, b"") == b"***"


def test_hash_does_not_depend_on_client_encoding() -> None:
    text = "café@example.com"
    utf8 = mask_value("hash", text.encode(), TEXT, 0, KEY)
    latin1 = mask_value("hash", text.encode("latin-1"), TEXT, 0, KEY, encoding="latin-1")
    assert utf8 == latin1 == hashed(text.encode())


def test_other_client_encodings_are_masked_in_that_encoding() -> None:
    value = "renée.dupont@café.fr".encode("latin-1")
    assert mask_value("email", value, TEXT, 0, KEY, encoding="latin-1") == "r***@café.fr".encode(
        "latin-1"
    )
    assert mask_value("partial", value, TEXT, 0, KEY, encoding="latin-1") == (
        "*" * 16 + "é.fr"
    ).encode("latin-1")


@pytest.mark.parametrize("method", ["partial", "email"])
def test_undecodable_text_is_hidden_whole(method: str) -> None:
    # Not UTF-8: cutting by characters is impossible, so nothing of it is kept.
    assert mask_value(method, b"\xff\xfe@\xfa1234", TEXT, 0, KEY) == b"***"


# -- bpchar, varchar(n) and name keep their lengths valid ---------------------------------


@pytest.mark.parametrize("fmt", [0, 1])
def test_bpchar_is_padded_to_its_length(fmt: int) -> None:
    char10 = 10 + 4  # typmod of char(10)
    value = b"ab@c      "
    assert mask_value("redact", value, BPCHAR, fmt, KEY, type_modifier=char10) == b"***       "
    assert mask_value("email", value, BPCHAR, fmt, KEY, type_modifier=char10) == b"a***@c    "
    # Padding is not data: the hash is of the value, and cut to the column's length.
    assert mask_value("hash", value, BPCHAR, fmt, KEY, type_modifier=char10) == hashed(b"ab@c")[:10]
    card = b"4111111111111111    "
    assert (
        mask_value("partial", card, BPCHAR, fmt, KEY, type_modifier=24)
        == b"*" * 12 + b"1111" + b" " * 4
    )


@pytest.mark.parametrize("method", ["redact", "hash", "partial", "email"])
@pytest.mark.parametrize("width", [1, 2, 3, 5])
def test_short_bpchar_and_varchar_never_overflow(method: str, width: int) -> None:
    value = b"a@bcdefghijk"[:width]
    bp = mask_value(method, value.ljust(width), BPCHAR, 0, KEY, type_modifier=width + 4)
    vc = mask_value(method, value, VARCHAR, 0, KEY, type_modifier=width + 4)
    assert bp is not None and len(bp.decode()) == width
    assert vc is not None and len(vc.decode()) <= width
    # Nothing of the original survives a redact or hash.
    if method in ("redact", "hash"):
        assert value not in (bp, vc) or len(value) == 0


def test_bpchar_without_length_is_not_padded() -> None:
    assert mask_value("redact", b"abcdef", BPCHAR, 0, KEY) == b"***"


def test_varchar_with_room_is_not_truncated() -> None:
    assert mask_value("hash", EMAIL, VARCHAR, 0, KEY, type_modifier=100 + 4) == hashed(EMAIL)


def test_name_stays_within_63_bytes_at_a_character_boundary() -> None:
    value = ("é" * 20 + "@" + "ü" * 20).encode()  # 81 bytes before masking
    out = mask_value("email", value, NAME, 1, KEY)
    assert out is not None and len(out) <= 63
    assert out.decode().startswith("é***@ü")


# -- json and jsonb ------------------------------------------------------------------------

DOC = b'{"email": "x@y.z", "n": 1}'


@pytest.mark.parametrize(("type_oid", "fmt"), [(JSON, 0), (JSON, 1), (JSONB, 0)])
def test_json_masks_to_a_json_string(type_oid: int, fmt: int) -> None:
    assert mask_value("redact", DOC, type_oid, fmt, KEY) == b'"***"'
    assert mask_value("hash", DOC, type_oid, fmt, KEY) == b'"' + hashed(DOC) + b'"'
    for method in ("null", "partial", "email"):
        assert mask_value(method, DOC, type_oid, fmt, KEY) is None


def test_jsonb_binary_keeps_its_version_prefix() -> None:
    assert mask_value("redact", b"\x01" + DOC, JSONB, 1, KEY) == b'\x01"***"'
    # The prefix is format, not data: the hash matches the text format's.
    assert mask_value("hash", b"\x01" + DOC, JSONB, 1, KEY) == b'\x01"' + hashed(DOC) + b'"'


def test_stronger_method() -> None:
    assert stronger_method("partial", "hash") == "hash"
    assert stronger_method("null", "redact") == "null"
    assert stronger_method("partial", "email") == "redact"
    assert stronger_method("email", "email") == "email"
    assert stronger_method("bogus", "redact") == "bogus"  # unknown masks to NULL


# -- MaskPlan.build ------------------------------------------------------------------------

CUSTOMERS = 16400


def field(name: str, oid: int, attnum: int, type_oid: int = TEXT, **kw: Any) -> FieldDescription:
    return FieldDescription(name, oid, attnum, type_oid, **kw)


FIELDS = (
    field("id", CUSTOMERS, 1, INT4),
    field("email", CUSTOMERS, 2),
    field("name", CUSTOMERS, 3),
    field("card", CUSTOMERS, 4, VARCHAR, type_modifier=24),
    field("since", CUSTOMERS, 5, DATE),
)
ROW = (b"7", EMAIL, b"John Doe", b"4111111111111111", b"2024-01-31")


def run(plan: MaskPlan, values: tuple[bytes | None, ...]) -> tuple[bytes | None, ...]:
    frame = plan.apply(DataRow(values).encode()[5:])
    assert frame[:1] == b"D"
    return DataRow.decode(frame[5:]).values


def test_base_columns_are_masked_by_oid_and_attnum() -> None:
    plan = MaskPlan.build(
        FIELDS,
        {(CUSTOMERS, 2): "email", (CUSTOMERS, 4): "partial", (CUSTOMERS + 1, 3): "redact"},
        masks_present=True,
        key=KEY,
    )
    assert plan is not None
    assert plan.masked_columns == ["email", "card"]
    assert run(plan, ROW) == (
        b"7",
        b"j***@example.com",
        b"John Doe",
        b"************1111",
        b"2024-01-31",
    )


def test_expression_columns_are_masked_whole_when_masks_are_present() -> None:
    fields = (
        field("id", CUSTOMERS, 1, INT4),
        field("upper", 0, 0),  # upper(email): no base column
        field("len", 0, 0, INT4),
        field("row_to_json", 0, 0, JSON),
    )
    plan = MaskPlan.build(fields, {(CUSTOMERS, 2): "partial"}, masks_present=True, key=KEY)
    assert plan is not None
    assert plan.masked_columns == ["upper", "len", "row_to_json"]
    out = run(plan, (b"7", b"JOHN.DOE@EXAMPLE.COM", b"20", b'{"email":"john.doe@example.com"}'))
    assert out == (b"7", b"***", None, b'"***"')


def test_masks_present_without_resolved_targets_still_masks_expressions() -> None:
    # The masked column is in the statement but not in this result's base columns.
    plan = MaskPlan.build(
        (field("id", CUSTOMERS, 1, INT4), field("e", 0, 0)), {}, masks_present=True, key=KEY
    )
    assert plan is not None and run(plan, (b"7", b"x@y")) == (b"7", b"***")


def test_no_masks_means_no_plan() -> None:
    fields = (*FIELDS, field("expr", 0, 0))
    assert MaskPlan.build(fields, {}, masks_present=False, key=KEY) is None
    # Masks for other tables only: nothing here needs masking, but expressions do.
    only_base = FIELDS
    assert MaskPlan.build(only_base, {(1, 1): "redact"}, masks_present=True, key=KEY) is None


def test_lineage_decides_expression_columns() -> None:
    """A literal or count(*) beside masked columns comes back as written; an expression a
    masked value flows into is masked whole; a base column is decided by its OID."""
    fields = (
        field("?column?", 0, 0),
        field("count", 0, 0, INT4),
        field("email", CUSTOMERS, 2),
        field("upper", 0, 0),
    )
    lineage = [(None, False), (None, False), (None, False), ("redact", False)]
    plan = MaskPlan.build(
        fields, {(CUSTOMERS, 2): "email"}, masks_present=True, lineage=lineage, key=KEY
    )
    assert plan is not None
    assert plan.masked_columns == ["email", "upper"]
    out = run(plan, (b"x", b"2", b"ada@example.com", b"ADA@EXAMPLE.COM"))
    assert out == (b"x", b"2", b"a***@example.com", b"***")


def test_lineage_with_one_entry_of_unknown_width_takes_up_the_rest() -> None:
    fields = (field("lit", 0, 0), field("a", 0, 0), field("b", 0, 0), field("tail", 0, 0))
    lineage = [(None, False), ("redact", True), (None, False)]
    plan = MaskPlan.build(fields, {}, masks_present=True, lineage=lineage, key=KEY)
    assert plan is not None
    assert run(plan, (b"x", b"secret", b"secret", b"y")) == (b"x", b"***", b"***", b"y")


@pytest.mark.parametrize(
    "lineage",
    [
        [(None, False)] * 3,  # fewer entries than columns
        [(None, False)] * 5,  # more
        [(None, True), (None, True), (None, False)],  # two of unknown width
        [(None, False)] * 3 + [(None, True)] * 2,
    ],
)
def test_lineage_that_does_not_match_the_columns_is_not_used(
    lineage: list[tuple[str | None, bool]],
) -> None:
    fields = tuple(field(f"c{i}", 0, 0) for i in range(4))
    plan = MaskPlan.build(fields, {}, masks_present=True, lineage=lineage, key=KEY)
    assert plan is not None  # masks_present: every expression column masked whole
    assert run(plan, (b"a", b"b", b"c", b"d")) == (b"***",) * 4


def test_result_formats_override_the_row_description() -> None:
    # A statement Describe reports text; Bind asked for binary.
    fields = (field("email", CUSTOMERS, 2, JSONB), field("other", CUSTOMERS, 3, JSONB))
    targets = {(CUSTOMERS, 2): "redact", (CUSTOMERS, 3): "redact"}
    doc = b"\x01" + DOC
    for formats, expected in (
        ([1], (b'\x01"***"', b'\x01"***"')),
        ([0, 1], (b'"***"', b'\x01"***"')),
        ([], (b'"***"', b'"***"')),
        (None, (b'"***"', b'"***"')),
        # A list that fits no column count: the formats are unknown, so NULL.
        ([1, 1, 1], (None, None)),
    ):
        plan = MaskPlan.build(fields, targets, masks_present=True, result_formats=formats, key=KEY)
        assert plan is not None
        assert run(plan, (doc, doc)) == expected, formats


def test_hash_plan_refuses_a_short_key() -> None:
    with pytest.raises(ValueError, match="key"):
        MaskPlan.build(FIELDS, {(CUSTOMERS, 2): "hash"}, masks_present=True, key=b"k")


def test_all_null() -> None:
    plan = MaskPlan.all_null(3)
    assert run(plan, (b"1", None, b"x")) == (None, None, None)
    with pytest.raises(ProtocolViolation):
        plan.apply(DataRow((b"1",)).encode()[5:])
    any_width = MaskPlan.all_null()
    assert run(any_width, (b"1", b"2")) == (None, None)
    assert run(any_width, ()) == ()
    assert run(any_width, tuple(b"v" for _ in range(40))) == (None,) * 40


# -- apply ---------------------------------------------------------------------------------


def email_plan() -> MaskPlan:
    plan = MaskPlan.build(FIELDS, {(CUSTOMERS, 2): "email"}, masks_present=True, key=KEY)
    assert plan is not None
    return plan


def test_apply_keeps_null_and_unmasked_bytes_exactly() -> None:
    plan = email_plan()
    body = DataRow((b"", None, b"\x00\xff", None, b"x" * 70000)).encode()[5:]
    frame = plan.apply(body)
    # Nothing masked changed: the frame is the original, byte for byte.
    assert frame == DataRow((b"", None, b"\x00\xff", None, b"x" * 70000)).encode()


def test_apply_accepts_views_of_a_receive_buffer() -> None:
    plan = email_plan()
    body = DataRow(ROW).encode()[5:]
    assert plan.apply(bytearray(body)) == plan.apply(memoryview(body)) == plan.apply(body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00",
        b"\x00\x05",  # 5 columns announced, none present
        DataRow(ROW).encode()[5:-1],  # last value cut short
        DataRow(ROW).encode()[5:] + b"\x00",  # trailing byte
        b"\x00\x05" + b"\xff\xff\xff\xfe" + b"\x00" * 40,  # length -2
        DataRow(ROW[:4]).encode()[5:],  # width differs from the plan
    ],
)
def test_apply_refuses_malformed_rows(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        email_plan().apply(body)


TYPES = st.sampled_from([TEXT, VARCHAR, BPCHAR, NAME, JSON, JSONB, INT4, UUID, BYTEA, 0])


@st.composite
def plans_and_rows(draw: st.DrawFn) -> tuple[list[FieldDescription], dict[Any, str], Any]:
    n = draw(st.integers(0, 12))
    fields = [
        FieldDescription(
            f"c{i}",
            draw(st.sampled_from([0, CUSTOMERS, CUSTOMERS + 1])),
            draw(st.integers(0, 4)),
            draw(TYPES),
            -1,
            draw(st.sampled_from([-1, 5, 6, 14, 100])),
            draw(st.sampled_from([0, 1])),
        )
        for i in range(n)
    ]
    targets = draw(
        st.dictionaries(
            st.tuples(st.sampled_from([CUSTOMERS, CUSTOMERS + 1]), st.integers(1, 4)),
            st.sampled_from(METHODS),
            max_size=6,
        )
    )
    values = draw(
        st.lists(
            st.none()
            | st.binary(max_size=40)
            | st.text(max_size=30).map(str.encode)
            | st.builds(lambda s: b"\x01" + s.encode(), st.text(max_size=10)),
            min_size=n,
            max_size=n,
        )
    )
    return fields, targets, values


@settings(max_examples=400, deadline=None)
@given(plans_and_rows(), st.booleans(), st.none() | st.lists(st.sampled_from([0, 1]), max_size=3))
def test_apply_never_raises_on_well_formed_rows(
    case: tuple[list[FieldDescription], dict[Any, str], list[bytes | None]],
    masks_present: bool,
    formats: list[int] | None,
) -> None:
    fields, targets, values = case
    plan = MaskPlan.build(
        fields, targets, masks_present=masks_present, result_formats=formats, key=KEY
    )
    if plan is None:
        assert all((f.table_oid, f.column_attnum) not in targets for f in fields)
        if masks_present:
            assert all(f.table_oid and f.column_attnum for f in fields)
        return
    out = run(plan, tuple(values))
    assert len(out) == len(values)
    masked = set(plan.masked_columns)
    for f, before, after in zip(fields, values, out, strict=True):
        if f.name not in masked:
            assert after == before
        elif before is None:
            assert after is None
        else:
            # Whatever a masked column shows, it is never the original (unless it is
            # indistinguishable from a mask anyway).
            assert after != before or before in (b"***", b'"***"', b"") or set(before) <= {42, 32}


# -- the server's verdict: masked values are valid for their type and format ---------------

COLUMNS = [
    ("c_text", "text", "'john.doe@example.com'"),
    ("c_vc5", "varchar(5)", "'ab@cd'"),
    ("c_vc", "varchar(100)", "'Ünïcødé.person@exämple.org'"),
    ("c_vcn", "varchar", "'4111111111111111'"),
    ("c_ch10", "char(10)", "'ab@c'"),
    ("c_ch2", "char(2)", "'xy'"),
    ("c_ch1", "char", "'q'"),
    ("c_name", "name", "'someone@" + "d" * 50 + "'"),
    ("c_json", "json", """'{"email": "x@y.z", "n": [1, 2]}'"""),
    ("c_jsonb", "jsonb", """'{"email": "x@y.z", "n": [1, 2]}'"""),
    ("c_int4", "int4", "42"),
    ("c_int8", "int8", "4200000000"),
    ("c_num", "numeric(10,2)", "12.5"),
    ("c_date", "date", "'2024-01-31'"),
    ("c_ts", "timestamptz", "'2024-01-31 12:00+00'"),
    ("c_uuid", "uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"),
    ("c_bytea", "bytea", "'\\xdeadbeef'"),
    ("c_arr", "text[]", "'{a@b.c,d}'"),
    ("c_bool", "bool", "true"),
    ("c_enum", "mk_mood", "'happy'"),
    ("c_null", "text", "NULL"),
]


@pytest.fixture(scope="module")
def server(pg_cluster: LocalCluster) -> Iterator[psycopg.Connection[TupleRow]]:
    cols = ", ".join(f"{name} {ddl}" for name, ddl, _ in COLUMNS)
    values = ", ".join(v for _, _, v in COLUMNS)
    insert = f"INSERT INTO mk_src VALUES ({values})"  # noqa: S608 (only the constants above)
    pg_cluster.psql(
        "DROP TABLE IF EXISTS mk_src, mk_sink; DROP TYPE IF EXISTS mk_mood;"
        " CREATE TYPE mk_mood AS ENUM ('happy', 'sad');"
        f" CREATE TABLE mk_src ({cols}); CREATE TABLE mk_sink (LIKE mk_src); {insert}"
    )
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        yield conn


def fetch(conn: psycopg.Connection[TupleRow], sql: str, fmt: int) -> PGresult:
    res = conn.pgconn.exec_params(sql.encode(), [], result_format=fmt)
    assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
    return res


def described(res: PGresult) -> list[FieldDescription]:
    return [
        FieldDescription(
            (res.fname(i) or b"").decode(),
            res.ftable(i),
            res.ftablecol(i),
            res.ftype(i),
            res.fsize(i),
            res.fmod(i),
            res.fformat(i),
        )
        for i in range(res.nfields)
    ]


@pytest.mark.server
@pytest.mark.parametrize("fmt", [0, 1])
@pytest.mark.parametrize("method", METHODS)
def test_server_accepts_every_masked_value(
    server: psycopg.Connection[TupleRow], method: str, fmt: int
) -> None:
    res = fetch(server, "SELECT * FROM mk_src", fmt)
    fields = described(res)
    targets = {(f.table_oid, f.column_attnum): method for f in fields}
    plan = MaskPlan.build(fields, targets, masks_present=True, key=KEY)
    assert plan is not None
    original = tuple(res.get_value(0, i) for i in range(res.nfields))
    masked = run(plan, original)

    # Send the masked row back in the same format, typed as the columns are, into a table
    # with the same column types (lengths enforced on assignment).
    server.execute("TRUNCATE mk_sink")
    placeholders = ", ".join(f"${i + 1}" for i in range(len(fields)))
    ins = server.pgconn.exec_params(
        f"INSERT INTO mk_sink VALUES ({placeholders})".encode(),  # noqa: S608 (only $n)
        list(masked),
        [f.type_oid for f in fields],
        [fmt] * len(fields),
    )
    assert ins.status == pq.ExecStatus.COMMAND_OK, ins.error_message.decode()
    back = fetch(server, "SELECT * FROM mk_sink", fmt)
    stored = tuple(back.get_value(0, i) for i in range(back.nfields))
    assert stored == masked

    by_name = dict(zip([f.name for f in fields], masked, strict=True))
    text_values = {
        "c_text", "c_vc5", "c_vc", "c_vcn", "c_ch10", "c_ch2", "c_ch1", "c_name",
    }  # fmt: skip
    for name, value in by_name.items():
        is_json = name in ("c_json", "c_jsonb")
        no_valid_mask = name not in text_values and not is_json
        json_without_mask = is_json and method in ("partial", "email")
        if method == "null" or name == "c_null" or no_valid_mask or json_without_mask:
            assert value is None, name
        else:
            assert value is not None, name
            assert value != original[[f.name for f in fields].index(name)], name
    if method == "email":
        assert by_name["c_text"] == b"j***@example.com"
        assert by_name["c_ch10"] == b"a***@c    "
        assert by_name["c_vc5"] == b"a***@"
    if method == "partial":
        assert by_name["c_vcn"] == b"************1111"
        assert by_name["c_vc"] == b"**********************.org"


@pytest.mark.server
@pytest.mark.parametrize("fmt", [0, 1])
def test_server_expression_columns_are_masked_whole(
    server: psycopg.Connection[TupleRow], fmt: int
) -> None:
    res = fetch(
        server,
        "SELECT c_int4, upper(c_text) AS up, c_text::varchar(8) AS cut, length(c_text) AS len,"
        " row_to_json(s) AS doc, to_jsonb(c_text) AS jb FROM mk_src s",
        fmt,
    )
    fields = described(res)
    src = fetch(server, "SELECT c_text FROM mk_src", fmt)
    origin = (src.ftable(0), src.ftablecol(0))
    plan = MaskPlan.build(fields, {origin: "partial"}, masks_present=True, key=KEY)
    assert plan is not None
    assert plan.masked_columns == ["up", "cut", "len", "doc", "jb"]
    masked = run(plan, tuple(res.get_value(0, i) for i in range(res.nfields)))
    jsonb_redacted = b'\x01"***"' if fmt == 1 else b'"***"'
    assert masked == (res.get_value(0, 0), b"***", b"***", None, b'"***"', jsonb_redacted)
    params = server.pgconn.exec_params(
        b"SELECT $1::int4, $2::text, $3::varchar(8), $4::int4, $5::json, $6::jsonb",
        list(masked),
        [f.type_oid for f in fields],
        [fmt] * len(fields),
        result_format=fmt,
    )
    assert params.status == pq.ExecStatus.TUPLES_OK, params.error_message.decode()
    assert tuple(params.get_value(0, i) for i in range(6)) == masked
