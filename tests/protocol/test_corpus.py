"""The saved corpus decodes to the shapes it was built from and re-encodes byte for byte."""

from __future__ import annotations

from typing import Any

import gateway.protocol as p

from .corpus import BACKEND_FRAMES, FRONTEND_FRAMES, STARTUP_PACKETS
from .strategies import BACKEND, FRONTEND, STARTUP

# The corpus records 'p' frames in this order; which one each is depends on the auth exchange.
AUTH_RESPONSES: list[p.AuthResponseType] = [
    p.PasswordMessage,
    p.SASLInitialResponse,
    p.SASLResponse,
    p.GSSResponse,
]


def decode_frontend_corpus() -> list[p.FrontendMessage]:
    auth = iter(AUTH_RESPONSES)
    out = []
    for h in FRONTEND_FRAMES:
        wire = bytes.fromhex(h)
        context = next(auth) if wire[0] == ord("p") else None
        out.append(p.decode_frontend(wire[0], wire[5:], auth=context))
    return out


def decode_backend_corpus() -> list[p.BackendMessage]:
    return [p.decode_backend(w[0], w[5:]) for w in map(bytes.fromhex, BACKEND_FRAMES)]


def decode_startup_corpus() -> list[p.StartupPacket]:
    return [p.decode_startup(w[4:]) for w in map(bytes.fromhex, STARTUP_PACKETS)]


def test_corpus_re_encodes_byte_for_byte() -> None:
    corpus: list[tuple[Any, str]] = [
        *zip(decode_frontend_corpus(), FRONTEND_FRAMES, strict=True),
        *zip(decode_backend_corpus(), BACKEND_FRAMES, strict=True),
        *zip(decode_startup_corpus(), STARTUP_PACKETS, strict=True),
    ]
    for message, h in corpus:
        assert message.encode().hex() == h


def test_corpus_holds_every_message_type() -> None:
    assert {type(m) for m in decode_frontend_corpus()} == set(FRONTEND)
    assert {type(m) for m in decode_backend_corpus()} == set(BACKEND)
    assert {type(m) for m in decode_startup_corpus()} == set(STARTUP)


def test_corpus_real_world_shapes() -> None:
    backend = decode_backend_corpus()
    (rows,) = [m for m in backend if isinstance(m, p.RowDescription)]
    assert [
        (f.name, f.table_oid, f.column_attnum, f.type_oid, f.type_size) for f in rows.fields
    ] == [
        ("id", 16385, 1, 23, 4),
        ("email", 16385, 2, 25, -1),
        ("created_at", 16385, 3, 1184, 8),
    ]
    data_rows = [m for m in backend if isinstance(m, p.DataRow)]
    assert p.DataRow((b"2", None, None)) in data_rows
    (full_error,) = [m for m in backend if isinstance(m, p.ErrorResponse) and "R" in m.fields]
    assert set(full_error.fields) == set("SVCMDHPpqWstcdnFLR")
    assert full_error.sqlstate == "23505"
    keys = [m for m in backend if isinstance(m, p.BackendKeyData)]
    assert sorted(len(k.secret_key) for k in keys) == [4, 32]
    cancels = [m for m in decode_startup_corpus() if isinstance(m, p.CancelRequest)]
    assert sorted(len(c.secret_key) for c in cancels) == [4, 32]
    versions = [
        m.protocol_version for m in decode_startup_corpus() if isinstance(m, p.StartupMessage)
    ]
    assert sorted(versions) == [p.PROTOCOL_3_0, p.PROTOCOL_3_2]
