"""Cost estimates in the policy input: which statements may be explained, how pgwarden asks
the server for a plan without the client noticing, and what of the plan goes into
`statement.estimate`.

Explained: each plain SELECT, VALUES or DECLARE CURSOR, alone or in a Query of several
(`EXPLAIN (FORMAT JSON, VERBOSE)`, never ANALYZE, so nothing runs); no data-modifying CTE,
no function pgwarden cannot see into ("opaque_function": planning may run an immutable
function; one pgwarden sees into, a built-in or a SQL function whose body it read, only
reads), no locking
clause. A SQL PREPARE runs nothing: its query's generic plan is explained when it is
prepared and kept for its runs by protocol Bind/Execute; a SQL EXECUTE is explained with
its own values.

A statement with `$n` placeholders (a Parse) is explained as its generic plan, the one plan
that holds for every value: PostgreSQL 15 has no `EXPLAIN (GENERIC_PLAN)`, so it is
prepared under a name of pgwarden's, explained as `EXECUTE name(NULL, ...)` with
`plan_cache_mode = force_generic_plan` set for that transaction alone, then closed. A
custom plan would fold the NULLs (`g <> NULL` is false: 0 rows) and let a huge read pass
as small. The same sequence runs on every server version, so the one path tested here is
the one that runs everywhere.

Inside the client's transaction block the request runs inside a savepoint that is rolled
back (undoing the plan_cache_mode setting and any error) and released, so an error cannot
abort the client's transaction. EXPLAIN takes the transaction snapshot: in a REPEATABLE
READ or SERIALIZABLE block whose first statement is the one explained, the snapshot is
taken at the estimate rather than when the statement starts, which is a moment earlier
(the decision and the audit record in between; a statement held for approval reads the
database as it was when it was asked for). No other statement of the client runs in
between, so the client cannot tell this from a statement that started a moment earlier. In
a failed transaction nothing is explained: the server rejects the statement anyway.
"""

from __future__ import annotations

import asyncio
import uuid
from enum import Enum
from typing import Any

import orjson
from pglast import parse_sql
from pglast.parser import scan

from gateway.protocol import Bind, Close, ErrorResponse, Execute, Parse, Sync
from gateway.protocol.codes import (
    DATA_ROW,
    ERROR_RESPONSE,
    NOTIFICATION_RESPONSE,
    PARAMETER_STATUS,
    READY_FOR_QUERY,
)
from gateway.proxy.search_path import first_column
from gateway.sql.analyzer import COMMENT_TOKENS
from gateway.sql.facts import StatementFacts

EXPLAIN = "EXPLAIN (FORMAT JSON, VERBOSE) "
_EXPLAINED_COMMANDS = frozenset({"SELECT", "VALUES", "DECLARE"})
_NOT_EXPLAINED = frozenset(
    {
        "opaque_function",
        "dml_in_cte",
        "procedural",
        "row_lock",
        "select_into",
    }
)
# The savepoint the request runs in inside a client's block: a client savepoint of the same
# name is not touched, since ROLLBACK TO and RELEASE take the newest of a name.
_SAVEPOINT = "pgwarden_estimate"


def explainable(facts: StatementFacts) -> bool:
    return (
        facts.command in _EXPLAINED_COMMANDS
        and facts.category == "read"
        and not _NOT_EXPLAINED.intersection(facts.flags)
    )


class NotExplained(Enum):
    """Why a statement has no plan: the decision must not take any of these as "small"."""

    # Something of the client's is in flight (a pipeline, COPY): the answers would mix.
    BUSY = "busy"
    # The server could not plan it now (a lock or statement timeout, a cancel, resources):
    # running it might well succeed.
    FAILED = "failed"
    # The server cannot plan the statement at all (its syntax, a missing relation or
    # function, a type it cannot infer, a constant it cannot compute): planned again to run,
    # it fails the same way.
    REJECTED = "rejected"
    # The client's transaction is failed: the server rejects the statement, whatever it is.
    FAILED_TRANSACTION = "failed_transaction"


# What the policy sees for a statement the server rejects without running it: no plan, and
# why, so that the policy's "no estimate" rule lets the server give the client its own
# error (25P02 in a failed transaction; 42P01 for a missing table: an agent's typo is
# answered by the server, not held for a human).
IN_FAILED_TRANSACTION = {"not_run": "the transaction is failed: the server rejects the statement"}
UNPLANNABLE = {"not_run": "the server cannot plan the statement: it rejects it"}
# SQLSTATE classes of a planning error that running the statement meets again: data
# exception, feature not supported, syntax error or access rule violation.
_DETERMINISTIC = ("22", "0A", "42")


def sql_prepared(text: str) -> tuple[int, int] | None:
    """For a SQL `PREPARE name [(types)] AS query`, comments before it or not: where its
    name is in the text (start, end) so that the request can prepare the same under
    pgwarden's own name; None for any other text."""
    tokens = [t for t in scan(text) if t.name not in COMMENT_TOKENS]
    if len(tokens) < 2 or tokens[0].name != "PREPARE":
        return None
    # The scanner's offsets are characters, `end` inclusive.
    return tokens[1].start, tokens[1].end + 1


def _declared_types(text: str) -> int:
    stmt = parse_sql(text)[0].stmt
    return len(getattr(stmt, "argtypes", None) or ())


def parameter_count(text: str, declared: int) -> int:
    """How many parameters the server gives a Parse of `text` that declared `declared`
    types: the highest `$n` it uses, or more if more types were declared."""
    highest = declared
    for token in scan(text):
        if token.name == "PARAM":  # `$n`; the scanner's offsets are characters
            highest = max(highest, int(text[token.start + 1 : token.end + 1]))
    return highest


def estimate_request(
    text: str, param_types: tuple[int, ...] | None, *, in_block: bool, encoding: str
) -> tuple[bytes, int]:
    """The messages that explain `text` (`param_types`: a Parse's, for its generic plan;
    None: a statement with its literals, or a SQL PREPARE, whose query is explained as its
    generic plan) and how many ReadyForQuery end their answers.

    Two syncs: the first ends the EXPLAIN (an error skips only to it), the second cleans up
    whatever the first left, whether it failed or not. Every statement and portal is named
    by pgwarden and closed, so the client's unnamed ones are untouched."""
    base = f"pgwarden_estimate_{uuid.uuid4().hex}"
    names: list[str] = []
    first: list[bytes] = []
    after: list[bytes] = []

    def run(sql: str, into: list[bytes]) -> None:
        name = f"{base}_{len(names)}"
        names.append(name)
        # A portal per statement: one whose Execute failed is still there until the
        # savepoint is rolled back, and binding its name again would fail that too.
        into += (
            Parse(name, sql.encode(encoding)).encode(),
            Bind(name, name).encode(),
            Execute(name).encode(),
            Close("P", name).encode(),
        )

    if in_block:
        run(f"SAVEPOINT {_SAVEPOINT}", first)
    prepare = sql_prepared(text) if param_types is None else None
    if param_types is None and prepare is None:
        run(EXPLAIN + text, first)
    else:
        generic = f"{base}_generic"
        names.append(generic)
        if prepare is not None:
            # The client's own PREPARE under pgwarden's name: its types, its query.
            start, end = prepare
            run(text[:start] + generic + text[end:], first)
            declared = _declared_types(text)
        else:
            assert param_types is not None
            first.append(Parse(generic, text.encode(encoding), param_types).encode())
            declared = len(param_types)
        # Local to the transaction: the implicit one that ends at the first Sync, or the
        # savepoint that is rolled back inside the client's block.
        run("SELECT set_config('plan_cache_mode', 'force_generic_plan', true)", first)
        nulls = ", ".join(["NULL"] * parameter_count(text, declared))
        run(f"{EXPLAIN}EXECUTE {generic}" + (f"({nulls})" if nulls else ""), first)
    first.append(Sync().encode())
    if in_block:
        run(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}", after)
        run(f"RELEASE SAVEPOINT {_SAVEPOINT}", after)
    after += [Close(kind, name).encode() for name in names for kind in ("P", "S")]
    after.append(Sync().encode())
    return b"".join(first + after), 2


def estimate_of(
    plan_json: str, seq_scan_rows: int, plan_rows: int | None = None
) -> dict[str, Any] | None:
    """`statement.estimate` from EXPLAIN's JSON: total_cost, plan_rows, the scanned
    relations with the rows each scan is estimated to return, whether a sequential scan
    is estimated to return more than `seq_scan_rows` rows, and (where `plan_rows` is given)
    whether the statement is estimated to return more than that. None: not a plan it can
    read."""
    try:
        top = orjson.loads(plan_json)[0]["Plan"]
    except (orjson.JSONDecodeError, LookupError, TypeError):
        return None
    relations: list[dict[str, Any]] = []
    seq_over = False
    nodes = [top]
    while nodes:
        node = nodes.pop()
        if not isinstance(node, dict):
            continue
        rows = node.get("Plan Rows", 0)
        if "Relation Name" in node:
            relations.append(
                {"schema": node.get("Schema", ""), "table": node["Relation Name"], "rows": rows}
            )
            if node.get("Node Type") == "Seq Scan" and rows > seq_scan_rows:
                seq_over = True
        nodes.extend(node.get("Plans") or ())
    estimate = {
        "total_cost": top.get("Total Cost", 0.0),
        "plan_rows": top.get("Plan Rows", 0),
        "relations": sorted(relations, key=lambda r: (r["schema"], r["table"], r["rows"])),
        "seq_scan_over_threshold": seq_over,
    }
    if plan_rows is not None:
        estimate["rows_over_threshold"] = estimate["plan_rows"] > plan_rows
    return estimate


def estimate_key(estimate: dict[str, Any] | None) -> bytes:
    """`statement.estimate` as the policy input carries it, canonical (sorted keys), so
    that two equal keys mean inputs equal in their estimate; b"": the input carries none."""
    return b"" if estimate is None else orjson.dumps(estimate, option=orjson.OPT_SORT_KEYS)


# Server messages that are not answers to anything: they reach the client even while
# pgwarden's own request is answered (NotificationResponse, ParameterStatus).
CLIENTS_WHILE_EXPLAINING = frozenset({NOTIFICATION_RESPONSE, PARAMETER_STATUS})


class ExplainRead:
    """One estimate_request() in flight: `done` resolves to the plan's JSON text, or why
    there is none. Every other answer until its last ReadyForQuery is pgwarden's own
    (notices included: the client sees no trace of the request)."""

    __slots__ = ("_failed", "_plan", "_readies", "_sqlstate", "done", "encoding")

    def __init__(self, encoding: str, readies: int) -> None:
        self.encoding = encoding
        self.done: asyncio.Future[str | NotExplained] = asyncio.get_running_loop().create_future()
        self._plan: str | None = None
        self._failed = False
        self._sqlstate = ""
        self._readies = readies

    def answer(self, code: int, frame: bytes | bytearray) -> bool:
        """Consume one answer frame; True once the read is over (its last ReadyForQuery)."""
        if code == DATA_ROW and not self._failed:
            # The EXPLAIN's row comes last before the first Sync (set_config's is earlier).
            self._plan = first_column(bytes(frame[5:]), self.encoding)
        elif code == ERROR_RESPONSE:
            if not self._failed and self._readies > 1:
                # Before the first Sync: the EXPLAIN did not run (an error in the clean-up
                # leaves the plan read before it standing).
                self._plan = None
                self._sqlstate = ErrorResponse.decode(bytes(frame[5:])).sqlstate or ""
            self._failed = True
        elif code == READY_FOR_QUERY:
            self._readies -= 1
            if self._readies > 0:
                return False
            if not self.done.done():
                self.done.set_result(self._outcome())
            return True
        return False

    def _outcome(self) -> str | NotExplained:
        return self._plan if self._plan is not None else rejection(self._sqlstate)


def rejection(sqlstate: str) -> NotExplained:
    """What an EXPLAIN's error with `sqlstate` says of the statement."""
    return NotExplained.REJECTED if sqlstate.startswith(_DETERMINISTIC) else NotExplained.FAILED
