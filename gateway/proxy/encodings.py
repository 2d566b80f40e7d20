"""PostgreSQL's client encodings and the Python codecs that read them, in one place."""

from __future__ import annotations

# Every client_encoding PostgreSQL accepts, by the name it reports in ParameterStatus.
_CODECS = {
    "UTF8": "utf-8",
    "SQL_ASCII": "ascii",
    "BIG5": "big5",
    "EUC_CN": "gb2312",
    "EUC_JP": "euc_jp",
    "EUC_JIS_2004": "euc_jis_2004",
    "EUC_KR": "euc_kr",
    "GB18030": "gb18030",
    "GBK": "gbk",
    "ISO_8859_5": "iso8859_5",
    "ISO_8859_6": "iso8859_6",
    "ISO_8859_7": "iso8859_7",
    "ISO_8859_8": "iso8859_8",
    "JOHAB": "johab",
    "KOI8R": "koi8_r",
    "KOI8U": "koi8_u",
    "LATIN1": "latin_1",
    "LATIN2": "iso8859_2",
    "LATIN3": "iso8859_3",
    "LATIN4": "iso8859_4",
    "LATIN5": "iso8859_9",
    "LATIN6": "iso8859_10",
    "LATIN7": "iso8859_13",
    "LATIN8": "iso8859_14",
    "LATIN9": "iso8859_15",
    "LATIN10": "iso8859_16",
    "SJIS": "shift_jis",
    "SHIFT_JIS_2004": "shift_jis_2004",
    "UHC": "cp949",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    # Aliases the server may echo as given.
    "UNICODE": "utf-8",
    "WIN": "cp1251",
    "ALT": "cp866",
}


def python_codec(client_encoding: str) -> str:
    """The codec that reads text in this client_encoding. PostgreSQL's EUC_TW and
    MULE_INTERNAL have none in Python: they are read as ASCII, so SQL text with other
    characters is refused as not decodable rather than guessed at."""
    return _CODECS.get(client_encoding.upper().replace("-", "_"), "ascii")


def server_text(text: str, codec: str) -> str:
    """A server text field (error message, detail) read again in the session's real encoding:
    the protocol codec reads fields as UTF-8 and keeps other bytes as surrogate escapes, which
    no JSON can hold. Bytes that do not decode stay visible as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode(codec, "backslashreplace")


def client_text(value: bytes, codec: str) -> str:
    """A value the client sent or receives (parameter, row) as text for policy and audit."""
    return value.decode(codec, "backslashreplace")


def for_client(text: str, codec: str) -> str:
    """pgwarden's own text as the protocol codec must write it for a client reading `codec`
    (the codec writes surrogate escapes back as the raw bytes they stand for)."""
    if codec == "utf-8":
        return text
    return text.encode(codec, "replace").decode("utf-8", "surrogateescape")
