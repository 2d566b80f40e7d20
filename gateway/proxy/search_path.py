"""Whether pgwarden knows the search_path the server resolves the session's names with.

Masks, oracles and opaque functions are found by resolving a statement's names in the
target's catalog under the session's search_path. If pgwarden's idea of that path differs
from the server's, `SELECT email FROM customers` is judged as one table and runs as another.
The server's path moves in ways pgwarden cannot follow exactly: SET LOCAL reverting at the
end of a transaction, a ROLLBACK undoing a SET, set_config(), RESET to a default set by
ALTER ROLE, a user function changing it. So after any of them the path is *uncertain*, and
the session learns it again from the server (`SHOW search_path`, sent when nothing else is
outstanding) before it resolves another statement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from gateway.protocol import Query
from gateway.sql.facts import StatementFacts

SHOW_SEARCH_PATH = Query(b"SHOW search_path").encode()
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
        self.problem: str | None = None
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
        """ReadyForQuery: a transaction that moved the path has ended (or was never opened)."""
        if status == "I" and self._touched:
            self._touched = False
            self.mark()

    def mark(self) -> None:
        self.uncertain = True
        self.problem = None
        self.epoch += 1

    def learned(self) -> None:
        self.uncertain = False
        self.problem = None
        self._wake()

    def unknown(self, why: str) -> None:
        """The server would not say (an aborted transaction): statements that need the path
        are refused until it can be learned again."""
        self.problem = why
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
