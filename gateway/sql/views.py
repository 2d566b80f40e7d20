"""What a view or materialized view really reads: its base relations and, column by
column, the base columns each view column comes from, from its SELECT rule's query tree."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.sql.facts import TableRef
from gateway.sql.names import _RELKINDS, Column

# Every view and materialized view reachable from the named ones through the relations
# their SELECT rule (ev_type '1', "_RETURN") depends on, with what lineage needs: the rule's
# query tree, the view's columns, and each dependency (column-level where PostgreSQL
# records one, refobjsubid 0 for a relation used as a whole) with all its columns.
_VIEW_QUERY = """
WITH RECURSIVE views(oid) AS (
    SELECT c.oid
    FROM unnest($1::text[], $2::text[]) AS w(schema, tbl)
    JOIN pg_catalog.pg_namespace n ON n.nspname = w.schema
    JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = w.tbl
    WHERE c.relkind IN ('v', 'm')
    UNION
    SELECT d.refobjid
    FROM views v
    JOIN pg_catalog.pg_rewrite r ON r.ev_class = v.oid AND r.ev_type = '1'
    JOIN pg_catalog.pg_depend d
      ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
     AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid <> v.oid
    JOIN pg_catalog.pg_class c ON c.oid = d.refobjid AND c.relkind IN ('v', 'm')
),
deps(view, ref, sub) AS (
    SELECT DISTINCT v.oid, d.refobjid, d.refobjsubid
    FROM views v
    JOIN pg_catalog.pg_rewrite r ON r.ev_class = v.oid AND r.ev_type = '1'
    JOIN pg_catalog.pg_depend d
      ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
     AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid <> v.oid
)
SELECT v.oid::int8, n.nspname, c.relname,
       (SELECT r.ev_action::text FROM pg_catalog.pg_rewrite r
        WHERE r.ev_class = v.oid AND r.ev_type = '1' LIMIT 1) AS action,
       (SELECT json_agg(json_build_array(a.attnum, a.attname::text) ORDER BY a.attnum)
        FROM pg_catalog.pg_attribute a
        WHERE a.attrelid = v.oid AND a.attnum > 0 AND NOT a.attisdropped)::text AS columns,
       (SELECT json_agg(json_build_array(
                   d.ref::int8, dn.nspname::text, dc.relname::text, dc.relkind::text, d.sub,
                   (SELECT json_agg(json_build_array(a.attnum, a.attname::text) ORDER BY a.attnum)
                    FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = d.ref AND a.attnum > 0 AND NOT a.attisdropped)))
        FROM deps d
        JOIN pg_catalog.pg_class dc ON dc.oid = d.ref
        JOIN pg_catalog.pg_namespace dn ON dn.oid = dc.relnamespace
        WHERE d.view = v.oid)::text AS deps,
       -- Functions its rule calls that pgwarden cannot see into (FROM get_rows(), ...):
       -- user-defined ones through pg_depend; built-ins are pinned and have no pg_depend
       -- rows, so those that run SQL text are found by OID in the rule's query tree.
       EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite r
               JOIN pg_catalog.pg_depend d
                 ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
                AND d.refclassid = 'pg_catalog.pg_proc'::regclass
               JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid
               WHERE r.ev_class = v.oid AND r.ev_type = '1'
                 AND p.pronamespace <> 'pg_catalog'::regnamespace)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite r
                  JOIN pg_catalog.pg_proc p ON p.proname = ANY($3::text[])
                  WHERE r.ev_class = v.oid AND r.ev_type = '1'
                    AND r.ev_action::text LIKE '%:funcid ' || p.oid::text || ' %') AS opaque
FROM views v
JOIN pg_catalog.pg_class c ON c.oid = v.oid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
"""


@dataclass(frozen=True, slots=True)
class _ViewLineage:
    """What reading one view or materialized view really reads."""

    # Every relation read through it: nested views and their base relations.
    bases: tuple[TableRef, ...]
    # Each view column → the columns it comes from, at every level down to base tables.
    columns: Mapping[str, tuple[Column, ...]]
    # Every column the view draws on: for a name the view does not have.
    everything: tuple[Column, ...]
    # It (or a view under it) calls a function the policy cannot see into.
    opaque: bool = False


_NODE_TOKEN = re.compile(r"[(){}]|(?:\\.|[^ \t\n(){}\\])+", re.S)


class _Node(list[Any]):
    """`{NAME :field value ...}` of a pg_node_tree: the name, then fields and values in order."""

    def field(self, name: str) -> Any:
        key = ":" + name
        for i in range(1, len(self) - 1):
            if self[i] == key:
                return self[i + 1]
        return None


def _node_tree(text: str) -> Any:
    """A pg_node_tree's text (read.c's pg_strtok tokens) as nested lists and _Nodes."""
    root: list[Any] = []
    stack: list[list[Any]] = [root]
    for match in _NODE_TOKEN.finditer(text):
        token = match.group()
        if token in ("(", "{"):
            item: list[Any] = [] if token == "(" else _Node()
            stack[-1].append(item)
            stack.append(item)
        elif token in (")", "}"):
            if len(stack) == 1:
                raise ValueError("unbalanced node tree")
            stack.pop()
        else:
            stack[-1].append(token)
    if len(stack) != 1:
        raise ValueError("unbalanced node tree")
    return root[0] if len(root) == 1 else root


def _walk_nodes(tree: Any) -> Iterator[_Node]:
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            if isinstance(item, _Node):
                yield item
            stack.extend(item)


def _rule_shape(action: str | None) -> tuple[dict[int, tuple[int, int]], bool] | None:
    """From a SELECT rule's query tree: view attnum → (origin table OID, attnum) for the
    output columns PostgreSQL traced to one column (resorigtbl), and whether any whole-row
    Var appears anywhere. None when the tree is not understood."""
    if not action:
        return None
    try:
        tree = _node_tree(action)
        queries = [n for n in (tree if isinstance(tree, list) else [tree]) if isinstance(n, _Node)]
        if len(queries) != 1 or queries[0][0] != "QUERY":
            return None
        targets = queries[0].field("targetList")
        origins: dict[int, tuple[int, int]] = {}
        for entry in targets if isinstance(targets, list) else ():
            if not isinstance(entry, _Node) or entry[0] != "TARGETENTRY":
                continue
            if entry.field("resjunk") == "true":
                continue
            table, column = int(entry.field("resorigtbl")), int(entry.field("resorigcol"))
            if table and column > 0:
                origins[int(entry.field("resno"))] = (table, column)
        whole_row = any(n[0] == "VAR" and n.field("varattno") == "0" for n in _walk_nodes(tree))
        return origins, whole_row
    except (ValueError, TypeError, IndexError):
        return None


def _lineages(rows: Sequence[Any]) -> dict[tuple[str, str], _ViewLineage]:
    """Lineage of every view in `rows` (_VIEW_QUERY's answer), by (schema, name)."""
    names: dict[int, tuple[str, str, str]] = {}  # OID → (schema, name, relkind)
    attnames: dict[tuple[int, int], str] = {}
    views: dict[int, tuple[list[tuple[int, int]], set[tuple[int, int]]]] = {}
    view_columns: dict[int, list[tuple[int, str]]] = {}
    shapes: dict[int, tuple[dict[int, tuple[int, int]], bool] | None] = {}
    opaque_views: set[int] = set()
    for oid, schema, relname, action, columns_json, deps_json, opaque in rows:
        if opaque:
            opaque_views.add(oid)
        names[oid] = (schema, relname, "v")
        columns = [(int(a), str(n)) for a, n in json.loads(columns_json or "[]")]
        view_columns[oid] = columns
        for attnum, attname in columns:
            attnames[(oid, attnum)] = attname
        shapes[oid] = _rule_shape(action)
        deps: list[tuple[int, int]] = []
        everything: set[tuple[int, int]] = set()
        for ref, ref_schema, ref_name, relkind, sub, ref_columns in json.loads(deps_json or "[]"):
            names.setdefault(ref, (ref_schema, ref_name, relkind))
            for attnum, attname in ref_columns or ():
                attnames[(ref, attnum)] = attname
                everything.add((ref, attnum))
            deps.append((ref, sub))
        views[oid] = (deps, everything)

    def direct(oid: int, attnum: int | None) -> set[tuple[int, int]]:
        """The columns one view column is made of; attnum None: of the whole view."""
        deps, everything = views[oid]
        shape = shapes[oid]
        column_deps = {(ref, sub) for ref, sub in deps if sub > 0}
        if shape is not None and attnum is not None:
            origin = shape[0].get(attnum)
            if origin is not None and origin in column_deps:
                return {origin}
        if shape is None or shape[1]:
            # A whole-row Var (row_to_json(t)) or a tree not understood: every column.
            return set(everything)
        return column_deps

    memo: dict[tuple[int, int | None], frozenset[Column]] = {}

    def closure(oid: int, attnum: int | None, seen: frozenset[int]) -> frozenset[Column]:
        key = (oid, attnum)
        if key in memo:
            return memo[key]
        found: set[Column] = set()
        for ref, ref_attnum in direct(oid, attnum):
            schema, table, _ = names[ref]
            name = attnames.get((ref, ref_attnum))
            if name is not None:
                found.add((schema, table, name))
            if ref in views and ref not in seen:
                found |= closure(ref, ref_attnum, seen | {ref})
        memo[key] = frozenset(found)
        return memo[key]

    def bases(oid: int) -> tuple[list[TableRef], bool]:
        out: dict[TableRef, None] = {}
        stack, seen = [oid], {oid}
        opaque = False
        while stack:
            current = stack.pop()
            opaque = opaque or current in opaque_views
            for ref, _ in views[current][0]:
                schema, table, relkind = names[ref]
                if relkind in _RELKINDS:
                    out[TableRef(schema, table)] = None
                if ref in views and ref not in seen:
                    seen.add(ref)
                    stack.append(ref)
        return list(out), opaque

    result: dict[tuple[str, str], _ViewLineage] = {}
    for oid, columns in view_columns.items():
        schema, relname, _ = names[oid]
        mapped = {
            name: tuple(sorted(closure(oid, attnum, frozenset({oid})))) for attnum, name in columns
        }
        every = set(closure(oid, None, frozenset({oid})))
        for cols in mapped.values():
            every.update(cols)
        reads, opaque = bases(oid)
        result[(schema, relname)] = _ViewLineage(tuple(reads), mapped, tuple(sorted(every)), opaque)
    return result
