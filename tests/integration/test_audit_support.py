"""Helpers of the test_audit_* modules: read a gateway's trail back, run `pgwarden audit`.

(No tests here; the module is named for the files the audit integration tests own.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import orjson
from typer.testing import CliRunner

from cli.main import app as cli_app
from gateway.audit import StoredRecord, audit_store
from gateway.settings import Settings

T = TypeVar("T")


def store_env(
    settings: Settings, state_dir: Path | None = None, dsn: str | None = None
) -> dict[str, str]:
    """PGWARDEN_* for a CLI that reads the store `settings` names (optionally elsewhere)."""
    env = {
        "PGWARDEN_STATE_DIR": str(state_dir or settings.state_dir),
        "PGWARDEN_INSTANCE": settings.instance,
        "PGWARDEN_AUDIT__STORE": settings.audit.store,
        "PGWARDEN_AUDIT__SQLITE_PATH": str(settings.audit.sqlite_path),
        "PGWARDEN_AUDIT__POSTGRES_DSN": dsn if dsn is not None else settings.audit.postgres_dsn,
    }
    return env


def pgwarden(env: Mapping[str, str], *args: str) -> tuple[int, str, str]:
    """`pgwarden <args>` in-process (typer CliRunner): exit code, stdout, stderr."""
    result = CliRunner().invoke(cli_app, list(args), env=dict(env))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def verify_json(env: Mapping[str, str]) -> tuple[int, dict[str, Any], str]:
    """`pgwarden audit verify --json`: exit code, the report, stderr."""
    code, out, err = pgwarden(env, "audit", "verify", "--json")
    return code, orjson.loads(out), err


def records_after(settings: Settings, pos: int = 0) -> list[StoredRecord]:
    """Every record stored after position `pos`, read through a store of its own."""

    async def read() -> list[StoredRecord]:
        store = audit_store(settings)
        await store.open()
        try:
            out: list[StoredRecord] = []
            while True:
                page = await store.after(pos if not out else out[-1].pos, 1000)
                out.extend(page)
                if len(page) < 1000:
                    return out
        finally:
            await store.close()

    return asyncio.run(read())


def last_pos(settings: Settings) -> int:
    records = records_after(settings)
    return records[-1].pos if records else 0


def wait_for(probe: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout` seconds.

    The default is generous: a passing probe returns at once, and on a loaded CI machine the
    index reaches a record the gateway wrote long before a probe that reads the whole
    store of a session-wide gateway (thousands of records) has run a few times (a
    session_end seen after 10.6 s once, two CPU hogs running)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {probe!r}")
        time.sleep(interval)
