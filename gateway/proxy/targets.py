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
        if not _NAME.match(self.name):
            raise TargetError(f"invalid target name {self.name!r}")
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
        raw = orjson.loads(self._path.read_bytes())
        self._targets = {t["name"]: Target(**t) for t in raw.get("targets", [])}
        self._mtime = mtime

    def refresh(self) -> dict[str, Target]:
        """Read the file again now, whatever its mtime says; the targets by name."""
        self._mtime = None
        self._load()
        return dict(self._targets)

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
