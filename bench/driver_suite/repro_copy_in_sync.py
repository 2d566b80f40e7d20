"""Minimal repro (found by pg8000's suite): a Sync sent while the server is in COPY-IN mode
desynchronises the gateway's response tracker, and the next statement's rows go out unmasked.

The server ignores Sync (and Flush) during copy-in, so it answers one ReadyForQuery where the
gateway counted two Syncs. The left-over "sync" expectation then sits at the front of the
tracker: the next statement's DataRows find no current run (not masked, not counted), its
outcome is written against the statement after it, and so on for the rest of the session.

pg8000 does exactly this for every `COPY ... FROM STDIN` (Parse, Bind, Execute, Sync, then
CopyData, CopyDone, Sync); with the simple protocol a client can provoke it with one stray Sync.

    .venv/bin/python bench/driver_suite/repro_copy_in_sync.py
"""

from __future__ import annotations

import shutil
import socket
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# A DataRow's values, or an ErrorResponse's body.
Row = list[str | None] | tuple[str, bytes]


def msg(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


def cstr(x: str) -> bytes:
    return x.encode() + b"\0"


class Client:
    def __init__(self, host: str, port: int, token: str, target: str) -> None:
        self.s = socket.create_connection((host, port))
        self.token = token
        body = (
            struct.pack("!i", 196608)
            + cstr("user")
            + cstr("x")
            + cstr("database")
            + cstr(target)
            + b"\0"
        )
        self.s.sendall(struct.pack("!i", len(body) + 4) + body)
        self.until_ready()

    def _read(self, n: int) -> bytes:
        return self.s.recv(n, socket.MSG_WAITALL) if n else b""

    def until_ready(self) -> list[Row]:
        rows: list[Row] = []
        while True:
            t = self._read(1)
            (n,) = struct.unpack("!i", self._read(4))
            body = self._read(n - 4)
            if t == b"R" and struct.unpack("!i", body[:4])[0] == 3:
                self.s.sendall(msg(b"p", cstr(self.token)))
            elif t == b"D":
                (cnt,) = struct.unpack_from("!h", body)
                p, row = 2, list[str | None]()
                for _ in range(cnt):
                    (ln,) = struct.unpack_from("!i", body, p)
                    p += 4
                    row.append(None if ln < 0 else body[p : p + ln].decode())
                    p += max(ln, 0)
                rows.append(row)
            elif t == b"E":
                rows.append(("ERROR", body))
            elif t == b"Z":
                return rows

    def query(self, sql: str) -> list[Row]:
        self.s.sendall(msg(b"Q", cstr(sql)))
        return self.until_ready()

    def close(self) -> None:
        self.s.sendall(msg(b"X"))
        self.s.close()


def scenario(c: Client, simple: bool) -> list[list[Row]]:
    probe = "SELECT ssn, card_number FROM customers ORDER BY id"
    out = [c.query(probe)]
    c.query("CREATE TEMP TABLE IF NOT EXISTS t (a int)")
    if simple:  # simple-query COPY plus one stray Sync in copy-in mode
        c.s.sendall(
            msg(b"Q", cstr("COPY t FROM STDIN")) + msg(b"S") + msg(b"d", b"1\n") + msg(b"c")
        )
    else:  # what pg8000 sends for COPY FROM STDIN
        c.s.sendall(
            msg(b"P", cstr("") + cstr("COPY t FROM STDIN") + struct.pack("!h", 0))
            + msg(b"B", cstr("") + cstr("") + struct.pack("!hhh", 0, 0, 0))
            + msg(b"E", cstr("") + struct.pack("!i", 0))
            + msg(b"S")  # ignored by the server: it is in copy-in mode
            + msg(b"d", b"1\n")
            + msg(b"c")
            + msg(b"S")
        )
    c.until_ready()  # the server sends exactly one ReadyForQuery
    out.append(c.query(probe))
    out.append(c.query(probe))
    return out


def main() -> int:
    from cli.localpg import LocalCluster, free_port
    from tests.harness import start_gateway, stop_gateway

    base = Path(tempfile.mkdtemp(prefix="pgwarden-repro-pg-"))
    base.chmod(0o755)
    state = Path(tempfile.mkdtemp(prefix="pgwarden-repro-gw-"))
    cluster = LocalCluster(base, free_port())
    cluster.start()
    cluster.create_app_database()
    gw = start_gateway(state, cluster, ROOT / ".pgwarden" / "bin" / "opa")
    leaked = False
    try:
        token = gw.token("agent:repro", groups=("admins",))  # admins: masks still apply
        for simple in (False, True):
            c = Client(gw.host, gw.port, token, "app")
            before, after, later = scenario(c, simple)
            c.close()
            label = "simple Query COPY + stray Sync" if simple else "extended COPY (pg8000)"
            print(
                f"{label}:\n  before COPY: {before}\n  after COPY : {after}\n  next       : {later}"
            )
            leaked |= after != before
    finally:
        stop_gateway(gw)
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
    print("BUG REPRODUCED: classified columns went out unmasked" if leaked else "not reproduced")
    return 1 if leaked else 0


if __name__ == "__main__":
    raise SystemExit(main())
