"""Whether pgwarden knows the search_path the server resolves the session's names with, and
how it asks the server without the client noticing.

Masks, oracles and opaque functions are found by resolving a statement's names in the
target's catalog under the session's search_path. If pgwarden's idea of that path differs
from the server's, `SELECT email FROM customers` is judged as one table and runs as another.
The server's path moves in ways pgwarden cannot follow exactly: SET LOCAL reverting at the
end of a transaction, a ROLLBACK undoing a SET, set_config(), RESET to a default set by
ALTER ROLE, a user function changing it. So after any of them the path is *uncertain*, and
the session reads it again from the server before it resolves another statement.

The read shares the client's server session, so it must leave nothing there the client can
observe: not the unnamed statement or portal (a simple Query drops both: asyncpg's
`Parse ""`, type introspection calling set_config(), then `Bind ""` failed with 26000),
not the transaction (a Query or FunctionCall commits the implicit transaction of extended
messages not yet synced; a Sync ends it and clears the error state), not the snapshot of a
REPEATABLE READ transaction, and as little of pg_stat_activity as can be. Hence:

* It is lazy: made only when a statement that needs the path is about to be forwarded, and
  placed immediately before that statement, so the statement itself then replaces the
  text pg_stat_activity.query shows.
* It waits until every message forwarded so far has been answered (the session sends a
  Flush of its own if nothing else would make the server answer). Only then does pgwarden
  know the state the read will meet:
    - the server skips to Sync (an error, no Sync since): nothing is sent; the waiting
      statement will be skipped too, so its judgement does not matter;
    - an aborted transaction block (ReadyForQuery "E", nothing since that ended it):
      nothing is sent, since the read would fail and start a skip to Sync the client never
      asked for; the statement is answered by the server's own 25P02, as direct;
    - idle after ReadyForQuery ("I" or "T"), no extended message since:
      Parse/Bind/Execute/Close/Close of pgwarden's own statement and portal, then Sync;
    - inside the client's extended pipeline (messages since the last ReadyForQuery, no
      error): the same messages then Flush, never a Sync.
* It is `SHOW search_path`, a utility statement: no snapshot is taken, so the first
  statement of a REPEATABLE READ transaction is still the client's.
* Its answers (ParseComplete, BindComplete, DataRow, CommandComplete, two CloseComplete,
  and ReadyForQuery after a Sync) are consumed; notices and notifications pass through.
* If it fails: idle, the waiting statement is refused (inside a transaction block the
  server has then failed the transaction, as it would for the statement itself); inside a
  pipeline, the server now skips to the client's Sync, so the waiting statement gets the
  error and everything up to that Sync is skipped, as after an error of its own (a Query
  or FunctionCall, which the client expects a ReadyForQuery for, gets it from a Sync of
  pgwarden's that ends the skip).
* A portal runs the plan made at its Bind: if the path was known then and equal to the one
  its statement was decided under, its Execute needs no read, wherever the path has gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.protocol import Bind, Close, ErrorResponse, Execute, Flush, Parse, Query, Sync
from gateway.protocol.codes import (
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    COMMAND_COMPLETE,
    DATA_ROW,
    ERROR_RESPONSE,
    PARSE_COMPLETE,
    READY_FOR_QUERY,
)
from gateway.sql.facts import StatementFacts

# The read made at login, before the client has sent anything (nothing to disturb yet).
SHOW_SEARCH_PATH = Query(b"SHOW search_path").encode()
# pgwarden's own statement and portal name (each in its own namespace); closed after use.
READ_NAME = "pgwarden:search_path"


def _show(setting: str) -> bytes:
    return (
        Parse(READ_NAME, f"SHOW {setting}".encode()).encode()
        + Bind(READ_NAME, READ_NAME).encode()
        + Execute(READ_NAME).encode()
        + Close("P", READ_NAME).encode()
        + Close("S", READ_NAME).encode()
    )


_READ = _show("search_path")
READ_IDLE = _READ + Sync().encode()
READ_IN_PIPELINE = _READ + Flush().encode()
# Makes the server answer what was forwarded without ending the client's pipeline.
FLUSH = Flush().encode()
# Server messages that answer the read; anything else (notices, notifications, parameter
# status) is the client's.
READ_ANSWERS = frozenset(
    {
        PARSE_COMPLETE,
        BIND_COMPLETE,
        CLOSE_COMPLETE,
        DATA_ROW,
        COMMAND_COMPLETE,
        ERROR_RESPONSE,
        READY_FOR_QUERY,
    }
)
# Transaction control that starts nothing: what it ends or rewinds may take a SET with it.
_OPENING = frozenset({"BEGIN", "START TRANSACTION", "SAVEPOINT"})


def sets_search_path(facts: StatementFacts) -> bool:
    """A statement whose own effect on search_path pgwarden does not compute: SET/RESET of
    it, RESET ALL, DISCARD, set_config() of any name."""
    setting = facts.setting
    if setting is not None and setting[0].lower() == "search_path":
        return True
    if facts.command in ("RESET ALL", "DISCARD"):
        return True
    return any(f.rsplit(".", 1)[-1] == "set_config" for f in facts.functions)


def may_move_search_path(facts: StatementFacts) -> bool:
    """sets_search_path, or code pgwarden cannot see into (it may call set_config)."""
    return (
        sets_search_path(facts)
        or facts.command in ("CALL", "DO")
        or "procedural" in facts.flags
        or "opaque_function" in facts.flags
    )


@dataclass(frozen=True, slots=True)
class PathProblem:
    """Why the search_path cannot be known for the statement waiting on it."""

    reason: str
    # The server's transaction is aborted: it rejects the statement itself (25P02), unless
    # the statement ends the transaction.
    aborted: bool = False
    # The server skips to the client's Sync: the statement will not run, and is not judged.
    skipped: bool = False


class PathRead:
    """One read in flight: consumes its answers (`answer` says when the read is over).

    `also` names settings read in the same request after search_path, each by its own
    SHOW (the settings a session's guards enforce: code that may move the path may have
    changed them too); their values are in `settings`."""

    __slots__ = ("_closes", "_values", "also", "error", "in_pipeline", "value")

    def __init__(self, *, in_pipeline: bool, also: tuple[str, ...] = ()) -> None:
        self.in_pipeline = in_pipeline
        self.also = also
        self.value: str | None = None
        self.error: ErrorResponse | None = None
        self._closes = 0
        self._values: list[str | None] = []

    @property
    def request(self) -> bytes:
        if not self.also:
            return READ_IN_PIPELINE if self.in_pipeline else READ_IDLE
        shows = _READ + b"".join(_show(name) for name in self.also)
        return shows + (Flush() if self.in_pipeline else Sync()).encode()

    @property
    def settings(self) -> dict[str, str | None]:
        """The `also` settings as the server showed them (None: not read)."""
        values = self._values[1:]
        return {name: values[i] if i < len(values) else None for i, name in enumerate(self.also)}

    def answer(self, code: int, body: bytes, encoding: str) -> bool:
        if code == DATA_ROW:  # one column, the path (then each `also` setting)
            self._values.append(first_column(body, encoding))
            self.value = self._values[0]
        elif code == ERROR_RESPONSE:  # after a Sync its ReadyForQuery still comes
            self.error = ErrorResponse.decode(body)
            return self.in_pipeline
        elif code == CLOSE_COMPLETE:  # the last one ends a read in a pipeline
            self._closes += 1
            return self.in_pipeline and self._closes == 2 * (1 + len(self.also))
        elif code == READY_FOR_QUERY:
            return True
        return False


def first_column(data_row: bytes, encoding: str) -> str | None:
    """The first value of a DataRow body, as text."""
    if len(data_row) < 6:
        return None
    length = int.from_bytes(data_row[2:6], "big", signed=True)
    if length < 0:
        return None
    return data_row[6 : 6 + length].decode(encoding, "replace")


class SearchPathWatch:
    """The session's search_path is certain or not; `wait_settled()` returns once it is
    certain (or could not be learned: `problem` says why)."""

    # One per session, most of them idle: no Event until somebody waits.
    __slots__ = ("_touched", "_waiters", "epoch", "problem", "uncertain")

    def __init__(self) -> None:
        self.uncertain = False
        # A statement that may move the path ran in the current transaction: its end (or a
        # ROLLBACK TO SAVEPOINT) may move it again.
        self._touched = False
        self.problem: PathProblem | None = None
        self._waiters: list[asyncio.Future[None]] = []
        # Counts the times the path may have moved: equal counts, the same path.
        self.epoch = 0

    def forwarded(self, statements: Iterable[StatementFacts]) -> None:
        for facts in statements:
            rewinds = facts.category == "tcl" and facts.command not in _OPENING
            if may_move_search_path(facts) or (self._touched and rewinds):
                self._touched = True
                self.mark()

    def forwarded_opaque(self) -> None:
        """A call pgwarden cannot see into (the FunctionCall message)."""
        self._touched = True
        self.mark()

    def ready(self, status: str) -> None:
        """ReadyForQuery: a transaction that moved the path has ended (or was never opened).
        The server's state has changed, so a path that could not be read may be now."""
        if status == "I" and self._touched:
            self._touched = False
            self.mark()
        self.retry()

    def mark(self) -> None:
        self.uncertain = True
        self.problem = None
        self.epoch += 1

    def retry(self) -> None:
        """The server's state moved on (a ReadyForQuery, a transaction ended): a read that
        could not be made may be made now."""
        self.problem = None

    def learned(self) -> None:
        self.uncertain = False
        self.problem = None
        self._wake()

    def unknown(self, problem: PathProblem) -> None:
        """The path cannot be learned now: statements that need it are refused until the
        server's state moves on (`retry`)."""
        self.problem = problem
        self._wake()

    async def wait_settled(self) -> None:
        if not self.uncertain or self.problem is not None:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
