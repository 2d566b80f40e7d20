"""Which databases a statement drops, renames, moves or copies (pgwarden must let go of them)."""

from __future__ import annotations

import pytest

from gateway.sql import analyze
from gateway.sql.databases import databases_held_by_statement


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("DROP DATABASE x", ("x",)),
        ('drop database if exists "Mixed Case" with (force)', ("Mixed Case",)),
        ("ALTER DATABASE x RENAME TO y", ("x", "y")),
        ("ALTER DATABASE x SET TABLESPACE pg_default", ("x",)),
        ("CREATE DATABASE y TEMPLATE x", ("y", "x")),
        ("CREATE DATABASE y WITH TEMPLATE = x STRATEGY = file_copy", ("y", "x")),
        ("CREATE DATABASE y", ("y", "template1")),
        ("CREATE DATABASE y TEMPLATE DEFAULT", ("y", "template1")),
        ("ALTER DATABASE x SET work_mem = '1MB'", ()),
        ("ALTER DATABASE x OWNER TO bob", ()),
        ("ALTER DATABASE x WITH ALLOW_CONNECTIONS false", ()),
        ("SELECT 'DROP DATABASE x'", ()),
    ],
)
def test_databases_held_by_statement(text: str, names: tuple[str, ...]) -> None:
    (facts,) = analyze(text)
    assert databases_held_by_statement(facts) == names
