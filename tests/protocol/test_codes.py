"""The named type bytes: every message type has one, and its value is the byte on the wire."""

from __future__ import annotations

import re

import gateway.protocol as p
from gateway.protocol import codes

from .strategies import BACKEND, FRONTEND


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).upper()


# Types whose constant is not their class name: the 'p' family shares one byte, and
# Authentication's subtypes share 'R'.
_SHARED = {
    "PasswordMessage": "PASSWORD",
    "SASLInitialResponse": "PASSWORD",
    "SASLResponse": "PASSWORD",
    "GSSResponse": "PASSWORD",
}


def test_every_message_type_has_its_named_code() -> None:
    for cls in (*FRONTEND, *BACKEND):
        name = cls.__name__
        if name.startswith("Authentication"):
            constant = "AUTHENTICATION"
        else:
            constant = _SHARED.get(name, _snake(name))
        assert getattr(codes, constant) == cls.type_code, name


def test_codes_are_the_bytes_on_the_wire() -> None:
    assert p.Query(b"SELECT 1").encode()[0] == codes.QUERY == ord("Q")
    assert p.Sync().encode()[0] == codes.SYNC == ord("S")
    assert p.ReadyForQuery("I").encode() == b"Z\x00\x00\x00\x05" + bytes((codes.STATUS_IDLE,))
    assert p.DataRow(()).encode()[0] == codes.DATA_ROW == ord("D")
    assert p.CopyData(b"x").encode()[0] == codes.COPY_DATA == ord("d")


def test_frontend_codes_are_distinct_and_backend_codes_are_distinct() -> None:
    frontend = {c.type_code for c in FRONTEND}
    backend = {c.type_code for c in BACKEND}
    # One byte per type in each direction, the 'p' family and 'R' aside.
    assert len(frontend) == len({_SHARED.get(c.__name__, c.__name__) for c in FRONTEND})
    assert len(backend) == len(
        {"R" if c.__name__.startswith("Authentication") else c.__name__ for c in BACKEND}
    )
