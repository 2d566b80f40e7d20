"""Cost estimates in the policy input: which statements may be explained, and what of the
server's plan goes into `statement.estimate`.

Only a simple-protocol Query holding one plain SELECT is explained: `EXPLAIN (FORMAT JSON,
VERBOSE)`, never ANALYZE, so nothing runs; no data-modifying CTE, no function pgwarden
cannot see into (planning may run an immutable function), no locking clause. The session
explains it only between transactions with nothing else in flight (EXPLAIN takes a snapshot:
inside a REPEATABLE READ block it would fix the client's), and the estimate is kept per
statement shape (the pglast fingerprint, literal values left out), so a statement is
never explained twice; the cache is per statement text, not per shape, since
the literals decide the estimate.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from gateway.proxy.search_path import first_column
from gateway.sql.facts import StatementFacts

EXPLAIN = "EXPLAIN (FORMAT JSON, VERBOSE) "
_NOT_EXPLAINED = frozenset(
    {"opaque_function", "dml_in_cte", "procedural", "multi_statement", "row_lock", "select_into"}
)


def explainable(facts: StatementFacts) -> bool:
    return (
        facts.command == "SELECT"
        and facts.category == "read"
        and not _NOT_EXPLAINED.intersection(facts.flags)
        and all(f.startswith("pg_catalog.") for f in facts.functions)
    )


def estimate_of(plan_json: str, seq_scan_rows: int) -> dict[str, Any] | None:
    """`statement.estimate` from EXPLAIN's JSON: total_cost, plan_rows, the scanned
    relations with the rows each scan is estimated to return, and whether a sequential scan
    is estimated to return more than `seq_scan_rows` rows. None: not a plan it can read."""
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
    return {
        "total_cost": top.get("Total Cost", 0.0),
        "plan_rows": top.get("Plan Rows", 0),
        "relations": sorted(relations, key=lambda r: (r["schema"], r["table"], r["rows"])),
        "seq_scan_over_threshold": seq_over,
    }


# Answers to pgwarden's own EXPLAIN (RowDescription, DataRow, CommandComplete, ErrorResponse,
# ReadyForQuery); notices and parameter status are the client's.
EXPLAIN_ANSWERS = frozenset(b"TDCEZ")


class ExplainRead:
    """One EXPLAIN in flight: `done` resolves to its JSON text (None: it failed)."""

    __slots__ = ("_failed", "_plan", "done", "encoding")

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self.done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._plan: str | None = None
        self._failed = False

    def answer(self, code: int, frame: bytes | bytearray) -> bool:
        """Consume one answer frame; True once the read is over (its ReadyForQuery)."""
        if code == 68:
            self._plan = first_column(bytes(frame[5:]), self.encoding)
        elif code == 69:
            self._failed = True
        elif code == 90:
            if not self.done.done():
                self.done.set_result(None if self._failed else self._plan)
            return True
        return False
