"""Resolve unqualified relations and `*` columns in facts against the live catalog of one
database of a target."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from gateway.enforce.masking import stronger_method
from gateway.policy.decision import Mask
from gateway.sql.analysis import analyze
from gateway.sql.catalog_connection import CATALOG_FAILURES, CatalogConnection, Connect
from gateway.sql.facts import (
    LINEAGE_OPAQUE_BUILTINS,
    ColumnRef,
    StatementFacts,
    TableRef,
)
from gateway.sql.functions import (
    _FUNCTION_QUERY,
    _MAX_BODY_DEPTH,
    _OPERATOR_QUERY,
    _TRACEABLE_BODY_FLAGS,
    _TYPE_QUERY,
    _UNTRACED_FUNCTION_QUERY,
    _FunctionHolders,
    _UntracedFunction,
    _with_bodies,
)
from gateway.sql.names import (
    _QUERY,
    _RELKINDS,
    DEFAULT_SEARCH_PATH,
    Column,
    _placed_output,
    parse_search_path,
)
from gateway.sql.views import _VIEW_QUERY, _lineages, _ViewLineage

_T = TypeVar("_T")
_K = TypeVar("_K")
_V = TypeVar("_V")

__all__ = ["DEFAULT_SEARCH_PATH", "WATCH_SQL", "Catalog", "consults_catalog", "parse_search_path"]

# Each masked column by name, plus every column of each view that (directly or through
# other views) reads it, plus the same-named column of inheritance children and partitions:
# RowDescription names the view or child, not the base column, so those must match too.
# A view's output columns are not linked to the base columns they use, hence all of them;
# a dependency on the whole table (attnum 0) is a whole-row use such as row_to_json(t).
_MASK_QUERY = """
WITH RECURSIVE wanted(i, schema, tbl, col) AS (
    SELECT w.i::int, w.schema, w.tbl, w.col
    FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS w(schema, tbl, col, i)
),
base(i, relid, attnum) AS (
    SELECT w.i, c.oid, a.attnum
    FROM wanted w
    JOIN pg_catalog.pg_namespace n ON w.schema = '' OR n.nspname = w.schema
    JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = w.tbl
    JOIN pg_catalog.pg_attribute a
      ON a.attrelid = c.oid AND a.attname = w.col AND a.attnum > 0 AND NOT a.attisdropped
),
children(i, relid, attnum) AS (
    SELECT b.i, b.relid, b.attnum FROM base b
    UNION
    SELECT ch.i, inh.inhrelid, a.attnum
    FROM children ch
    JOIN pg_catalog.pg_attribute p ON p.attrelid = ch.relid AND p.attnum = ch.attnum
    JOIN pg_catalog.pg_inherits inh ON inh.inhparent = ch.relid
    JOIN pg_catalog.pg_attribute a
      ON a.attrelid = inh.inhrelid AND a.attname = p.attname AND NOT a.attisdropped
),
views(i, relid) AS (
    SELECT ch.i, r.ev_class
    FROM children ch
    JOIN pg_catalog.pg_depend d
      ON d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid = ch.relid
     AND d.classid = 'pg_catalog.pg_rewrite'::regclass
    JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
    WHERE r.ev_class <> ch.relid
      -- PostgreSQL drops a rule's whole-table dependency when it also depends on some
      -- column of that table, so row_to_json(c) beside c.id leaves no attnum-0 row: a
      -- whole-row Var anywhere in the rule counts as using every column.
      AND (d.refobjsubid IN (ch.attnum, 0) OR r.ev_action::text LIKE '%{VAR %:varattno 0 %')
    UNION
    SELECT v.i, r.ev_class
    FROM views v
    JOIN pg_catalog.pg_depend d
      ON d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid = v.relid
     AND d.classid = 'pg_catalog.pg_rewrite'::regclass
    JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
    WHERE r.ev_class <> v.relid
)
SELECT i, relid::int8, attnum::int4, false FROM children
UNION ALL
SELECT v.i, a.attrelid::int8, a.attnum::int4, true
FROM views v
JOIN pg_catalog.pg_attribute a ON a.attrelid = v.relid AND a.attnum > 0 AND NOT a.attisdropped
"""

# Probes in a row that must find a snapshot generation unmoved before it counts as steady:
# enough that a database written to even a few times a second does not (each write moves it).
STEADY_PROBES = 64

# The SQL an operator runs (as a superuser) to install the DDL watch in a target database.
WATCH_SQL = Path(__file__).with_name("ddl_watch.sql")

# The catalog generation with the DDL watch installed: the counter its event trigger moves
# in every DDL transaction (read in our own snapshot, so only committed DDL counts), and
# the versions of the trigger and its function: disabling, re-enabling or replacing
# either (which the trigger itself cannot see) changes the generation too. No row when the
# trigger is missing or not ENABLE ALWAYS.
_WATCH_PROBE = """
SELECT 'watch:' || (SELECT sum(g.n) FROM pgwarden.ddl_generation g)::text
       || ':' || e.xmin::text || ':' || p.xmin::text
FROM pg_catalog.pg_event_trigger e JOIN pg_catalog.pg_proc p ON p.oid = e.evtfoid
WHERE e.evtname = 'pgwarden_ddl_watch' AND e.evtevent = 'ddl_command_end'
  AND e.evtenabled = 'A'
"""

# The catalog generation without it: the snapshot. Identical snapshots mean no transaction
# committed in between, so the catalog cannot have changed (exact, but any write moves it:
# on a busy database the cache then lasts one statement). Also: whether the watch is there.
_SNAPSHOT_PROBE = """
SELECT 'snapshot:' || pg_catalog.pg_current_snapshot()::text,
       pg_catalog.to_regclass('pgwarden.ddl_generation') IS NOT NULL
       AND pg_catalog.has_table_privilege('pgwarden.ddl_generation', 'SELECT')
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger e
                   WHERE e.evtname = 'pgwarden_ddl_watch' AND e.evtevent = 'ddl_command_end'
                     AND e.evtenabled = 'A')
"""

# The catalog check in band: the generation asserted on the session's own connection, ahead
# of its statement in the same pipeline (an implicit transaction): the assertion divides by
# zero (22012) when the generation read there is not $1, which fails the transaction and
# skips the statement behind it. Everything schema-qualified, operators included: it runs
# under the client's search_path, where an operator of the client's could shadow ours.
_WATCH_CHECK = """
SELECT 1 OPERATOR(pg_catalog./) pg_catalog.int4(COALESCE((
  SELECT 'watch:' OPERATOR(pg_catalog.||)
         (SELECT pg_catalog.sum(g.n) FROM pgwarden.ddl_generation g)::pg_catalog.text
         OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) e.xmin::pg_catalog.text
         OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) p.xmin::pg_catalog.text
  FROM pg_catalog.pg_event_trigger e
  JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) e.evtfoid
  WHERE e.evtname OPERATOR(pg_catalog.=) 'pgwarden_ddl_watch'
    AND e.evtevent OPERATOR(pg_catalog.=) 'ddl_command_end'
    AND e.evtenabled OPERATOR(pg_catalog.=) 'A'
) OPERATOR(pg_catalog.=) $1::pg_catalog.text, false))
"""
_SNAPSHOT_CHECK = """
SELECT 1 OPERATOR(pg_catalog./) pg_catalog.int4(
  ('snapshot:' OPERATOR(pg_catalog.||) pg_catalog.pg_current_snapshot()::pg_catalog.text)
  OPERATOR(pg_catalog.=) $1::pg_catalog.text)
"""
# The SQLSTATE of a check that found the generation moved (the assertion's division).
CHECK_FAILED = "22012"


# Every attribute (system ones included) of relations a RowDescription named.
_ATTRIBUTES_QUERY = """
SELECT a.attrelid::int8, a.attnum::int4 FROM pg_catalog.pg_attribute a
WHERE a.attrelid = ANY($1::oid[]) AND NOT a.attisdropped
"""


def consults_catalog(facts: StatementFacts) -> bool:
    """Whether resolving `facts` reads the target's catalog (names, functions, operators,
    types): only then does a statement's decision depend on the catalog's generation."""
    return bool(
        facts.reads
        or facts.writes
        or facts.columns
        or facts.functions
        or facts.operators
        or facts.types
        or facts.attributes
    )


class Catalog:
    """Relation and column metadata for one database of a target, over a single lazy
    metadata connection, closed when idle (see release() for DROP DATABASE).

    Everything cached belongs to one catalog generation. refresh(), called before a
    statement is resolved, reads the generation from the server and drops the cache when it
    moved: a statement that starts after a DDL committed is never resolved or masked from
    metadata older than that DDL (see _WATCH_PROBE and _SNAPSHOT_PROBE).

    Unqualified names take the first schema of the effective search path (pg_catalog first
    unless listed, `$user` replaced by the user) that holds the relation. A relation found
    nowhere gets the creation schema (the first existing schema of the path, where an
    unqualified CREATE would put it) and the flag "unresolved_relation"; its `*` stays `*`.
    If the catalog cannot be reached the facts keep "" and "*" and gain "catalog_unavailable".
    resolve() does not raise when the catalog cannot be read (CATALOG_FAILURES); what else
    it raises is a bug, never reported as catalog_unavailable.
    """

    def __init__(
        self,
        connect: Connect | str,
        *,
        timeout: float = 2.0,
        ttl: float = 60.0,
        retry_after: float = 1.0,
        idle_seconds: float = 10.0,
    ) -> None:
        # Closing the connection forgets what it read (see close()).
        self._db = CatalogConnection(
            connect,
            timeout=timeout,
            retry_after=retry_after,
            idle_seconds=idle_seconds,
            on_close=self.invalidate,
        )
        self._timeout = timeout
        # DDL made elsewhere moves the generation (refresh()); entries also expire, a bound
        # on what a caller that never refreshes (a CLI evaluation) may see.
        self._ttl = ttl
        self._schemas: frozenset[str] = frozenset()
        # relname → ({schema: columns}, fetched at)
        self._relations: dict[str, tuple[dict[str, tuple[str, ...]], float]] = {}
        # (schema, relname) → relkind, fetched with _relations (and expiring with it)
        self._relkinds: dict[tuple[str, str], str] = {}
        # (schema, relname) → OID, and OID → its columns' attnums, likewise
        self._oids: dict[tuple[str, str], int] = {}
        self._attnums: dict[int, frozenset[int]] = {}
        # (schema, view) → (lineage, fetched at)
        self._views: dict[tuple[str, str], tuple[_ViewLineage, float]] = {}
        # function name → ((schemas holding a function of that name, those holding one not
        # traced), fetched at)
        self._functions: dict[str, tuple[_FunctionHolders, float]] = {}
        # function name → (its untraced functions outside pg_catalog, fetched at)
        self._untraced: dict[str, tuple[tuple[_UntracedFunction, ...], float]] = {}
        # operator name → (schemas holding one of that name backed by user code, fetched at)
        self._operators: dict[str, tuple[frozenset[str], float]] = {}
        # type name → (schemas holding one a cast to which runs user code, fetched at)
        self._types: dict[str, tuple[frozenset[str], float]] = {}
        # (schema, table, column) → ((table OID, attnum, derived), ...), fetched at
        self._mask_columns: dict[
            tuple[str, str, str], tuple[tuple[tuple[int, int, bool], ...], float]
        ] = {}
        # (table OID, attnum) of every column seen in this generation, and those relations:
        # a RowDescription naming another was made by a newer catalog than the cache.
        self._known_columns: set[tuple[int, int]] = set()
        self._known_relations: set[int] = set()
        # Facts (text left out), search_path and user → (resolved facts, resolved at): texts of
        # one shape, and the same text again, resolve once per generation. `_epoch` counts
        # invalidations, so that a resolution that spanned one is not kept.
        self._resolutions: dict[
            tuple[StatementFacts, tuple[str, ...], str | None], tuple[StatementFacts, float]
        ] = {}
        self._epoch = 0
        # The generation the cache belongs to (None: not confirmed, nothing cached is used)
        # and whether it is read from the DDL watch or from the snapshot.
        self.generation: str | None = None
        self._watched = True
        # Probes in a row that found the generation where the one before left it (see steady).
        self._unmoved = 0
        # The probe under way (None: none), and the callers waiting for the next one: they
        # came after it was sent, so it cannot serve them. Each refresh() caller has a
        # future of its own (cancelling one leaves the others' probe alone); refresh_soon()
        # callers share `_next_shared`.
        self._probe_task: asyncio.Task[None] | None = None
        self._next_waiters: list[asyncio.Future[str | None]] = []
        self._next_shared: asyncio.Future[str | None] | None = None
        # When (time.monotonic) the probe that answered `generation` was sent; None: no
        # answer to go by. See refresh(since=).
        self._answered_sent_at: float | None = None

    def invalidate(self) -> None:
        """Forget all metadata (call after any DDL statement completes)."""
        self._relations.clear()
        self._relkinds.clear()
        self._oids.clear()
        self._attnums.clear()
        self._views.clear()
        self._functions.clear()
        self._untraced.clear()
        self._operators.clear()
        self._types.clear()
        self._mask_columns.clear()
        self._known_columns.clear()
        self._known_relations.clear()
        self._resolutions.clear()
        self._answered_sent_at = None
        self._epoch += 1
        self._schemas = frozenset()

    @property
    def watched(self) -> bool:
        """Whether the generation comes from the DDL watch (else from the snapshot)."""
        return self._watched

    @property
    def steady(self) -> bool:
        """Whether a probe is likely to find the generation unmoved: it comes from the DDL
        watch (only DDL moves it), or from the snapshot and the last STEADY_PROBES probes
        in a row found it unmoved (no write committed on the database meanwhile). One that
        moved makes it unsteady until that many have not again."""
        return self._watched or self._unmoved >= STEADY_PROBES

    def check_sql(self) -> tuple[str, str]:
        """The in-band catalog check for the way the generation is read now (the DDL watch
        or the snapshot): a name for its statement (one per way) and its SQL, which fails
        with CHECK_FAILED where the generation is not its one parameter."""
        if self._watched:
            return "watch", _WATCH_CHECK
        return "snapshot", _SNAPSHOT_CHECK

    @property
    def epoch(self) -> int:
        """Moves whenever the cache is dropped (invalidate()): what was resolved from it
        before, within one generation, may be stale."""
        return self._epoch

    async def refresh(self, since: float | None = None) -> str | None:
        """Make the cache describe every DDL that committed before this call; the generation
        it then belongs to, or None when the server could not say (the cache is dropped:
        what follows fails closed). Concurrent callers share one probe, as long as it was
        sent after they called. Raises only for a bug (not for an unreachable catalog).

        `since` (time.monotonic): DDL committed before that moment is all the caller needs
        seen (its statement arrived then). The last probe answered serves it with no round
        trip if it was sent after that moment: a statement decided again after its
        catalog check found its plan stale asks once, not once per step."""
        if since is not None:
            sent = self._answered_sent_at
            if sent is not None and sent > since and self.generation is not None:
                return self.generation
        return await self._wait_for_probe()

    def refresh_soon(self) -> asyncio.Future[str | None]:
        """refresh() for a caller that is not a coroutine (the session's fast path): the
        shared probe's future, sent after this call. Only to add callbacks to: cancelling
        it would cancel every caller's probe."""
        shared = self._next_shared
        if shared is None:
            shared = self._next_shared = self._wait_for_probe()
        return shared

    def _wait_for_probe(self) -> asyncio.Future[str | None]:
        # No Task, shield or wait per caller: the probe hands its result to each waiter
        # itself (one loop pass to the caller), and the one in flight starts the next.
        waiter: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._next_waiters.append(waiter)
        if self._probe_task is None:
            self._send_probe()
        return waiter

    def _send_probe(self) -> None:
        self._probe_task = asyncio.get_running_loop().create_task(self._probe_for())

    async def _probe_for(self) -> None:
        # The task's first step, a loop pass after _send_probe(): it serves everyone who
        # asked before this line, and sends its query after it.
        waiters, self._next_waiters, self._next_shared = self._next_waiters, [], None
        sent_at = time.monotonic()  # the query leaves after this line
        generation: str | None = None
        try:
            try:
                generation = await self._on_connection(self._probe)
            except CATALOG_FAILURES:
                generation = None
            if generation is None or generation != self.generation:
                self.invalidate()
                self._unmoved = 0
            else:
                self._unmoved += 1
            self.generation = generation
            self._answered_sent_at = sent_at if generation is not None else None
        except BaseException as exc:
            # A bug (or the loop shutting down): every waiter hears of it, none hangs.
            for waiter in waiters:
                if not waiter.done():
                    if isinstance(exc, asyncio.CancelledError):
                        waiter.cancel()
                    else:
                        waiter.set_exception(exc)
            raise
        else:
            for waiter in waiters:
                if not waiter.done():  # (a refresh() caller cancelled meanwhile)
                    waiter.set_result(generation)
        finally:
            # Who asked while this one was in flight gets the next (sent a pass from now,
            # so the callers just answered share it if they ask again at once).
            self._probe_task = None
            if self._next_waiters:
                self._send_probe()

    async def _probe(self, conn: Any) -> str | None:
        if self._watched:
            try:
                generation = await conn.fetchval(_WATCH_PROBE, timeout=self._timeout)
            except (asyncpg.UndefinedTableError, asyncpg.InsufficientPrivilegeError):
                generation = None
            if generation is not None:
                return str(generation)
            self._watched = False
        row = await conn.fetchrow(_SNAPSHOT_PROBE, timeout=self._timeout)
        if row[1]:
            # Installed since: the counter from now on (a new generation, so a fresh cache).
            self._watched = True
            return await self._probe(conn)
        return str(row[0])

    def knows(self, relation: int, attnum: int) -> bool:
        """Whether this column of this relation was seen in the current generation (system
        columns: whether the relation was)."""
        if attnum < 0:
            return relation in self._known_relations
        return (relation, attnum) in self._known_columns

    def relation_oids(self, facts: StatementFacts) -> frozenset[int] | None:
        """OIDs of the relations resolved `facts` name, as resolve() found them; None when
        one is not known (not resolved, or the cache was dropped since)."""
        names = {(t.schema, t.table) for t in (*facts.reads, *facts.writes)}
        names.update((c.schema, c.table) for c in facts.columns)
        oids = [self._oids.get(name) for name in names]
        if any(oid is None for oid in oids):
            return None
        return frozenset(oid for oid in oids if oid is not None)

    def columns_of(self, relations: Iterable[int]) -> frozenset[tuple[int, int]]:
        """(OID, attnum) of the columns of these relations as resolve() found them."""
        return frozenset(
            (oid, attnum) for oid in relations for attnum in self._attnums.get(oid, ())
        )

    async def learn(self, relations: Iterable[int]) -> bool:
        """Fetch the columns of these relations (by OID) into what knows() answers from;
        False when the catalog cannot be reached (raises only for a bug)."""
        wanted = sorted(set(relations))
        generation = self.generation
        try:
            rows = await self._fetch(_ATTRIBUTES_QUERY, wanted)
        except CATALOG_FAILURES:
            return False
        if generation is not None and generation == self.generation:
            self._known_columns.update((int(r[0]), int(r[1])) for r in rows)
            self._known_relations.update(int(r[0]) for r in rows)
        return True

    async def mask_targets(self, masks: Sequence[Mask]) -> dict[tuple[int, int], str] | None:
        """(table OID, attnum) → method for the masked columns, as RowDescription reports them.

        Columns of views built on a masked column get "redact" (which of their columns came
        from it is unknown); inheritance children and partitions get the mask's own method.
        A mask whose column does not exist is skipped. None when the catalog cannot be
        reached: the caller must then mask every column (raises only for a bug).
        """
        if not masks:
            return {}
        self._forget_if_lost()
        now = time.monotonic()
        found, missing = _fresh(
            self._mask_columns,
            sorted({(m.schema, m.table, m.column) for m in masks}),
            self._ttl,
            now,
        )
        if missing:
            generation, epoch = self.generation, self._epoch
            try:
                rows = await self._fetch(
                    _MASK_QUERY,
                    [s for s, _, _ in missing],
                    [t for _, t, _ in missing],
                    [c for _, _, c in missing],
                )
            except CATALOG_FAILURES:
                return None
            fetched: dict[int, list[tuple[int, int, bool]]] = {}
            for i, relid, attnum, derived in rows:
                fetched.setdefault(i, []).append((relid, attnum, derived))
                self._known_columns.add((relid, attnum))
                self._known_relations.add(relid)
            # A column that does not exist is kept as absent only under a generation a probe
            # confirmed, unmoved while it was read: the DDL that creates it moves the
            # generation, and the probe every statement waits for then drops the entry
            # (invalidate). Without one (a caller that never probes) it is asked again next
            # time: cached, its absence would leave it unmasked for a TTL once created.
            absence_holds = (
                generation is not None and generation == self.generation and epoch == self._epoch
            )
            for index, name in enumerate(missing, start=1):
                columns = tuple(dict.fromkeys(fetched.get(index, ())))
                found[name] = columns
                if columns or absence_holds:
                    self._mask_columns[name] = (columns, now)
        targets: dict[tuple[int, int], str] = {}
        for m in masks:
            for relid, attnum, derived in found[(m.schema, m.table, m.column)]:
                method = "redact" if derived else m.method
                held = targets.get((relid, attnum))
                targets[(relid, attnum)] = method if held is None else stronger_method(held, method)
        return targets

    async def release(self) -> None:
        """Close the metadata connection now, once the query in flight (if any) is done: its
        database must be free for DROP DATABASE, a rename, or CREATE DATABASE copying it."""
        await self._db.release()

    def _forget_if_lost(self) -> None:
        """The server ended the connection (DROP DATABASE ... WITH (FORCE), a terminated
        backend): the database may be gone and its name another's, so is what it read."""
        if self._db.lost():
            self.invalidate()

    async def close(self) -> None:
        """Close the connection and forget what it read: the cache describes the database
        that connection was in, and once none is held open a database of that name may be
        dropped and made again (new OIDs) without pgwarden seeing it."""
        await self._db.close()

    async def resolve(
        self,
        facts: StatementFacts,
        search_path: Sequence[str] = DEFAULT_SEARCH_PATH,
        user: str | None = None,
    ) -> StatementFacts:
        """`facts` with schemas filled in, `*` expanded to the relations' live columns, what
        views read (flag "via_view") and functions the policy cannot see into (flag
        "opaque_function")."""
        self._forget_if_lost()
        if self.generation is None:
            return await self._resolve(facts, search_path, user)
        key = (facts.with_text(""), tuple(search_path), user)
        now = time.monotonic()
        known = self._resolutions.get(key)
        if known is not None and now - known[1] < self._ttl:
            return known[0].with_text(facts.text)
        epoch = self._epoch
        resolved = await self._resolve(facts, search_path, user)
        if epoch == self._epoch and "catalog_unavailable" not in resolved.flags:
            if len(self._resolutions) >= _MAX_RESOLUTIONS:
                self._resolutions.clear()
            # As old as the oldest metadata it may have used, so that the TTL bounds it too.
            self._resolutions[key] = (resolved, min(now, self._oldest_fetch()))
        return resolved

    def _oldest_fetch(self) -> float:
        caches: tuple[dict[Any, tuple[Any, float]], ...] = (
            self._relations,
            self._views,
            self._functions,
            self._untraced,
            self._operators,
            self._types,
        )
        return min((fetched for cache in caches for _, fetched in cache.values()), default=0.0)

    async def _resolve(
        self,
        facts: StatementFacts,
        search_path: Sequence[str],
        user: str | None,
        calling: frozenset[str] = frozenset(),
    ) -> StatementFacts:
        """resolve() without the cache; `calling`: the LANGUAGE sql functions whose bodies
        are being resolved, outermost first (see _sql_bodies)."""
        names = {t.table for t in (*facts.reads, *facts.writes)} | {c.table for c in facts.columns}
        for output in facts.outputs or ():
            names.update(table for _, table, _ in output.sources)
        if not names and not (facts.functions or facts.operators or facts.types):
            return facts  # an attribute (t.name) comes with its relation, so with names
        self._forget_if_lost()
        try:
            relations = await self._lookup(names)
        except CATALOG_FAILURES:
            return _flagged(facts, "catalog_unavailable")
        path = self._effective_path(search_path, user)
        unresolved = False

        def place(schema: str, table: str) -> str:
            nonlocal unresolved
            if schema:
                return schema
            holders = relations.get(table, {})
            for candidate in path:
                if candidate in holders:
                    return candidate
            unresolved = True
            for candidate in path:
                if candidate in self._schemas and candidate != "pg_catalog":
                    return candidate
            return "public"

        reads = tuple(
            dict.fromkeys(TableRef(place(t.schema, t.table), t.table) for t in facts.reads)
        )
        writes = tuple(
            dict.fromkeys(TableRef(place(t.schema, t.table), t.table) for t in facts.writes)
        )
        columns: dict[ColumnRef, None] = {}
        for c in facts.columns:
            schema = place(c.schema, c.table)
            known = relations.get(c.table, {}).get(schema)
            if c.column == "*" and known is not None:
                for name in known:
                    columns[ColumnRef(schema, c.table, name, c.usage)] = None
            else:
                columns[ColumnRef(schema, c.table, c.column, c.usage)] = None
        outputs = None
        if facts.outputs is not None:
            outputs = tuple(
                column
                for output in facts.outputs
                for column in _placed_output(output, place, relations)
            )
        resolved = replace(
            facts, reads=reads, writes=writes, columns=tuple(columns), outputs=outputs
        )
        if unresolved:
            resolved = _flagged(resolved, "unresolved_relation")
        try:
            resolved = await self._through_views(resolved)
            columns_known = {
                column
                for holders in relations.values()
                for known_columns in holders.values()
                for column in known_columns
            }
            resolved = await self._opaque_functions(
                resolved, path, columns_known, search_path, user, calling
            )
        except CATALOG_FAILURES:
            return _flagged(resolved, "catalog_unavailable")
        return resolved

    async def _through_views(self, facts: StatementFacts) -> StatementFacts:
        """Add what the views and materialized views in `facts` read: their base relations
        (nested views followed) to reads, and for each view column used, the base columns it
        comes from with the same usage. Where PostgreSQL does not tell which base column
        feeds a view column (an expression, a UNION), every column the view uses stands in."""
        named = dict.fromkeys(
            (t.schema, t.table) for t in (*facts.reads, *facts.writes)
        ) | dict.fromkeys((c.schema, c.table) for c in facts.columns)
        wanted = [name for name in named if self._relkinds.get(name) in ("v", "m")]
        if not wanted:
            return facts
        lineages = await self._view_lineages(wanted)
        if not lineages:
            return facts
        reads = dict.fromkeys(facts.reads)
        opaque = False
        for name in wanted:
            lineage = lineages.get(name)
            if lineage is not None:
                reads.update(dict.fromkeys(lineage.bases))
                opaque = opaque or lineage.opaque

        def behind(schema: str, table: str, column: str) -> tuple[Column, ...]:
            lineage = lineages.get((schema, table))
            if lineage is None:
                return ()
            sources = lineage.columns.get(column)
            return lineage.everything if sources is None else sources

        columns = dict.fromkeys(facts.columns)
        for c in facts.columns:
            for schema, table, column in behind(c.schema, c.table, c.column):
                columns[ColumnRef(schema, table, column, c.usage)] = None
        outputs = facts.outputs
        if outputs is not None:
            # An output drawn from a view column draws on what that column is made of.
            outputs = tuple(
                replace(o, sources=o.sources.union(*(behind(*b) for b in o.sources)))
                for o in outputs
            )
        resolved = _flagged(
            replace(facts, reads=tuple(reads), columns=tuple(columns), outputs=outputs),
            "via_view",
        )
        return _flagged(resolved, "opaque_function") if opaque else resolved

    async def _view_lineages(
        self, wanted: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], _ViewLineage]:
        now = time.monotonic()
        found, missing = _fresh(self._views, wanted, self._ttl, now)
        if missing:
            rows = await self._fetch(
                _VIEW_QUERY,
                [s for s, _ in missing],
                [t for _, t in missing],
                sorted(LINEAGE_OPAQUE_BUILTINS),
            )
            fetched = _lineages(rows)
            # mask_targets() caches, per masked column, the views built on it as they were
            # then: a view this catalog had not seen (created since, by a session that did
            # not pass through invalidate()) would stay unmasked until that entry expired.
            self._mask_columns.clear()
            for name in missing:
                lineage = fetched.get(name)
                if lineage is not None:  # gone since: nothing to add (and nothing cached)
                    self._views[name] = (lineage, now)
                    found[name] = lineage
        return found

    async def _opaque_functions(
        self,
        facts: StatementFacts,
        path: Sequence[str],
        columns_known: set[str],
        search_path: Sequence[str] = DEFAULT_SEARCH_PATH,
        user: str | None = None,
        calling: frozenset[str] = frozenset(),
    ) -> StatementFacts:
        """Flag "opaque_function" for functions the policy cannot see into: user-defined
        ones (anything outside pg_catalog, or an unqualified name that a function of another
        schema on the path may answer to), built-ins that run SQL given as text, and those
        reached without a call: through an operator, by attribute notation (`t.name`
        where no relation of the statement has a column `name`), or by a cast to a domain
        or type whose CHECK or cast function is user-written. An unqualified name
        pg_catalog lacks is qualified with the schema that answers to it."""
        if not (facts.functions or facts.operators or facts.attributes or facts.types):
            return facts
        names = {f.rsplit(".", 1)[-1] for f in facts.functions}
        holders = await self._function_holders(names) if names else {}
        functions: list[str] = []
        traced: list[str] = []
        bodies: list[StatementFacts] = []
        opaque = False
        for qualified in facts.functions:
            schema, _, name = qualified.rpartition(".")
            schemas, untraced = holders.get(name, (frozenset(), frozenset()))
            untraced = frozenset("pg_temp" if s.startswith("pg_temp_") else s for s in untraced)
            # The schemas whose untraced functions of the name may be the one that runs.
            candidates: list[str] = []
            if name in LINEAGE_OPAQUE_BUILTINS:
                opaque = True
            elif schema != "pg_catalog":
                # Named with its schema: that schema's functions of the name are the
                # candidates (none at all: the call fails, and is not traced either).
                known = any(
                    s == schema or (schema == "pg_temp" and s.startswith("pg_temp_"))
                    for s in schemas
                )
                if not known:
                    opaque = True
                elif schema in untraced:
                    candidates = [schema]
                else:
                    traced.append(qualified)
            else:
                # Unqualified (the analysis writes it pg_catalog.name): every function of the
                # name on the path is a candidate, as the arguments' types decide which runs.
                others = [s for s in path if s in schemas and s != "pg_catalog"]
                if not schemas:
                    opaque = True
                candidates = [s for s in others if s in untraced]
                if "pg_catalog" not in schemas and others:
                    qualified = f"{others[0]}.{name}"
                    if not candidates and schemas:
                        traced.append(qualified)
            if candidates and not opaque:
                read = await self._sql_bodies(name, candidates, search_path, user, calling)
                if read is None:
                    opaque = True
                else:
                    bodies.extend(read)
                    traced.append(qualified)
            functions.append(qualified)
        if not opaque and facts.operators:
            opaque = await self._user_code_behind(
                _OPERATOR_QUERY, self._operators, facts.operators, path
            )
        if not opaque and facts.types:
            # Types are looked up in the session's temporary schema too (operators are not).
            opaque = await self._user_code_behind(
                _TYPE_QUERY, self._types, facts.types, [*path, "pg_temp"]
            )
        attributes = {a for a in facts.attributes if a not in columns_known}
        if not opaque and attributes:
            found = await self._function_schemas(attributes)
            opaque = any(s in path and s != "pg_catalog" for n in attributes for s in found[n])
        resolved = replace(
            facts,
            functions=tuple(dict.fromkeys(functions)),
            traced_functions=() if opaque else tuple(dict.fromkeys(traced)),
        )
        if opaque:
            return _flagged(resolved, "opaque_function")
        return _with_bodies(resolved, bodies) if bodies else resolved

    async def _sql_bodies(
        self,
        name: str,
        schemas: Sequence[str],
        search_path: Sequence[str],
        user: str | None,
        calling: frozenset[str],
    ) -> list[StatementFacts] | None:
        """The resolved statements of the bodies of every untraced function named `name` in
        `schemas`, when each is a plain LANGUAGE sql function whose body only reads; None
        when any is not (plpgsql, C outside an extension, a body that writes, recursion or
        calls nested deeper than _MAX_BODY_DEPTH): what it reads is then unknown. A body's
        names are resolved under the search_path the function sets for itself, else the
        caller's, as PostgreSQL does when it runs it."""
        if len(calling) >= _MAX_BODY_DEPTH:
            return None
        candidates = await self._untraced_functions(name)
        found: list[StatementFacts] = []
        for schema, language, kind, source, own_path in candidates:
            if ("pg_temp" if schema.startswith("pg_temp_") else schema) not in schemas:
                continue
            key = f"{schema}.{name}"
            if language != "sql" or kind != "f" or not source.strip() or key in calling:
                return None
            body_path = parse_search_path(own_path) if own_path is not None else search_path
            for statement in analyze(source):
                if (
                    statement.category != "read"
                    or statement.command != "SELECT"
                    or not _TRACEABLE_BODY_FLAGS.issuperset(statement.flags)
                ):
                    return None
                body = await self._resolve(statement, body_path, user, calling | {key})
                if body.outputs is None or not _TRACEABLE_BODY_FLAGS.issuperset(body.flags):
                    return None  # (outputs None: where its values come from is unknown)
                found.append(body)
        return found

    async def _untraced_functions(self, name: str) -> tuple[_UntracedFunction, ...]:
        now = time.monotonic()
        entry = self._untraced.get(name)
        if entry is not None and now - entry[1] < self._ttl:
            return entry[0]
        rows = await self._fetch(_UNTRACED_FUNCTION_QUERY, [name])
        found = tuple(
            (schema, language, kind, source or "", own_path)
            for _, schema, language, kind, source, own_path in rows
        )
        self._untraced[name] = (found, now)
        return found

    async def _user_code_behind(
        self,
        query: str,
        cache: dict[str, tuple[frozenset[str], float]],
        names: Sequence[str],
        path: Sequence[str],
    ) -> bool:
        """Whether one of `names` (operators or types, schema-qualified or not) may run a
        user-written function, as `query` finds them: `1 #=# 2` calls the function behind
        #=# as surely as a call by name would. An unqualified name is looked up along
        `path`; "pg_temp" there stands for the session's own temporary schema."""
        wanted: list[tuple[str | None, str]] = []
        for qualified in names:
            qualifier, dot, name = qualified.rpartition(".")
            wanted.append((qualifier if dot else None, name))
        # Most names have no user-written code at all: that answer is kept too (until
        # invalidate() or the TTL), or "=" would cost a query on every statement.
        holders = await self._named_schemas(
            query, cache, {name for _, name in wanted}, keep_absent=True
        )
        for schema, name in wanted:
            schemas = {
                "pg_temp" if s.startswith("pg_temp_") else s for s in holders.get(name, frozenset())
            }
            if schema is not None and schema in schemas:
                return True
            if schema is None and any(s in schemas for s in path):
                return True
        return False

    async def _function_schemas(self, names: set[str]) -> dict[str, frozenset[str]]:
        return {name: found[0] for name, found in (await self._function_holders(names)).items()}

    async def _function_holders(self, names: set[str]) -> dict[str, _FunctionHolders]:
        """name → (schemas holding a function of that name, those of them holding one that
        is not traced), cached; an absent name is asked again (someone may create it)."""
        now = time.monotonic()
        found, missing = _fresh(self._functions, names, self._ttl, now)
        if missing:
            rows = await self._fetch(_FUNCTION_QUERY, sorted(missing))
            fetched = {
                name: (frozenset(schemas), frozenset(untraced)) for name, schemas, untraced in rows
            }
            for name in missing:
                holders = fetched.get(name, (frozenset(), frozenset()))
                found[name] = holders
                if holders[0]:
                    self._functions[name] = (holders, now)
        return found

    async def _named_schemas(
        self,
        query: str,
        cache: dict[str, tuple[frozenset[str], float]],
        names: set[str],
        *,
        keep_absent: bool = False,
    ) -> dict[str, frozenset[str]]:
        """name → the schemas `query` finds holding an object of that name, cached."""
        now = time.monotonic()
        found, missing = _fresh(cache, names, self._ttl, now)
        if missing:
            rows = await self._fetch(query, sorted(missing))
            fetched = {name: frozenset(schemas) for name, schemas in rows}
            for name in missing:
                schemas = fetched.get(name, frozenset())
                found[name] = schemas
                # An absent function is asked again: someone may create it.
                if schemas or keep_absent:
                    cache[name] = (schemas, now)
        return found

    def _effective_path(self, search_path: Sequence[str], user: str | None) -> list[str]:
        path: list[str] = []
        for name in search_path:
            if name == "$user":
                name = user or self._db.user or ""
            if name and name not in path:
                path.append(name)
        if "pg_catalog" not in path:
            path.insert(0, "pg_catalog")
        return path

    async def _lookup(self, names: set[str]) -> dict[str, dict[str, tuple[str, ...]]]:
        now = time.monotonic()
        found, missing = _fresh(self._relations, names, self._ttl, now)
        if missing or not self._schemas:
            rows, schemas = await self._query(sorted(missing))
            self._schemas = schemas
            fetched: dict[str, dict[str, tuple[str, ...]]] = {name: {} for name in missing}
            for name in missing:
                for key in [k for k in self._relkinds if k[1] == name]:
                    del self._relkinds[key]
                    self._oids.pop(key, None)
            for schema, relname, relkind, columns, oid, attnums in rows:
                fetched.setdefault(relname, {})[schema] = tuple(columns)
                self._relkinds[(schema, relname)] = relkind
                self._oids[(schema, relname)] = oid
                self._attnums[oid] = frozenset(attnums)
                self._known_columns.update((oid, attnum) for attnum in attnums)
                self._known_relations.add(oid)
            for name, holders in fetched.items():
                self._relations[name] = (holders, now)
                found[name] = holders
        return found

    async def _query(self, names: list[str]) -> tuple[list[Any], frozenset[str]]:
        async def work(conn: Any) -> tuple[list[Any], frozenset[str]]:
            rows = await conn.fetch(_QUERY, names, _RELKINDS, timeout=self._timeout)
            schemas = await conn.fetch(
                "SELECT nspname FROM pg_catalog.pg_namespace", timeout=self._timeout
            )
            return [tuple(r) for r in rows], frozenset(r[0] for r in schemas)

        return await self._on_connection(work)

    async def function_name(self, oid: int) -> str | None:
        """`schema.name` of the function with this OID (for the FunctionCall message), or
        None when there is none or the catalog is unreachable (raises only for a bug)."""
        try:
            rows = await self._fetch(
                "SELECT n.nspname, p.proname FROM pg_proc p"
                " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = $1",
                oid,
            )
        except CATALOG_FAILURES:
            return None
        if not rows:
            return None
        return f"{rows[0][0]}.{rows[0][1]}".lower()

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        return await self._db.fetch(query, *args)

    async def _on_connection(self, work: Callable[[Any], Awaitable[_T]]) -> _T:
        return await self._db.run(work)


def _fresh(
    cache: Mapping[_K, tuple[_V, float]], names: Iterable[_K], ttl: float, now: float
) -> tuple[dict[_K, _V], list[_K]]:
    """What `cache` holds for `names` that is younger than `ttl` (entries are (value,
    fetched at)), and the names it holds nothing fresh for, in order."""
    found: dict[_K, _V] = {}
    missing: list[_K] = []
    for name in names:
        entry = cache.get(name)
        if entry is not None and now - entry[1] < ttl:
            found[name] = entry[0]
        else:
            missing.append(name)
    return found, missing


# Resolutions kept per catalog (cleared whole when full: refilled within a generation).
_MAX_RESOLUTIONS = 4096


def _flagged(facts: StatementFacts, flag: str) -> StatementFacts:
    if flag in facts.flags:
        return facts
    return replace(facts, flags=(*facts.flags, flag))
