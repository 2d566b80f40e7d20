"""The token registry and the targets in the control store, both backends: recorded,
revoked, added, replaced and removed as the CLI does it; the one-time import of the files
they lived in before; and a PostgreSQL store's LISTEN connection reopened after it drops."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import orjson
import pytest

from cli.localpg import LocalCluster
from gateway.control.client import open_control_store
from gateway.control.mirror import ControlMirror
from gateway.control.postgres_store import PostgresControlStore
from gateway.control.store import ANYTHING_CHANGED, TOKENS_CHANGED, ControlStore
from gateway.control.targets import Target, TargetError
from gateway.identity.registry import TokenRecord, UnknownToken
from gateway.settings import Settings, load_settings
from tests.harness import create_scratch_database, drop_scratch_database

pytestmark = pytest.mark.server


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path, pg_cluster: LocalCluster) -> Settings:
    """Settings selecting each backend; a PostgreSQL store of its own per test, so that
    "the store holds none yet" means what it says."""
    state = tmp_path / "state"
    state.mkdir()
    if request.param == "sqlite":
        return load_settings(state_dir=state)
    name, dsn = create_scratch_database(pg_cluster, "pgwarden_registry")
    request.addfinalizer(lambda: drop_scratch_database(pg_cluster, name))
    return load_settings(state_dir=state, control={"store": "postgres", "postgres_dsn": dsn})


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ControlStore]:
    s = await open_control_store(settings)
    try:
        yield s
    finally:
        await s.close()


def record(jti: str, revoked_at: float | None = None) -> TokenRecord:
    now = time.time()
    return TokenRecord(jti, "agent:ci", ("ai-agents",), now, now + 600, revoked_at)


def target(
    name: str,
    port: int = 5432,
    labels: dict[str, str] | None = None,
    databases: tuple[str, ...] = (),
) -> Target:
    return Target(
        name=name,
        host="127.0.0.1",
        port=port,
        dbname="appdb",
        user="svc",
        labels=labels or {},
        databases=databases,
    )


async def test_tokens_recorded_revoked_and_listed(store: ControlStore) -> None:
    await store.record_token(record("t1"))
    await store.record_token(record("t2"))
    await store.record_token(record("t1"))  # recorded again: nothing changes
    assert [r.jti for r in await store.tokens()] == ["t1", "t2"]
    assert await store.revoked_tokens() == frozenset()
    first = await store.revoke_token("t1", 100.0)
    again = await store.revoke_token("t1", 200.0)
    assert first.revoked_at == again.revoked_at == 100.0
    assert again.groups == ("ai-agents",) and again.status(time.time()) == "revoked"
    assert await store.revoked_tokens() == frozenset({"t1"})
    t2 = await store.token("t2")
    assert t2 is not None and t2.revoked_at is None
    assert await store.token("nope") is None
    with pytest.raises(UnknownToken):
        await store.revoke_token("nope", 1.0)


async def test_targets_added_replaced_and_removed(store: ControlStore) -> None:
    await store.add_target(target("b", labels={"env": "prod"}, databases=("x", "y")))
    await store.add_target(target("a"))
    with pytest.raises(TargetError, match="already exists"):
        await store.add_target(target("a", port=1))
    assert (await store.targets())["a"].port == 5432
    await store.add_target(target("a", port=6000), replace=True)
    stored = await store.targets()
    assert list(stored) == ["a", "b"]
    assert stored["a"].port == 6000
    assert stored["b"] == target("b", labels={"env": "prod"}, databases=("x", "y"))
    await store.remove_target("a")
    with pytest.raises(TargetError, match="no target named a"):
        await store.remove_target("a")
    assert list(await store.targets()) == ["b"]


def write_old_files(state: Path) -> None:
    """targets.json and tokens.sqlite3 as pgwarden wrote them before the control store."""
    targets = {"targets": [{"name": "old", "host": "db", "port": 5433, "dbname": "d", "user": "u",
                            "labels": {"env": "prod"}, "databases": ["*"]}]}  # fmt: skip
    (state / "targets.json").write_bytes(orjson.dumps(targets))
    db = sqlite3.connect(state / "tokens.sqlite3")
    with db:
        db.execute(
            "CREATE TABLE tokens (jti TEXT PRIMARY KEY, subject TEXT NOT NULL, groups TEXT NOT"
            " NULL, issued_at REAL NOT NULL, expires_at REAL NOT NULL, revoked_at REAL)"
        )
        db.execute("INSERT INTO tokens VALUES ('live', 'svc:a', '[\"engineers\"]', 1, 9e9, NULL)")
        db.execute("INSERT INTO tokens VALUES ('gone', 'svc:b', '[]', 1, 9e9, 50)")
    db.close()


async def test_old_files_are_imported_once(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    state = settings.state_dir
    write_old_files(state)
    caplog.set_level("INFO", logger="pgwarden.control")
    store = await open_control_store(settings)
    try:
        targets = await store.targets()
        assert list(targets) == ["old"]
        assert targets["old"].databases == ("*",) and targets["old"].labels == {"env": "prod"}
        live, gone = await store.token("live"), await store.token("gone")
        assert live is not None and live.groups == ("engineers",) and live.revoked_at is None
        assert gone is not None and gone.revoked_at == 50  # still revoked after the move
        assert await store.revoked_tokens() == frozenset({"gone"})
        # Removed after the import: the old file does not bring it back.
        await store.remove_target("old")
    finally:
        await store.close()
    said = [r.getMessage() for r in caplog.records if r.name == "pgwarden.control"]
    assert any("imported 1 target(s)" in m for m in said), said
    assert any("imported 2 token record(s) (1 revoked)" in m for m in said), said
    assert not (state / "targets.json").exists() and not (state / "tokens.sqlite3").exists()
    assert (state / "targets.json.imported").exists()
    assert (state / "tokens.sqlite3.imported").exists()

    store = await open_control_store(settings)
    try:
        assert await store.targets() == {}
        assert len(await store.tokens()) == 2
    finally:
        await store.close()


async def test_an_old_file_is_not_imported_over_what_the_store_holds(settings: Settings) -> None:
    store = await open_control_store(settings)
    try:
        await store.add_target(target("new"))
        await store.record_token(record("kept"))
    finally:
        await store.close()
    write_old_files(settings.state_dir)
    store = await open_control_store(settings)
    try:
        assert list(await store.targets()) == ["new"]
        assert [r.jti for r in await store.tokens()] == ["kept"]
    finally:
        await store.close()
    # Left as they are, for the operator to compare.
    assert (settings.state_dir / "targets.json").exists()
    assert (settings.state_dir / "tokens.sqlite3").exists()


async def test_a_damaged_old_file_is_reported_and_left_in_place(settings: Settings) -> None:
    (settings.state_dir / "targets.json").write_text('{"targets": [')
    with pytest.raises(TargetError, match="not valid JSON"):
        await open_control_store(settings)
    assert (settings.state_dir / "targets.json").exists()


async def wait_for(what: str, check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        await asyncio.sleep(0.02)


async def test_a_dropped_listen_connection_is_reopened(control_dsn: str) -> None:
    """The LISTEN connection ended by the server: the store says it cannot notify (readers
    poll), tells its listeners to look again, opens it again, and notifications flow."""
    watcher, writer = PostgresControlStore(control_dsn), PostgresControlStore(control_dsn)
    await watcher.start()
    await writer.start()
    told: list[str] = []
    watcher.on_change(told.append)
    try:
        assert watcher.notifies_others
        listen = watcher._listen
        assert listen is not None
        pid = listen.get_server_pid()
        conn = await asyncpg.connect(control_dsn)
        try:
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        await wait_for("the loss noticed", lambda: ANYTHING_CHANGED in told)
        await wait_for("LISTEN reopened", lambda: watcher.notifies_others)
        told.clear()
        await writer.record_token(record(f"after-{pid}"))
        await wait_for("a change after the reopening told", lambda: TOKENS_CHANGED in told)
    finally:
        await watcher.close()
        await writer.close()


async def test_the_mirror_sees_a_revocation_made_through_another_store(
    control_dsn: str,
) -> None:
    """A gateway's mirror over a PostgreSQL store learns of a revocation by NOTIFY: its
    poll is set far slower than the wait, so only the notification can tell it."""
    gateway_store, cli_store = (
        PostgresControlStore(control_dsn),
        PostgresControlStore(control_dsn, listen=False),
    )
    await gateway_store.start()
    await cli_store.start()
    mirror = ControlMirror(gateway_store, poll_seconds=300)
    try:
        jti = f"m-{time.time_ns()}"
        await cli_store.record_token(record(jti))
        await mirror.start()
        assert mirror.rejection(jti) is None
        await cli_store.revoke_token(jti, time.time())
        await wait_for("the revocation mirrored", lambda: mirror.rejection(jti) is not None)
        assert mirror.rejection(jti) == "token revoked"
        assert mirror.revocations_changed() is True
    finally:
        await mirror.close()
        await gateway_store.close()
        await cli_store.close()
