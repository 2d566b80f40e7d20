"""Resolve unqualified relations and `*` columns in facts against one target's live catalog."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import asyncpg

from gateway.enforce.masking import stronger_method
from gateway.policy.decision import Mask
from gateway.sql.facts import ColumnRef, StatementFacts, TableRef

__all__ = ["DEFAULT_SEARCH_PATH", "Catalog", "parse_search_path"]

DEFAULT_SEARCH_PATH: tuple[str, ...] = ("$user", "public")

# Relations a statement can name in FROM: tables, views, matviews, foreign and
# partitioned tables, sequences.
_RELKINDS = ["r", "v", "m", "f", "p", "S"]

_QUERY = """
SELECT n.nspname, c.relname,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum) AS columns
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = ANY($1::text[]) AND c.relkind::text = ANY($2::text[])
"""

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
     AND d.refobjsubid IN (ch.attnum, 0) AND d.classid = 'pg_catalog.pg_rewrite'::regclass
    JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
    WHERE r.ev_class <> ch.relid
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

Connect = Callable[[], Awaitable[Any]]


def parse_search_path(text: str) -> tuple[str, ...]:
    """Split a search_path value as PostgreSQL does: commas, double-quoted names kept as is."""
    names: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            break
        if text[i] == '"':
            i += 1
            part: list[str] = []
            while i < n:
                if text[i] == '"':
                    if i + 1 < n and text[i + 1] == '"':
                        part.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                part.append(text[i])
                i += 1
            names.append("".join(part))
        else:
            start = i
            while i < n and text[i] != ",":
                i += 1
            names.append(text[start:i].strip().lower())
    return tuple(names)


class Catalog:
    """Relation and column metadata for one target, over a single lazy metadata connection.

    Unqualified names take the first schema of the effective search path (pg_catalog first
    unless listed, `$user` replaced by the user) that holds the relation. A relation found
    nowhere gets the creation schema (the first existing schema of the path, where an
    unqualified CREATE would put it) and the flag "unresolved_relation"; its `*` stays `*`.
    If the catalog cannot be reached the facts keep "" and "*" and gain "catalog_unavailable".
    resolve() never raises.
    """

    def __init__(
        self,
        connect: Connect | str,
        *,
        timeout: float = 2.0,
        ttl: float = 60.0,
        retry_after: float = 1.0,
    ) -> None:
        if isinstance(connect, str):
            dsn = connect

            async def _connect() -> Any:
                # A name operators (and tests) can tell apart in pg_stat_activity.
                return await asyncpg.connect(
                    dsn, timeout=timeout, server_settings={"application_name": "pgwarden-catalog"}
                )

            self._connect: Connect = _connect
        else:
            self._connect = connect
        self._timeout = timeout
        # Another session's DDL does not pass through invalidate(): entries also expire.
        self._ttl = ttl
        self._retry_after = retry_after
        self._conn: Any = None
        self._user: str | None = None
        self._schemas: frozenset[str] = frozenset()
        self._failed_at: float | None = None
        self._lock = asyncio.Lock()
        # relname → ({schema: columns}, fetched at)
        self._relations: dict[str, tuple[dict[str, tuple[str, ...]], float]] = {}
        # (schema, table, column) → ((table OID, attnum, derived), ...), fetched at
        self._mask_columns: dict[
            tuple[str, str, str], tuple[tuple[tuple[int, int, bool], ...], float]
        ] = {}

    def invalidate(self) -> None:
        """Forget all metadata (call after any DDL statement completes)."""
        self._relations.clear()
        self._mask_columns.clear()
        self._schemas = frozenset()

    async def mask_targets(self, masks: Sequence[Mask]) -> dict[tuple[int, int], str] | None:
        """(table OID, attnum) → method for the masked columns, as RowDescription reports them.

        Columns of views built on a masked column get "redact" (which of their columns came
        from it is unknown); inheritance children and partitions get the mask's own method.
        A mask whose column does not exist is skipped. None when the catalog cannot be
        reached: the caller must then mask every column. Never raises.
        """
        if not masks:
            return {}
        now = time.monotonic()
        found: dict[tuple[str, str, str], tuple[tuple[int, int, bool], ...]] = {}
        missing: list[tuple[str, str, str]] = []
        for name in sorted({(m.schema, m.table, m.column) for m in masks}):
            entry = self._mask_columns.get(name)
            if entry is not None and now - entry[1] < self._ttl:
                found[name] = entry[0]
            else:
                missing.append(name)
        if missing:
            try:
                async with self._lock:
                    for attempt in (1, 2):
                        conn = await self._connection()
                        try:
                            rows = await conn.fetch(
                                _MASK_QUERY,
                                [s for s, _, _ in missing],
                                [t for _, t, _ in missing],
                                [c for _, _, c in missing],
                                timeout=self._timeout,
                            )
                            break
                        except Exception:
                            # A dropped connection: one fresh attempt, then unavailable.
                            await self.close()
                            if attempt == 2:
                                self._failed_at = time.monotonic()
                                raise
            except Exception:
                return None
            fetched: dict[int, list[tuple[int, int, bool]]] = {}
            for i, relid, attnum, derived in rows:
                fetched.setdefault(i, []).append((relid, attnum, derived))
            for index, name in enumerate(missing, start=1):
                columns = tuple(dict.fromkeys(fetched.get(index, ())))
                found[name] = columns
                if columns:
                    # A column that does not exist yet is asked again next time: caching its
                    # absence would leave it unmasked for a TTL once someone creates it.
                    self._mask_columns[name] = (columns, now)
        targets: dict[tuple[int, int], str] = {}
        for m in masks:
            for relid, attnum, derived in found[(m.schema, m.table, m.column)]:
                method = "redact" if derived else m.method
                held = targets.get((relid, attnum))
                targets[(relid, attnum)] = method if held is None else stronger_method(held, method)
        return targets

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=self._timeout)
            except Exception:
                conn.terminate()

    async def resolve(
        self,
        facts: StatementFacts,
        search_path: Sequence[str] = DEFAULT_SEARCH_PATH,
        user: str | None = None,
    ) -> StatementFacts:
        """`facts` with schemas filled in and `*` expanded to the relations' live columns."""
        names = {t.table for t in (*facts.reads, *facts.writes)} | {c.table for c in facts.columns}
        needs = any(t.schema == "" for t in (*facts.reads, *facts.writes)) or any(
            c.schema == "" or c.column == "*" for c in facts.columns
        )
        if not needs:
            return facts
        try:
            relations = await self._lookup(names)
        except Exception:
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
        resolved = replace(facts, reads=reads, writes=writes, columns=tuple(columns))
        return _flagged(resolved, "unresolved_relation") if unresolved else resolved

    def _effective_path(self, search_path: Sequence[str], user: str | None) -> list[str]:
        path: list[str] = []
        for name in search_path:
            if name == "$user":
                name = user or self._user or ""
            if name and name not in path:
                path.append(name)
        if "pg_catalog" not in path:
            path.insert(0, "pg_catalog")
        return path

    async def _lookup(self, names: set[str]) -> dict[str, dict[str, tuple[str, ...]]]:
        now = time.monotonic()
        found: dict[str, dict[str, tuple[str, ...]]] = {}
        missing: list[str] = []
        for name in names:
            entry = self._relations.get(name)
            if entry is not None and now - entry[1] < self._ttl:
                found[name] = entry[0]
            else:
                missing.append(name)
        if missing or not self._schemas:
            rows, schemas = await self._query(sorted(missing))
            self._schemas = schemas
            fetched: dict[str, dict[str, tuple[str, ...]]] = {name: {} for name in missing}
            for schema, relname, columns in rows:
                fetched.setdefault(relname, {})[schema] = tuple(columns)
            for name, holders in fetched.items():
                self._relations[name] = (holders, now)
                found[name] = holders
        return found

    async def _query(self, names: list[str]) -> tuple[list[Any], frozenset[str]]:
        async with self._lock:
            for attempt in (1, 2):
                conn = await self._connection()
                try:
                    rows = await conn.fetch(_QUERY, names, _RELKINDS, timeout=self._timeout)
                    schemas = await conn.fetch(
                        "SELECT nspname FROM pg_catalog.pg_namespace", timeout=self._timeout
                    )
                    return [tuple(r) for r in rows], frozenset(r[0] for r in schemas)
                except Exception:
                    # A dropped connection: one fresh attempt, then report unavailable.
                    await self.close()
                    if attempt == 2:
                        self._failed_at = time.monotonic()
                        raise
        raise AssertionError("unreachable")

    async def _connection(self) -> Any:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        if self._failed_at is not None and time.monotonic() - self._failed_at < self._retry_after:
            # Do not make every statement wait a connect timeout while the target is down.
            raise ConnectionError("catalog connection failed recently")
        try:
            self._conn = await asyncio.wait_for(self._connect(), self._timeout)
            self._user = await self._conn.fetchval("SELECT current_user", timeout=self._timeout)
        except Exception:
            self._failed_at = time.monotonic()
            self._conn = None
            raise
        self._failed_at = None
        return self._conn


def _flagged(facts: StatementFacts, flag: str) -> StatementFacts:
    if flag in facts.flags:
        return facts
    return replace(facts, flags=(*facts.flags, flag))
