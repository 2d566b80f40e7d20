"""The service file and .pgpass as `pgwarden login` edits them: replaced in place, never
readable by others, other entries untouched, values libpq could misread refused."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cli.libpq_files import LibpqFileError, ServiceEntry, remove_entry, write_entry


def entry(value: str = "tok.en.1", user: str = "alice@example.com") -> ServiceEntry:
    params = {"host": "gw", "port": "6543", "dbname": "app", "user": user, "sslmode": "disable"}
    return ServiceEntry("app", params, value, "https://gw:6544")


def test_files_made_0600_even_over_older_readable_ones(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    (tmp_path / ".pg_service.conf").write_text("[mine]\nhost=x\n")
    (tmp_path / ".pg_service.conf").chmod(0o644)
    services, passwords, replaced = write_entry(env, entry())
    assert replaced is None
    for path in (services, passwords):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (
        services.read_text() == "[mine]\nhost=x\n\n[app]\nhost=gw\nport=6543\ndbname=app\n"
        "user=alice@example.com\nsslmode=disable\n"
    )


def test_colons_and_backslashes_are_escaped_and_read_back(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    write_entry(env, entry(user="agent:ci\\x"))
    lines = (tmp_path / ".pgpass").read_text().splitlines()
    assert lines[1] == "gw:6543:app:agent\\:ci\\\\x:tok.en.1"
    removed = remove_entry(env, "app")
    assert removed is not None and removed.password == "tok.en.1"


def test_a_second_write_replaces_and_returns_the_old_password(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    (tmp_path / ".pgpass").write_text("*:*:*:*:wildcard\n")
    write_entry(env, entry("first"))
    _, passwords, replaced = write_entry(env, entry("second"))
    assert replaced == "first"
    lines = passwords.read_text().splitlines()
    # Ours first (libpq takes the first match), the person's own line kept after it.
    assert lines == [
        "# pgwarden login service=app gateway=https://gw:6544",
        "gw:6543:app:alice@example.com:second",
        "*:*:*:*:wildcard",
    ]
    assert (tmp_path / ".pg_service.conf").read_text().count("[app]") == 1


@pytest.mark.parametrize("service", ["", "a]b", "line\nbreak", " padded"])
def test_names_libpq_would_misread_are_refused(tmp_path: Path, service: str) -> None:
    bad = ServiceEntry(service, entry().params, "t", "")
    with pytest.raises(LibpqFileError):
        write_entry({"HOME": str(tmp_path)}, bad)
    assert not (tmp_path / ".pgpass").exists()


def test_a_value_with_a_newline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LibpqFileError):
        write_entry({"HOME": str(tmp_path)}, entry(user="alice\nhost=evil"))
    assert not (tmp_path / ".pg_service.conf").exists()
