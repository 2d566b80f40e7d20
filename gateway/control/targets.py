"""Registered targets: the upstream servers a client names by `dbname`, the databases each
serves, and their credentials."""

from __future__ import annotations

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
        # Stored as a JSON list; the value stays hashable and read-only.
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


def target_from_json(entry: object) -> Target:
    """A target from its stored JSON object; TargetError saying what is wrong with it."""
    if not isinstance(entry, dict):
        raise TargetError("not an object")
    try:
        return Target(**entry)
    except TypeError as exc:
        raise TargetError(str(exc)) from None


def stored_target(name: str, body: str | bytes) -> Target:
    """A target as a control store holds it; one edited by hand into something invalid is
    reported by name."""
    try:
        return target_from_json(orjson.loads(body))
    except (TargetError, orjson.JSONDecodeError) as exc:
        raise TargetError(f"stored target {name} is invalid: {exc}") from None


def target_json(target: Target) -> bytes:
    return orjson.dumps(asdict(target))


# Where targets were kept before they moved into the control store.
LEGACY_TARGETS_FILE = Path("targets.json")


def read_targets_file(path: Path) -> dict[str, Target]:
    """The targets of a `targets.json` file; TargetError naming the file and what is wrong
    with it, so a hand-edited or damaged file is reported as such, never as a crash."""
    where = f"targets file {path}"
    try:
        raw = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise TargetError(f"{where} is not valid JSON: {exc}") from None
    entries = raw.get("targets", []) if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise TargetError(f'{where} must hold an object {{"targets": [...]}}')
    targets: dict[str, Target] = {}
    for index, entry in enumerate(entries):
        try:
            target = target_from_json(entry)
        except TargetError as exc:
            raise TargetError(f"{where}: entry {index}: {exc}") from None
        targets[target.name] = target
    return targets
