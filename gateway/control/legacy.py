"""The one-time import of the files the control store replaced: `targets.json` and
`tokens.sqlite3` in the state directory. Each is imported only while the store holds no
target (no token) yet, then renamed `*.imported`, so that a second start, a second gateway
or a CLI command never imports it again; what was imported is logged."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

from gateway.control.store import ControlStore
from gateway.control.targets import LEGACY_TARGETS_FILE, read_targets_file
from gateway.identity.registry import LEGACY_REGISTRY_FILE, TokenRecord, token_from_row

log = logging.getLogger("pgwarden.control")

IMPORTED_SUFFIX = ".imported"


async def import_legacy_files(store: ControlStore, state_dir: Path) -> None:
    """Import the state directory's old targets file and token registry into `store`
    when it has none of them. A file that cannot be read raises (TargetError, OSError,
    sqlite3.Error) and is left as it is: nothing is half-imported and then forgotten."""
    await _import_targets(store, state_dir / LEGACY_TARGETS_FILE)
    await _import_tokens(store, state_dir / LEGACY_REGISTRY_FILE)


async def _import_targets(store: ControlStore, path: Path) -> None:
    if not await asyncio.to_thread(path.exists):
        return
    if await store.targets():
        log.warning(
            "%s is not imported: the control store already holds targets (remove or rename"
            " the file once you have compared them: pgwarden targets list)",
            path,
            extra={"event": "control_import_skipped"},
        )
        return
    targets = await asyncio.to_thread(read_targets_file, path)
    for target in targets.values():
        # replace: a second gateway importing the same file at the same moment is harmless.
        await store.add_target(target, replace=True)
    _retire(path)
    log.info(
        "imported %d target(s) from %s into the control store; the file is renamed %s",
        len(targets),
        path,
        path.name + IMPORTED_SUFFIX,
        extra={"event": "control_import"},
    )


async def _import_tokens(store: ControlStore, path: Path) -> None:
    if not await asyncio.to_thread(path.exists):
        return
    if await store.tokens():
        log.warning(
            "%s is not imported: the control store already holds tokens",
            path,
            extra={"event": "control_import_skipped"},
        )
        return
    records = await asyncio.to_thread(_read_token_registry, path)
    for record in records:
        # With its revocation time: a token revoked before the move stays revoked.
        await store.record_token(record)
    _retire(path)
    log.info(
        "imported %d token record(s) (%d revoked) from %s into the control store; the file"
        " is renamed %s",
        len(records),
        sum(r.revoked_at is not None for r in records),
        path,
        path.name + IMPORTED_SUFFIX,
        extra={"event": "control_import"},
    )


def _read_token_registry(path: Path) -> list[TokenRecord]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT jti, subject, groups, issued_at, expires_at, revoked_at FROM tokens"
        ).fetchall()
    finally:
        # Closing the last connection folds its write-ahead log into the file.
        db.close()
    return [token_from_row(r) for r in rows]


def _retire(path: Path) -> None:
    path.replace(path.with_name(path.name + IMPORTED_SUFFIX))
    for side in ("-wal", "-shm"):
        path.with_name(path.name + side).unlink(missing_ok=True)
