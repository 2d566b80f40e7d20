"""pgwarden's own reads of search_path leave nothing on the client's server session that the
client can observe: the same raw message sequence sent direct and through the gateway gets
the same answers, message by message, in every state the session can be in when the read
is made (idle, inside a transaction, inside an extended pipeline before its Sync, in an
aborted transaction, skipping to Sync after an error), and pg_stat_activity shows the
client's own statement afterwards.

Every sequence makes the path uncertain (set_config() of any name does) and then sends a
statement that needs it, so the gateway reads it exactly there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest

from cli.localpg import APP_DB, SUPERUSER
from gateway.protocol import (
    Bind,
    Close,
    Describe,
    ErrorResponse,
    Execute,
    Flush,
    Parse,
    Query,
    Sync,
)
from gateway.proxy.search_path import READ_NAME
from tests.harness import RunningGateway
from tests.integration import direct
from tests.proxy.wire import RawClient, codes

pytestmark = pytest.mark.server

Frames = list[tuple[int, bytes]]
# Plays steps direct and through the gateway, asserts both answered alike; the answers.
Compare = Callable[[list["Step"]], list[Frames]]
MOVE = b"SELECT set_config('jit', 'off', false)"  # any set_config makes the path uncertain


@dataclass(frozen=True)
class Step:
    """Messages sent in one write, then the answers read: up to the `ready`-th
    ReadyForQuery, or exactly `frames` frames when the step ends in a Flush."""

    messages: tuple[Any, ...]
    ready: int = 1
    frames: int = 0
    # Done (on another connection) before the messages are sent.
    before: Callable[[], object] | None = None


def _direct(gateway: RunningGateway) -> RawClient:
    """Straight to PostgreSQL as the superuser the gateway's target logs in as."""
    return RawClient.direct(gateway.cluster.socket_dir, gateway.cluster.port, SUPERUSER, APP_DB)


def _via(gateway: RunningGateway, token: str) -> RawClient:
    client = RawClient.connect(gateway.host, gateway.port)
    client.login("app", token)
    return client


def _play(client: RawClient, steps: list[Step]) -> list[Frames]:
    answers = []
    for step in steps:
        if step.before is not None:
            step.before()
        client.send(b"".join(m.encode() for m in step.messages))
        if step.frames:
            answers.append([client.frame() for _ in range(step.frames)])
            continue
        got: Frames = []
        for _ in range(step.ready):
            got += client.until_ready()
        answers.append(got)
    return answers


def _activity(gateway: RunningGateway, client: RawClient) -> tuple[str, str]:
    assert client.key is not None
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT state, query FROM pg_stat_activity WHERE pid = %s", (client.key.process_id,)
        ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


@pytest.fixture
def compare(gateway: RunningGateway, admin_token: str) -> Iterator[Compare]:
    opened: list[RawClient] = []

    def run(steps: list[Step]) -> list[Frames]:
        direct, via = _direct(gateway), _via(gateway, admin_token)
        opened.extend((direct, via))
        want = _play(direct, steps)
        got = _play(via, steps)
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            assert [(chr(c), b) for c, b in g] == [(chr(c), b) for c, b in w], f"step {i}"
        assert _activity(gateway, via) == _activity(gateway, direct)
        return got

    yield run
    for client in opened:
        client.close()


def _rows(frames: Frames) -> list[bytes]:
    return [body for code, body in frames if code == ord("D")]


def test_unnamed_statement_survives_a_read_at_idle(compare: Compare) -> None:
    """asyncpg: Parse "" of the user's query, introspection calling set_config(), then
    Bind "" — the read (made for the Parse of "t", between Syncs) left "" alone."""
    got = compare(
        [
            Step((Parse("", b"SELECT 41 + 1"), Describe("S", ""), Sync())),
            Step((Parse("intro", MOVE), Bind("", "intro"), Execute(""), Sync())),
            Step((Parse("t", b"SELECT 2"), Sync())),
            Step((Bind("", ""), Execute(""), Sync())),
        ]
    )
    assert codes(got[3]) == "2DCZ" and _rows(got[3]) == [b"\x00\x01\x00\x00\x00\x0242"]


def test_unnamed_statement_survives_a_read_inside_the_pipeline(compare: Compare) -> None:
    """The same with no Sync before Bind "": the read is made for its Execute, inside the
    pipeline (the unnamed portal is open across it)."""
    got = compare(
        [
            Step((Parse("", b"SELECT 41 + 1"), Sync())),
            Step((Parse("intro", MOVE), Bind("", "intro"), Execute(""), Sync())),
            Step((Bind("", ""), Execute(""), Sync())),
        ]
    )
    assert codes(got[2]) == "2DCZ"


def test_unnamed_portal_open_across_a_read_inside_a_transaction(compare: Compare) -> None:
    """An unnamed portal, half-fetched, in a transaction block: the read (idle, between
    Syncs) neither closes nor advances it, and the transaction stays as it was."""
    got = compare(
        [
            Step((Query(b"BEGIN"),)),
            Step(
                (
                    Parse("", b"SELECT g FROM generate_series(1, 3) g"),
                    Bind("", ""),
                    Execute("", 1),
                    Sync(),
                )
            ),
            Step((Parse("m", MOVE), Bind("pm", "m"), Execute("pm"), Close("P", "pm"), Sync())),
            Step((Parse("t", b"SELECT 2"), Bind("pt", "t"), Execute("pt"), Sync())),
            Step((Execute(""), Sync())),
            Step((Query(b"COMMIT"),)),
        ]
    )
    assert codes(got[4]) == "DDCZ" and got[4][-1][1] == b"T"


def test_unnamed_portal_open_across_a_read_inside_the_pipeline(compare: Compare) -> None:
    """No Sync at all: the portal is bound, the path moves, a Parse needs the path (read
    with a Flush inside the pipeline), then the portal is executed."""
    got = compare(
        [
            Step(
                (
                    Parse("", b"SELECT g FROM generate_series(1, 3) g"),
                    Bind("", ""),
                    Execute("", 1),
                    Parse("m", MOVE),
                    Bind("pm", "m"),
                    Execute("pm"),
                    Parse("t", b"SELECT 2"),
                    Bind("pt", "t"),
                    Execute("pt"),
                    Execute(""),
                    Sync(),
                )
            ),
        ]
    )
    assert codes(got[0]) == "12Ds12DC12DCDDCZ"


def test_a_read_inside_the_implicit_transaction_does_not_commit_it(compare: Compare) -> None:
    """The read is made between extended messages and their Sync: a Sync (or a Query) of
    pgwarden's would commit the INSERT before the pipeline's error undoes it."""
    got = compare(
        [
            Step((Query(b"CREATE TEMP TABLE sp_t (x int)"),)),
            Step(
                (
                    Parse("", b"INSERT INTO sp_t VALUES (1)"),
                    Bind("", ""),
                    Execute(""),
                    Parse("", MOVE),
                    Bind("", ""),
                    Execute(""),
                    Parse("", b"SELECT count(*) FROM sp_t"),
                    Bind("", ""),
                    Execute(""),
                    Parse("", b"SELECT 1/0"),
                    Bind("", ""),
                    Execute(""),
                    Sync(),
                )
            ),
            Step((Query(b"SELECT count(*) FROM sp_t"),)),
        ]
    )
    assert "E" in codes(got[1]) and codes(got[1]).endswith("Z")
    assert _rows(got[2]) == [b"\x00\x01\x00\x00\x00\x010"]


def test_a_read_after_flushed_answers_keeps_the_pipeline_open(compare: Compare) -> None:
    """The client reads its answers after a Flush, then goes on: the read comes in
    between, with a Flush of its own."""
    got = compare(
        [
            Step((Parse("", b"SELECT 41 + 1"), Sync())),
            Step((Parse("m", MOVE), Bind("pm", "m"), Execute("pm"), Flush()), frames=4),
            Step((Parse("t", b"SELECT 2"), Bind("", ""), Execute(""), Flush()), frames=4),
            Step((Bind("", ""), Execute(""), Sync())),
        ]
    )
    assert codes(got[2]) == "12DC" and codes(got[3]) == "2DCZ"


def test_no_read_in_an_aborted_transaction(compare: Compare) -> None:
    """Aborted: the server answers the statement with its own 25P02 (a read would fail and
    start a skip to Sync the client never asked for); after ROLLBACK the unnamed statement
    parsed before is still there."""

    def run(name: str, sql: bytes) -> Step:
        return Step((Parse(name, sql), Bind(name, name), Execute(name), Close("P", name), Sync()))

    got = compare(
        [
            Step((Query(b"BEGIN"),)),
            Step((Parse("", b"SELECT 41 + 1"), Sync())),
            run("m", MOVE),
            run("z", b"SELECT 1/0"),
            Step((Parse("t", b"SELECT 2"), Bind("", "t"), Execute(""), Sync())),
            run("u", b"SELECT 3"),
            run("r", b"ROLLBACK"),
            Step((Bind("", ""), Execute(""), Sync())),
        ]
    )
    assert codes(got[4]) == "EZ" and got[4][-1][1] == b"E"
    assert codes(got[7]) == "2DCZ"


def test_no_read_while_the_server_skips_to_sync(compare: Compare) -> None:
    """An error, no Sync yet: the server skips what follows, so no read is made (it would
    never be answered); the client's Sync then ends the skip as direct."""
    got = compare(
        [
            Step((Parse("", b"SELECT 41 + 1"), Sync())),
            Step(
                (
                    Parse("m", MOVE),
                    Bind("pm", "m"),
                    Execute("pm"),
                    Bind("x", "no_such_statement"),
                    Parse("t", b"SELECT 2"),
                    Bind("", "t"),
                    Execute(""),
                    Flush(),
                ),
                frames=5,
            ),
            Step((Parse("u", b"SELECT 3"), Sync())),
            Step((Bind("", ""), Execute(""), Sync())),
        ]
    )
    assert codes(got[1]).endswith("E") and codes(got[2]) == "Z"
    assert codes(got[3]) == "2DCZ"


async def test_asyncpg_type_introspection_keeps_the_unnamed_statement(
    gateway: RunningGateway, admin_token: str
) -> None:
    """asyncpg without a statement cache parses the query unnamed, then introspects its
    result type (set_config('jit', ...) first) and binds the unnamed statement."""
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as conn:
        conn.execute("DROP TYPE IF EXISTS sp_mood")
        conn.execute("CREATE TYPE sp_mood AS ENUM ('calm', 'busy')")
    try:
        conn = await asyncpg.connect(gateway.url(admin_token), statement_cache_size=0, timeout=10)
        try:
            for _ in range(2):
                assert await conn.fetchval("SELECT 'busy'::sp_mood") == "busy"
        finally:
            await conn.close()
    finally:
        with psycopg.connect(gateway.direct_dsn(), autocommit=True) as conn:
            conn.execute("DROP TYPE sp_mood")


def test_a_read_that_fails_fails_the_statement_that_waited_for_it(
    gateway: RunningGateway, admin_token: str
) -> None:
    """The client holds a statement of pgwarden's read's name, so the read fails. Inside a
    pipeline the server then skips to the client's Sync: the statement that waited gets the
    error, as if it had failed itself; idle, it is refused. The session goes on."""
    client = _via(gateway, admin_token)
    try:
        answers = _play(
            client,
            [
                Step((Parse(READ_NAME, b"SELECT 1"), Sync())),
                Step(
                    (
                        Parse("m", MOVE),
                        Bind("pm", "m"),
                        Execute("pm"),
                        Parse("t", b"SELECT 2"),
                        Bind("", "t"),
                        Execute(""),
                        Sync(),
                    )
                ),
                Step((Query(b"SELECT 3"),)),
                Step((Close("S", READ_NAME), Sync())),
                Step((Query(b"SELECT 4"),)),
                # A Query after extended messages: it gets its error and its ReadyForQuery.
                Step((Parse(READ_NAME, b"SELECT 1"), Sync())),
                Step((Parse("m2", MOVE), Bind("pm2", "m2"), Execute("pm2"), Query(b"SELECT 5"))),
                Step((Close("S", READ_NAME), Sync())),
                Step((Query(b"SELECT 6"),)),
            ],
        )
    finally:
        client.close()
    pipeline, idle = answers[1], answers[2]
    assert codes(pipeline) == "12DCEZ" and pipeline[-1][1] == b"I"
    # In the pipeline, the server's reason; idle, pgwarden's refusal of the statement.
    for frames, sqlstate in ((pipeline, "42P05"), (idle, "42501")):
        error = next(ErrorResponse.decode(b) for c, b in frames if c == ord("E"))
        assert error.sqlstate == sqlstate, error
        assert "search_path could not be read" in (error.message or ""), error
    assert codes(idle) == "EZ"
    assert _rows(answers[4]) == [b"\x00\x01\x00\x00\x00\x014"]
    assert codes(answers[6]) == "12DCEZ", answers[6]
    assert _rows(answers[8]) == [b"\x00\x01\x00\x00\x00\x016"]


def test_the_read_takes_no_snapshot(gateway: RunningGateway, compare: Compare) -> None:
    """REPEATABLE READ: the transaction's snapshot is taken by its first statement that
    needs one. The read (SHOW, a utility statement) must not be it: a row committed
    elsewhere after the read and before the client's SELECT is seen, as direct."""
    direct(gateway, "DROP TABLE IF EXISTS sp_rr")
    direct(gateway, "CREATE TABLE sp_rr (x int)")

    def commit_elsewhere() -> None:
        direct(gateway, "INSERT INTO sp_rr VALUES (1)")

    try:
        got = compare(
            [
                Step(
                    (Query(b"BEGIN ISOLATION LEVEL REPEATABLE READ"),),
                    before=lambda: direct(gateway, "TRUNCATE sp_rr"),
                ),
                Step((Query(b"SET search_path = public"),)),
                # Needs the path, so the read comes before it; takes no snapshot itself.
                Step((Query(b"SET LOCAL application_name = 'rr'"),)),
                Step(
                    (Parse("", b"SELECT count(*) FROM sp_rr"), Bind("", ""), Execute(""), Sync()),
                    before=commit_elsewhere,
                ),
                Step((Query(b"COMMIT"),)),
            ]
        )
    finally:
        direct(gateway, "DROP TABLE sp_rr")
    assert codes(got[3]) == "12DCZ" and _rows(got[3]) == [b"\x00\x01\x00\x00\x00\x011"]
