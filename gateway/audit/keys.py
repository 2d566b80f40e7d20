"""Audit chain keys on disk: a write-once genesis key and the current, forward-rotated key."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import orjson

_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def _file_stem(chain: str) -> str:
    # Chain names come from settings; hex-encode anything that is not a plain file name.
    return (
        chain if _SAFE.match(chain) and not chain.startswith(".") else "x-" + chain.encode().hex()
    )


class AuditKeyring:
    """Key files of audit chains under one directory (0700, files 0600, genesis 0400).

    The gateway signs with the current key only. The genesis key is what `audit verify`
    derives every epoch's key from; an operator who wants forward security moves it off the
    gateway host after the first start and points `audit verify --keys` at it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def genesis_path(self, chain: str) -> Path:
        return self.directory / f"{_file_stem(chain)}.genesis"

    def current_path(self, chain: str) -> Path:
        return self.directory / f"{_file_stem(chain)}.key"

    def genesis_key(self, chain: str) -> bytes | None:
        path = self.genesis_path(chain)
        if not path.exists():
            return None
        return bytes.fromhex(orjson.loads(path.read_bytes())["key"])

    def current(self, chain: str) -> tuple[int, bytes]:
        """The chain's (epoch, key); a new chain gets a fresh genesis key at epoch 0."""
        path = self.current_path(chain)
        if path.exists():
            data = orjson.loads(path.read_bytes())
            return int(data["epoch"]), bytes.fromhex(data["key"])
        if self.genesis_path(chain).exists():
            # A current key that vanished must not be silently replaced by a new genesis:
            # that would start a second, unrelated chain under the same name.
            raise FileNotFoundError(f"audit key {path} is missing but its genesis key exists")
        key = secrets.token_bytes(32)
        self._write_once(self.genesis_path(chain), {"chain": chain, "key": key.hex()})
        self.replace_current(chain, 0, key)
        return 0, key

    def replace_current(self, chain: str, epoch: int, key: bytes) -> None:
        """Atomically swap in a new current key; the old one is overwritten, then unlinked."""
        self._ensure_dir()
        path = self.current_path(chain)
        tmp = path.with_suffix(".key.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, orjson.dumps({"chain": chain, "epoch": epoch, "key": key.hex()}))
            os.fsync(fd)
        finally:
            os.close(fd)
        if path.exists():
            # Best effort against recovery from the old inode; the filesystem may keep copies.
            with path.open("r+b") as old:
                old.write(b"\0" * path.stat().st_size)
                old.flush()
                os.fsync(old.fileno())
        os.replace(tmp, path)
        self._fsync_dir()

    def _write_once(self, path: Path, value: dict[str, str]) -> None:
        self._ensure_dir()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            os.write(fd, orjson.dumps(value))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._fsync_dir()

    def _ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class HeadWitness:
    """The latest (seq, link) of each chain, kept outside the store to expose truncation.

    Written after each commit with an atomic rename and no fsync: after a crash the head may
    lag the store, which verify accepts; it may never be ahead of it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._made = False

    def path(self, chain: str) -> Path:
        return self.directory / f"{_file_stem(chain)}.head"

    def record(self, chain: str, seq: int, link: bytes) -> None:
        if not self._made:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._made = True
        path = self.path(chain)
        tmp = path.with_suffix(".head.tmp")
        tmp.write_bytes(orjson.dumps({"chain": chain, "seq": seq, "link": link.hex()}))
        os.replace(tmp, path)

    def chains(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return [orjson.loads(p.read_bytes())["chain"] for p in self.directory.glob("*.head")]

    def read(self, chain: str) -> tuple[int, bytes] | None:
        path = self.path(chain)
        if not path.exists():
            return None
        data = orjson.loads(path.read_bytes())
        return int(data["seq"]), bytes.fromhex(data["link"])
