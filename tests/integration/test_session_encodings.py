"""Every client encoding round-trips rows, notices and errors through the gateway, and the
audit records of such a session are written and verify (server text read in its encoding)."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from gateway.audit.records import canonical
from gateway.proxy.encodings import python_codec
from tests.harness import RunningGateway

from .test_audit_support import records_after, store_env, verify_json, wait_for

pytestmark = pytest.mark.server

# client_encoding -> text with characters outside ASCII that the encoding can hold.
SAMPLES = {
    "UTF8": "café 日本語",
    "LATIN1": "café déjà",
    "LATIN2": "Łódź żółć",
    "LATIN9": "œuvre €",
    "WIN1252": "naïve “quotes” €",
    "WIN1251": "Привет мир",
    "KOI8R": "Привет мир",
    "ISO_8859_7": "Καλημέρα",
    # 表 and 許 end in byte 0x5C (a backslash) in SJIS and BIG5.
    "SJIS": "日本語テキスト表",
    "EUC_JP": "日本語テキスト",
    "BIG5": "中文測試 許功蓋",
    "GBK": "中文测试",
    "GB18030": "中文测试",
    "EUC_KR": "한국어 시험",
    "UHC": "한국어 시험",
    "LATIN3": "Ħaġar żebbuġ",
    "LATIN4": "ākstiņš ē",
    "LATIN5": "İstanbul ğüş",
    "LATIN6": "Þórður ð",
    "LATIN7": "Ąžuolas ļ",
    "LATIN8": "Ŵŷ ẁ",
    "LATIN10": "Ștefan Țară",
    "ISO_8859_5": "Привет",
    "ISO_8859_6": "مرحبا",
    "ISO_8859_8": "שלום",
    "KOI8U": "Привіт",
    "WIN866": "Привет",
    "WIN874": "สวัสดี",
    "WIN1250": "Łódź",
    "WIN1253": "Καλημέρα",
    "WIN1254": "İstanbul",
    "WIN1255": "שלום",
    "WIN1256": "مرحبا",
    "WIN1257": "Ąžuolas",
    "WIN1258": "Đà",
    # JOHAB is left out: Python's johab codec and PostgreSQL's disagree (psycopg's own
    # "SELECT '한국어'" fails against the server directly).
    "EUC_CN": "中文测试",
    "EUC_JIS_2004": "日本語",
    "SHIFT_JIS_2004": "日本語表",
}


def _outcomes(gateway: RunningGateway, app: str) -> dict[str, dict[str, Any]]:
    records = records_after(gateway.settings)
    requests = {
        r.id: r.record()
        for r in records
        if r.kind == "request" and r.record()["application_name"] == app
    }
    return {
        requests[r.record()["request_id"]]["text"]: r.record()
        for r in records
        if r.kind == "outcome" and r.record()["request_id"] in requests
    }


@pytest.mark.parametrize("encoding", list(SAMPLES))
def test_rows_notices_and_errors_round_trip(gateway: RunningGateway, encoding: str) -> None:
    text = SAMPLES[encoding]
    assert text.encode(python_codec(encoding)).decode(python_codec(encoding)) == text
    app = f"enc-{encoding.lower()}-{uuid.uuid4().hex[:6]}"
    token = gateway.token("agent:encodings", groups=("admins",))
    dsn = gateway.dsn(token, application_name=app, client_encoding=encoding)
    notices: list[str] = []
    failing = f"SELECT '{text}'::int"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        assert conn.execute("SHOW client_encoding").fetchone() == (encoding,)
        # A row with the text, as the client sent it.
        assert conn.execute(f"SELECT '{text}' AS v").fetchone() == (text,)
        # A notice with it.
        conn.execute(f"DO $$ BEGIN RAISE NOTICE 'notice: {text}'; END $$")
        assert notices == [f"notice: {text}"]
        # A server error whose message quotes it.
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as info:
            conn.execute(failing)
        assert info.value.diag.message_primary == (
            f'invalid input syntax for type integer: "{text}"'
        )
        # A server error raised with it: the session goes on.
        with pytest.raises(psycopg.errors.RaiseException) as raised:
            conn.execute(f"DO $$ BEGIN RAISE EXCEPTION 'boom: {text}'; END $$")
        assert raised.value.diag.message_primary == f"boom: {text}"
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)
    outcomes = wait_for(lambda: (o := _outcomes(gateway, app)).get("SELECT 'still usable'") and o)
    # The errors' outcome records exist and hold the server's words, read in the encoding.
    assert outcomes[failing]["sqlstate"] == "22P02"
    assert outcomes[failing]["error_message"] == (
        f'invalid input syntax for type integer: "{text}"'
    )
    raised_text = f"DO $$ BEGIN RAISE EXCEPTION 'boom: {text}'; END $$"
    assert outcomes[raised_text]["error_message"] == f"boom: {text}"
    assert outcomes[f"SELECT '{text}' AS v"]["rows"] == 1
    ends = wait_for(
        lambda: [
            r.record()
            for r in records_after(gateway.settings)
            if r.kind == "session_end" and r.record()["application_name"] == app
        ]
    )
    assert ends[0]["reason"] == "client quit"
    code, report, err = verify_json(store_env(gateway.settings))
    assert code == 0 and report["ok"] is True, (report, err)


def test_a_record_with_undecodable_text_still_serialises() -> None:
    """Bytes a decoder kept as surrogate escapes: escaped, never an exception."""
    record = {"error_message": 'invalid input: "caf\udce9"', "rows": [["\ud800"]]}
    assert canonical(record) == (
        b'{"error_message":"invalid input: \\"caf\\\\xe9\\"","rows":[["\\\\xed\\\\xa0\\\\x80"]]}'
    )
