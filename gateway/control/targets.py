"""Registered targets: the upstream servers a client names by `dbname`, the databases each
serves, and their credentials."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import orjson

SslMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]
SSL_MODES: tuple[SslMode, ...] = ("disable", "prefer", "require", "verify-ca", "verify-full")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# `dbname` is `target` (its default database) or `target/database`: a target name never
# holds this character, so the first one ends it; a database name may hold more of them.
DATABASE_SEPARATOR = "/"
# In Target.databases: every database of the server.
ANY_DATABASE = "*"


class TargetError(Exception):
    """A target is unknown, invalid, or its credential cannot be read."""


def parse_dbname(dbname: str) -> tuple[str, str | None]:
    """A client's `dbname` as (target name, database or None for the target's default)."""
    name, sep, database = dbname.partition(DATABASE_SEPARATOR)
    if sep and not database:
        raise TargetError(
            f'dbname "{dbname}" names no database after "{DATABASE_SEPARATOR}"'
            f" (use target{DATABASE_SEPARATOR}database, or the target alone for its default)"
        )
    return name, database if sep else None


def dbname_for(target: str, database: str, default: str) -> str:
    """The `dbname` that reaches `database` of `target`, as the audit trail names it."""
    return target if database == default else f"{target}{DATABASE_SEPARATOR}{database}"


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    host: str
    port: int
    dbname: str
    user: str
    # Where the credential lives; the value itself is never stored in the registry.
    password_env: str | None = None
    password_file: str | None = None
    sslmode: SslMode = "prefer"
    sslrootcert: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    # The databases besides `dbname` clients may choose (`target/database`); "*": any of the
    # server's. Empty: only `dbname`. The credential is the target's whichever is chosen.
    databases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise TargetError(f"invalid target name {self.name!r}")
        for what in ("host", "dbname", "user"):
            value = getattr(self, what)
            if not isinstance(value, str) or not value.strip():
                raise TargetError(f"target {self.name}: {what} must be a non-empty string")
        if any(c.isspace() or c in "/?#@" for c in self.host):
            raise TargetError(f"target {self.name}: invalid host {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise TargetError(f"target {self.name}: port must be a number, got {self.port!r}")
        if not 1 <= self.port <= 65535:
            raise TargetError(f"target {self.name}: port {self.port} is not in 1..65535")
        for what in ("password_env", "password_file", "sslrootcert"):
            value = getattr(self, what)
            if value is not None and (not isinstance(value, str) or not value):
                raise TargetError(f"target {self.name}: {what} must be a non-empty string")
        if self.password_env is not None and not _ENV_NAME.match(self.password_env):
            raise TargetError(
                f"target {self.name}: {self.password_env!r} is not an environment variable name"
            )
        if not isinstance(self.labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.labels.items()
        ):
            raise TargetError(f"target {self.name}: labels must map text to text")
        if not isinstance(self.databases, list | tuple) or not all(
            isinstance(d, str) for d in self.databases
        ):
            raise TargetError(f"target {self.name}: databases must be a list of names")
        # The registry file holds a JSON list; the value stays hashable and read-only.
        object.__setattr__(self, "databases", tuple(dict.fromkeys(self.databases)))
        if any(not d for d in self.databases):
            raise TargetError("a database name cannot be empty")
        if self.sslmode not in SSL_MODES:
            raise TargetError(f"invalid sslmode {self.sslmode!r}")
        if self.password_env and self.password_file:
            raise TargetError("give --password-env or --password-file, not both")

    def database_for(self, requested: str | None) -> str:
        """The database a session reaches when the client asks for `requested` (None: the
        default); TargetError when this target does not let clients choose it."""
        if requested is None or requested == self.dbname:
            return self.dbname
        if ANY_DATABASE in self.databases or requested in self.databases:
            return requested
        raise TargetError(
            f'target "{self.name}" does not serve database "{requested}" to clients'
            f" (an administrator can allow it: pgwarden targets add {self.name} --database ...)"
        )

    def password(self, environ: Mapping[str, str]) -> str | None:
        """The credential, read at connect time from its env var or file."""
        if self.password_env:
            value = environ.get(self.password_env)
            if value is None:
                raise TargetError(
                    f"target {self.name}: environment variable {self.password_env} is not set"
                )
            return value
        if self.password_file:
            try:
                return Path(self.password_file).read_text().rstrip("\r\n")
            except OSError as exc:
                raise TargetError(
                    f"target {self.name}: cannot read password file ({exc.strerror})"
                ) from None
        return None

    def describe(self) -> dict[str, object]:
        """Everything about the target that may be shown: never the credential."""
        data = asdict(self)
        data["credential"] = (
            f"env:{self.password_env}"
            if self.password_env
            else f"file:{self.password_file}"
            if self.password_file
            else "none"
        )
        del data["password_env"], data["password_file"]
        return data


class TargetRegistry:
    """Targets kept in one JSON file in the state directory, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._mtime: float | None = None
        self._targets: dict[str, Target] = {}

    def _load(self) -> None:
        try:
            mtime = self._path.stat().st_mtime_ns
        except FileNotFoundError:
            self._targets, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        self._targets = self._parse(self._path.read_bytes())
        self._mtime = mtime

    def refresh(self) -> dict[str, Target]:
        """Read the file again now, whatever its mtime says; the targets by name."""
        self._mtime = None
        self._load()
        return dict(self._targets)

    def _parse(self, data: bytes) -> dict[str, Target]:
        """The file's targets; TargetError naming the file and what is wrong with it, so a
        hand-edited or damaged file is reported as such, never as a crash."""
        where = f"targets file {self._path}"
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise TargetError(f"{where} is not valid JSON: {exc}") from None
        entries = raw.get("targets", []) if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            raise TargetError(f'{where} must hold an object {{"targets": [...]}}')
        targets: dict[str, Target] = {}
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise TargetError(f"{where}: entry {index} is not an object")
            try:
                target = Target(**entry)
            except TypeError as exc:
                raise TargetError(f"{where}: entry {index}: {exc}") from None
            except TargetError as exc:
                raise TargetError(f"{where}: entry {index}: {exc}") from None
            targets[target.name] = target
        return targets

    def get(self, name: str) -> Target | None:
        self._load()
        return self._targets.get(name)

    def all(self) -> list[Target]:
        self._load()
        return sorted(self._targets.values(), key=lambda t: t.name)

    def _save(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        tmp.write_bytes(
            orjson.dumps(
                {"targets": [asdict(t) for t in self.all_unloaded()]}, option=orjson.OPT_INDENT_2
            )
        )
        os.replace(tmp, self._path)
        self._mtime = None

    def all_unloaded(self) -> list[Target]:
        return sorted(self._targets.values(), key=lambda t: t.name)

    def add(self, target: Target, *, replace: bool = False) -> None:
        self._load()
        if target.name in self._targets and not replace:
            raise TargetError(f"target {target.name} already exists")
        self._targets[target.name] = target
        self._save()

    def remove(self, name: str) -> None:
        self._load()
        if self._targets.pop(name, None) is None:
            raise TargetError(f"no target named {name}")
        self._save()
