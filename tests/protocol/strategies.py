"""Hypothesis strategies that build every protocol message type from valid field values."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

import gateway.protocol as p

# Text the protocol carries as NUL-terminated strings: ordinary text, and raw bytes that are
# not UTF-8 (kept as surrogate escapes), since peers may send either.
_plain = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=24)
_raw = (
    st.binary(max_size=24)
    .filter(lambda b: 0 not in b)
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
)
cstrings = st.one_of(_plain, _raw)
names = cstrings.filter(bool)
sql = st.binary(max_size=200).filter(lambda b: 0 not in b)
blobs = st.binary(max_size=200)
nullable = st.none() | blobs
int16 = st.integers(-(2**15), 2**15 - 1)
uint32 = st.integers(0, 2**32 - 1)
formats = st.lists(st.sampled_from([0, 1]) | int16, max_size=6).map(tuple)
secret_keys = st.binary(min_size=4, max_size=256)
field_codes = st.characters(min_codepoint=1, max_codepoint=255)


def _tuple(
    elements: st.SearchStrategy[Any], max_size: int = 8
) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(elements, max_size=max_size).map(tuple)


fields = st.builds(
    p.FieldDescription,
    name=cstrings,
    table_oid=uint32,
    column_attnum=int16,
    type_oid=uint32,
    type_size=int16,
    type_modifier=st.integers(-(2**31), 2**31 - 1),
    format_code=int16,
)
diagnostic_fields = st.dictionaries(field_codes, cstrings, max_size=8)

FRONTEND: dict[type[p.FrontendMessage], st.SearchStrategy[p.FrontendMessage]] = {
    p.Query: st.builds(p.Query, sql),
    p.Parse: st.builds(p.Parse, cstrings, sql, _tuple(uint32)),
    p.Bind: st.builds(p.Bind, cstrings, cstrings, formats, _tuple(nullable), formats),
    p.Execute: st.builds(p.Execute, cstrings, uint32),
    p.Describe: st.builds(p.Describe, st.sampled_from(["S", "P"]), cstrings),
    p.Close: st.builds(p.Close, st.sampled_from(["S", "P"]), cstrings),
    p.Sync: st.just(p.Sync()),
    p.Flush: st.just(p.Flush()),
    p.Terminate: st.just(p.Terminate()),
    p.FunctionCall: st.builds(p.FunctionCall, uint32, formats, _tuple(nullable), int16),
    p.CopyData: st.builds(p.CopyData, blobs),
    p.CopyDone: st.just(p.CopyDone()),
    p.CopyFail: st.builds(p.CopyFail, cstrings),
    p.PasswordMessage: st.builds(p.PasswordMessage, cstrings),
    p.SASLInitialResponse: st.builds(p.SASLInitialResponse, cstrings, nullable),
    p.SASLResponse: st.builds(p.SASLResponse, blobs),
    p.GSSResponse: st.builds(p.GSSResponse, blobs),
}

BACKEND: dict[type[p.BackendMessage], st.SearchStrategy[p.BackendMessage]] = {
    p.AuthenticationOk: st.just(p.AuthenticationOk()),
    p.AuthenticationKerberosV5: st.just(p.AuthenticationKerberosV5()),
    p.AuthenticationCleartextPassword: st.just(p.AuthenticationCleartextPassword()),
    p.AuthenticationMD5Password: st.builds(
        p.AuthenticationMD5Password, st.binary(min_size=4, max_size=4)
    ),
    p.AuthenticationGSS: st.just(p.AuthenticationGSS()),
    p.AuthenticationGSSContinue: st.builds(p.AuthenticationGSSContinue, blobs),
    p.AuthenticationSSPI: st.just(p.AuthenticationSSPI()),
    p.AuthenticationSASL: st.builds(p.AuthenticationSASL, _tuple(names, 4)),
    p.AuthenticationSASLContinue: st.builds(p.AuthenticationSASLContinue, blobs),
    p.AuthenticationSASLFinal: st.builds(p.AuthenticationSASLFinal, blobs),
    p.BackendKeyData: st.builds(p.BackendKeyData, uint32, secret_keys),
    p.BindComplete: st.just(p.BindComplete()),
    p.CloseComplete: st.just(p.CloseComplete()),
    p.CommandComplete: st.builds(p.CommandComplete, cstrings),
    p.CopyData: st.builds(p.CopyData, blobs),
    p.CopyDone: st.just(p.CopyDone()),
    p.CopyInResponse: st.builds(p.CopyInResponse, st.integers(0, 255), formats),
    p.CopyOutResponse: st.builds(p.CopyOutResponse, st.integers(0, 255), formats),
    p.CopyBothResponse: st.builds(p.CopyBothResponse, st.integers(0, 255), formats),
    p.DataRow: st.builds(p.DataRow, _tuple(nullable, 12)),
    p.EmptyQueryResponse: st.just(p.EmptyQueryResponse()),
    p.ErrorResponse: st.builds(p.ErrorResponse, diagnostic_fields),
    p.FunctionCallResponse: st.builds(p.FunctionCallResponse, nullable),
    p.NegotiateProtocolVersion: st.builds(p.NegotiateProtocolVersion, uint32, _tuple(cstrings)),
    p.NoData: st.just(p.NoData()),
    p.NoticeResponse: st.builds(p.NoticeResponse, diagnostic_fields),
    p.NotificationResponse: st.builds(p.NotificationResponse, uint32, cstrings, cstrings),
    p.ParameterDescription: st.builds(p.ParameterDescription, _tuple(uint32)),
    p.ParameterStatus: st.builds(p.ParameterStatus, cstrings, cstrings),
    p.ParseComplete: st.just(p.ParseComplete()),
    p.PortalSuspended: st.just(p.PortalSuspended()),
    p.ReadyForQuery: st.builds(p.ReadyForQuery, st.sampled_from(["I", "T", "E"])),
    p.RowDescription: st.builds(p.RowDescription, _tuple(fields, 6)),
}

STARTUP: dict[type[p.StartupPacket], st.SearchStrategy[p.StartupPacket]] = {
    p.StartupMessage: st.builds(
        p.StartupMessage,
        st.sampled_from([p.PROTOCOL_3_0, p.PROTOCOL_3_2]) | st.integers(3 << 16, (4 << 16) - 1),
        st.dictionaries(names, cstrings, max_size=6),
    ),
    p.SSLRequest: st.just(p.SSLRequest()),
    p.GSSENCRequest: st.just(p.GSSENCRequest()),
    p.CancelRequest: st.builds(p.CancelRequest, uint32, secret_keys),
}

frontend_messages: st.SearchStrategy[p.FrontendMessage] = st.one_of(*FRONTEND.values())
backend_messages: st.SearchStrategy[p.BackendMessage] = st.one_of(*BACKEND.values())
startup_packets: st.SearchStrategy[p.StartupPacket] = st.one_of(*STARTUP.values())
typed_messages: st.SearchStrategy[p.FrontendMessage | p.BackendMessage] = (
    frontend_messages | backend_messages
)
