"""Where libpq finds a connection without being told: a `~/.pg_service.conf` section and a
`~/.pgpass` line per `pgwarden login`, each replaced in place, other entries untouched."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# The comment line above the .pgpass line a login wrote; logout and the next login find
# their line by it (the line alone does not say which service it belongs to).
_MARK = "# pgwarden login service="
_SECTION = re.compile(r"^\s*\[(?P<name>[^\]]*)\]\s*$")
# What may not appear in a service name or a value: libpq reads both line by line.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


class LibpqFileError(ValueError):
    """A service name or value that libpq's files cannot hold."""


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    service: str
    params: dict[str, str]
    password: str
    # The gateway that issued the password, so logout can revoke it there.
    gateway_url: str


def service_file(environ: Mapping[str, str]) -> Path:
    """PGSERVICEFILE, as libpq reads it, else ~/.pg_service.conf."""
    named = environ.get("PGSERVICEFILE")
    return Path(named) if named else Path(environ.get("HOME") or Path.home()) / ".pg_service.conf"


def password_file(environ: Mapping[str, str]) -> Path:
    """PGPASSFILE, as libpq reads it, else ~/.pgpass."""
    named = environ.get("PGPASSFILE")
    return Path(named) if named else Path(environ.get("HOME") or Path.home()) / ".pgpass"


def check_service_name(service: str) -> None:
    if not service or _UNSAFE.search(service) or "]" in service or service != service.strip():
        raise LibpqFileError(f"{service!r} cannot be a service name in a libpq service file")


def _pgpass_field(value: str) -> str:
    # .pgpass escapes `:` and `\` with a backslash.
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _write_private(path: Path, lines: list[str]) -> None:
    """Replace `path` by a file created 0600 (never readable by others, not even for a
    moment); the old file stays whole until the new one is complete."""
    real = path.resolve()
    real.parent.mkdir(parents=True, exist_ok=True)
    temporary = real.with_name(f".{real.name}.pgwarden-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, real)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


def _without_section(lines: list[str], service: str) -> tuple[list[str], list[str]]:
    """The lines without the `[service]` section (its header and every line up to the next
    header), and that section's lines."""
    kept: list[str] = []
    section: list[str] = []
    inside = False
    for line in lines:
        header = _SECTION.match(line)
        if header is not None:
            inside = header.group("name").strip() == service
        (section if inside else kept).append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    return kept, section


def _without_password(lines: list[str], service: str) -> tuple[list[str], str | None, str | None]:
    """The lines without the marked line of `service`: (lines, its password, its gateway)."""
    kept: list[str] = []
    password = gateway = None
    skip_next = False
    for line in lines:
        if skip_next:
            skip_next = False
            password = _password_of(line)
            continue
        if line.startswith(_MARK):
            name, _, rest = line[len(_MARK) :].partition(" gateway=")
            if name == service:
                skip_next, gateway = True, rest.strip() or None
                continue
        kept.append(line)
    return kept, password, gateway


def _password_of(line: str) -> str:
    """The fifth field of a .pgpass line, unescaped."""
    fields: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in line:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":" and len(fields) < 4:
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    return "".join(current)


def write_entry(environ: Mapping[str, str], entry: ServiceEntry) -> tuple[Path, Path, str | None]:
    """Write (or replace) the service's section and its password line, both files 0600:
    the service file, the password file, and the password the entry replaced."""
    check_service_name(entry.service)
    for key, value in entry.params.items():
        if _UNSAFE.search(value) or value != value.strip():
            raise LibpqFileError(f"{key} {value!r} cannot be written into a libpq service file")
    services, passwords = service_file(environ), password_file(environ)
    kept, _ = _without_section(_read_lines(services), entry.service)
    section = [f"[{entry.service}]"] + [f"{k}={v}" for k, v in entry.params.items()]
    _write_private(services, kept + ([""] if kept else []) + section)

    p = entry.params
    line = ":".join(
        _pgpass_field(v) for v in (p["host"], p["port"], p["dbname"], p["user"], entry.password)
    )
    others, replaced, _ = _without_password(_read_lines(passwords), entry.service)
    # First in the file: libpq takes the first matching line, and an older wildcard line
    # further up would otherwise shadow this one.
    _write_private(
        passwords, [f"{_MARK}{entry.service} gateway={entry.gateway_url}", line, *others]
    )
    return services, passwords, replaced


def remove_entry(environ: Mapping[str, str], service: str) -> ServiceEntry | None:
    """Remove the service's section and its marked password line; what was there, or None
    when neither file held it."""
    check_service_name(service)
    services, passwords = service_file(environ), password_file(environ)
    service_lines = _read_lines(services)
    kept, section = _without_section(service_lines, service)
    if section:
        _write_private(services, kept)
    password_lines = _read_lines(passwords)
    others, password, gateway = _without_password(password_lines, service)
    if len(others) != len(password_lines):
        _write_private(passwords, others)
    if not section and password is None:
        return None
    params: dict[str, str] = {}
    for line in section[1:]:
        key, equals, value = line.strip().partition("=")
        if equals and not key.startswith("#"):
            params[key.strip()] = value.strip()
    return ServiceEntry(service, params, password or "", gateway or "")
