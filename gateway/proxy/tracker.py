"""Which server responses the session is waiting for, so each reply can be tied to the
statement that caused it (for outcomes, refusals and cancel)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.guards.budgets import RowBudget
from gateway.sql.facts import StatementFacts

Kind = Literal[
    "copy_end",
    "query",
    "parse",
    "bind",
    "describe_statement",
    "describe_portal",
    "execute",
    "close",
    "sync",
    "function",
]


@dataclass(slots=True)
class StatementRun:
    """One statement the server will run (or skip): what the outcome record is built from."""

    request_id: str | None
    facts: StatementFacts | None
    started: float = field(default_factory=time.perf_counter)
    rows: int = 0
    bytes_out: int = 0
    command_tag: str | None = None
    sqlstate: str | None = None
    error_message: str | None = None
    done: bool = False
    record_rows: bool = False
    recorded: list[tuple[str | None, ...]] = field(default_factory=list)
    recorded_columns: tuple[str, ...] = ()
    recorded_bytes: int = 0
    # Masks the policy asked for on this statement: (table oid, attnum) → method, resolved
    # before the statement is forwarded; mask_all when they could not be resolved.
    masked: bool = False
    mask_targets: dict[tuple[int, int], str] = field(default_factory=dict)
    mask_all: bool = False
    # Whether expression columns (no base column) are masked too: lineage unknown.
    mask_expressions: bool = False
    # Per output entry, the mask the parser's lineage says it needs (None: not traced).
    lineage: tuple[tuple[str | None, bool], ...] | None = None
    # A DECLARE: the cursor's name and its rows' lineage, kept once the server confirms it.
    declares: tuple[str, tuple[tuple[str | None, bool], ...] | None] | None = None
    # The masks by name, and the catalog generation mask_targets were resolved under: a
    # result whose columns the catalog has not seen in that generation resolves them again.
    masks: tuple[Any, ...] = ()
    mask_generation: str | None = None
    # OIDs of the relations the statement names (None: unknown, or a FETCH naming none):
    # a column from another comes from a description older than the statement's catalog.
    mask_relations: frozenset[int] | None = None
    # Their columns when the statement was decided: one the server reports beyond these
    # appeared since (DDL while it waited), unseen by the policy.
    mask_columns: frozenset[tuple[int, int]] | None = None
    # The RowDescription of a Query's result, planned at its first row.
    description: bytes | None = None
    # The masks kept with its prepared statement (gate.KeptMasks) when they came from
    # there: their DataRow plans are built once per result description.
    kept_masks: Any = None
    # The plan for the result set being relayed (built from RowDescription); `described`
    # tells a plan of None (nothing to mask) from no description seen yet.
    plan: Any = None
    described: bool = False
    # For an Execute: the portal it runs (its RowDescription, or its statement's, comes from
    # an earlier Describe) and the result formats its Bind chose.
    source: Any = None
    result_formats: tuple[int, ...] = ()
    # The decision's row/byte budget and statement timeout (gateway/guards/budgets.py).
    budget: RowBudget | None = None
    timeout_ms: int | None = None


@dataclass(slots=True)
class Expectation:
    kind: Kind
    # Statement runs this message accounts for: one per statement of a Query, one for an Execute.
    runs: list[StatementRun] = field(default_factory=list)
    # The next run of `runs` the server will report on.
    cursor: int = 0
    # When pgwarden replaced the message with one the server must reject: the error to show.
    refusal: bytes | None = None
    # The server's own error with this SQLSTATE is shown in place of `refusal`: it rejected
    # the stand-in as it would have the statement (25P02 in an aborted transaction).
    own_error: str | None = None
    # describe_statement: ParameterDescription seen, RowDescription/NoData still to come.
    saw_parameters: bool = False
    # close: ("S"|"P", name) to forget once the server confirms it.
    closing: tuple[str, str] | None = None
    # parse: the name and what pgwarden knew of it before, restored if the server rejects it.
    restore: tuple[str, Any] | None = None
    # describe: the statement or portal described (pgwarden's own record of it). A
    # description that arrives after the name was parsed or bound again is not kept: it
    # would plan the masks of another statement's rows.
    described: Any = None

    def current_run(self) -> StatementRun | None:
        if self.cursor < len(self.runs):
            return self.runs[self.cursor]
        return None


# Extended-protocol messages: after them the server is inside a pipeline until a Sync (its
# implicit transaction open, or skipping to Sync after an error).
_EXTENDED = frozenset(
    {"parse", "bind", "describe_statement", "describe_portal", "execute", "close"}
)
# Of those, the ones that leave something in the pipeline's implicit transaction (a portal,
# what ran) that a Sync other than the client's would end.
_RUNS = frozenset({"bind", "execute"})
# Messages that run a statement upstream: what a cancel stops.
_CANCELLABLE = frozenset({"query", "execute", "function"})


class ResponseTracker:
    """A queue of expectations in the order messages were forwarded upstream.

    A list read from `_head` rather than a deque: an idle session's queue is empty, and an
    empty list holds no storage (a deque keeps a 64-slot block, ~700 bytes per session).
    The list is emptied whenever its last expectation is taken, so `_head` stays small
    except in a long pipeline, where it is compacted once it is both large and most of it.
    """

    __slots__ = ("_copy_ends", "_head", "_queue", "added", "ran_unsynced", "unsynced")

    def __init__(self) -> None:
        self._queue: list[Expectation] = []
        self._head = 0
        # How many "copy_end" expectations are queued: none (nearly always), and front() and
        # pop() have no stray one to drop.
        self._copy_ends = 0
        # How many expectations were ever queued (the session counts what it has sent).
        self.added = 0
        # An extended-protocol message was queued and no ReadyForQuery has come after it.
        self.unsynced = False
        # Of those, a Bind or an Execute: the pipeline's implicit transaction holds a portal
        # or what ran, which a Sync other than the client's would end under it.
        self.ran_unsynced = False

    def __bool__(self) -> bool:
        return self._head < len(self._queue)

    def __len__(self) -> int:
        return len(self._queue) - self._head

    def _live(self) -> list[Expectation]:
        return self._queue[self._head :] if self._head else self._queue

    def expect(self, expectation: Expectation) -> None:
        self._queue.append(expectation)
        self.added += 1
        kind = expectation.kind
        if kind == "copy_end":
            self._copy_ends += 1
        elif kind in _EXTENDED:
            self.unsynced = True
            if kind in _RUNS:
                self.ran_unsynced = True

    def executes_unsynced(self) -> int:
        """Executes queued since the last Sync or Query: the pipeline's implicit transaction."""
        n = 0
        for e in reversed(self._live()):
            if e.kind in ("sync", "query"):
                break
            n += e.kind == "execute"
        return n

    def ready(self) -> None:
        """A ReadyForQuery was consumed: only extended messages still queued leave a pipeline
        open."""
        live = self._live()
        self.unsynced = any(e.kind in _EXTENDED for e in live)
        self.ran_unsynced = any(e.kind in _RUNS for e in live)

    def front(self) -> Expectation | None:
        if self._copy_ends:
            self._drop_stray_copy_ends()
        return self._queue[self._head] if self._head < len(self._queue) else None

    def pop(self) -> Expectation | None:
        if self._copy_ends:
            self._drop_stray_copy_ends()
        return self._take() if self._head < len(self._queue) else None

    def _take(self) -> Expectation:
        """The front expectation, removed (the queue is not empty)."""
        queue, head = self._queue, self._head
        taken = queue[head]
        if taken.kind == "copy_end":
            self._copy_ends -= 1
        head += 1
        if head == len(queue):
            queue.clear()
            head = 0
        elif head >= 1024 and 2 * head >= len(queue):
            del queue[:head]
            head = 0
        self._head = head
        return taken

    def _drop_stray_copy_ends(self) -> None:
        # CopyDone/CopyFail outside COPY are ignored by the server: nothing answers them.
        queue = self._queue
        while self._head < len(queue) and queue[self._head].kind == "copy_end":
            self._take()

    def copy_in_started(self) -> bool:
        """The front statement entered COPY IN: the server ignores Syncs until CopyDone or
        CopyFail, so their expectations go. True when the client already ended the copy."""
        live = self._live()
        if len(live) <= 1:
            return False
        kept = [live[0]]
        ended = False
        for i, e in enumerate(live[1:], start=1):
            if e.kind == "copy_end":
                kept.extend(live[i + 1 :])
                ended = True
                break
            if e.kind != "sync":
                kept.append(e)
        self._queue, self._head = kept, 0
        self._copy_ends = sum(e.kind == "copy_end" for e in kept)
        return ended

    def pending(self) -> tuple[Expectation, ...]:
        return tuple(self._live())

    def running(self) -> bool:
        """Whether a statement is executing upstream (a cancel may be forwarded)."""
        return self.running_one() is not None

    def running_one(self) -> Expectation | None:
        """The first expectation of a statement executing upstream (what a cancel stops)."""
        return next((e for e in self._live() if e.kind in _CANCELLABLE), None)

    def holds(self, expectation: Expectation) -> bool:
        """Whether this very expectation is still queued (not answered yet)."""
        return any(e is expectation for e in self._live())

    def skip_to_sync(self) -> list[Expectation]:
        """After an extended-protocol error the server discards messages until Sync."""
        skipped: list[Expectation] = []
        queue = self._queue
        while self._head < len(queue) and queue[self._head].kind != "sync":
            skipped.append(self._take())
        return skipped

    def clear(self) -> list[Expectation]:
        items = list(self._live())
        self._queue.clear()
        self._head = 0
        self._copy_ends = 0
        return items
