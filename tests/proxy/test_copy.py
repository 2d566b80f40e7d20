"""COPY in and out through the gateway is byte-identical to direct; big COPY OUT never stalls."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

from gateway.protocol import Query
from tests.harness import RunningGateway

from .wire import RawClient

pytestmark = pytest.mark.server

ROWS_SQL = (
    "SELECT i, md5(i::text), CASE WHEN i % 7 = 0 THEN NULL ELSE 'ü\\t\"' || i END, i * 1.5"
    " FROM generate_series(1, {n}) i"
)


def _copy_out(dsn: str, sql: str, **kw: Any) -> bytes:
    with psycopg.connect(dsn, autocommit=True, **kw) as conn, conn.cursor() as cur:
        chunks = []
        with cur.copy(sql) as copy:
            for chunk in copy:
                chunks.append(bytes(chunk))
        return b"".join(chunks)


@pytest.mark.parametrize("fmt", ["text", "csv", "binary"])
def test_copy_to_stdout_byte_identical(gateway: RunningGateway, admin_token: str, fmt: str) -> None:
    sql = f"COPY ({ROWS_SQL.format(n=5000)}) TO STDOUT WITH (FORMAT {fmt})"
    direct = _copy_out(gateway.direct_dsn(), sql)
    via = _copy_out(gateway.dsn(admin_token), sql, connect_timeout=10)
    assert len(via) > 100_000
    assert via == direct


def test_large_copy_out_200k_rows(gateway: RunningGateway, admin_token: str) -> None:
    sql = f"COPY ({ROWS_SQL.format(n=200_000)}) TO STDOUT"
    direct = _copy_out(gateway.direct_dsn(), sql)
    start = time.monotonic()
    via = _copy_out(gateway.dsn(admin_token), sql, connect_timeout=10)
    assert time.monotonic() - start < 30
    assert hashlib.sha256(via).digest() == hashlib.sha256(direct).digest()
    assert via.count(b"\n") == 200_000


def test_copy_out_to_slow_reader_resumes(gateway: RunningGateway, admin_token: str) -> None:
    """The client stops reading mid-COPY (the gateway must pause the server), then drains it all."""
    client = RawClient.connect(gateway.host, gateway.port, timeout=20)
    try:
        client.login("app", admin_token)
        client.send(
            Query(
                b"COPY (SELECT i, repeat('z', 200) FROM generate_series(1, 150000) i) TO STDOUT"
            ).encode()
        )
        # Not reading for a moment fills the socket buffers: the gateway must pause the server.
        time.sleep(0.7)
        rows = 0
        while True:
            code, body = client.frame()
            if code == ord("d"):
                rows += body.count(b"\n")
            elif code == ord("Z"):
                break
            else:
                assert code in b"HcC", (chr(code), body[:200])
        assert rows == 150_000
        frames = client.query("SELECT 'after'")
        assert any(c == ord("D") and b"after" in b for c, b in frames)
    finally:
        client.close()


def test_psycopg_copy_from_stdin_same_as_direct(gateway: RunningGateway, admin_token: str) -> None:
    rows = [(i, f"name ✓ {i}" if i % 5 else None, b"\x00\xff" * (i % 4)) for i in range(3000)]

    def load(dsn: str, binary: bool, **kw: Any) -> list[Any]:
        with psycopg.connect(dsn, autocommit=True, **kw) as conn, conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE cin (i int, s text, b bytea)")
            fmt = " (FORMAT BINARY)" if binary else ""
            with cur.copy(f"COPY cin FROM STDIN{fmt}") as copy:
                if binary:
                    copy.set_types(["int4", "text", "bytea"])
                for r in rows:
                    copy.write_row(r)
            assert cur.rowcount == len(rows)
            return cur.execute("SELECT * FROM cin ORDER BY i").fetchall()

    for binary in (False, True):
        via = load(gateway.dsn(admin_token), binary, connect_timeout=10)
        assert via == load(gateway.direct_dsn(), binary)
        assert [(r[0], r[1], bytes(r[2])) for r in via] == rows


def test_copy_from_stdin_error_leaves_session_usable(via: psycopg.Connection[TupleRow]) -> None:
    via.execute("CREATE TEMP TABLE cbad (i int)")
    with (
        pytest.raises(psycopg.errors.InvalidTextRepresentation),
        via.cursor() as cur,
        cur.copy("COPY cbad FROM STDIN") as copy,
    ):
        copy.write(b"1\nnot-a-number\n3\n")
    assert via.execute("SELECT count(*) FROM cbad").fetchone() == (0,)


def test_psql_copy_in_and_out(gateway: RunningGateway, admin_token: str, tmp_path: Path) -> None:
    data = "".join(f"{i}\tline {i} ☃\n" for i in range(20_000))
    src = tmp_path / "in.tsv"
    src.write_text(data)
    script = (
        "CREATE TEMP TABLE pc (i int, s text);\n"  # noqa: S608 (a psql script, no user input)
        f"\\copy pc FROM '{src}'\n"
        "\\copy (SELECT * FROM pc ORDER BY i) TO STDOUT\n"
    )

    def run(dsn: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn],
            input=script,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )

    via, direct = run(gateway.dsn(admin_token)), run(gateway.direct_dsn())
    assert via.returncode == 0, via.stderr
    assert via.stdout == direct.stdout == data
    assert via.stderr == direct.stderr == ""


def test_psql_copy_from_stdin_inline(gateway: RunningGateway, admin_token: str) -> None:
    script = (
        "CREATE TEMP TABLE pi (a int, b text);\nCOPY pi FROM STDIN;\n1\tone\n2\t\\N\n\\.\n"
        "SELECT * FROM pi ORDER BY a;\n"
    )
    outs = []
    for dsn in (gateway.dsn(admin_token), gateway.direct_dsn()):
        out = subprocess.run(
            ["psql", "-X", "-A", "-q", "-v", "ON_ERROR_STOP=1", dsn],
            input=script,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )
        assert out.returncode == 0, out.stderr
        outs.append(out.stdout)
    assert outs[0] == outs[1]
    assert "1|one" in outs[0] and "2|" in outs[0]
