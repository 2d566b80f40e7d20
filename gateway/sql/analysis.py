"""Turn SQL text into one StatementFacts per statement, describing what each really does."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from pglast.parser import fingerprint as _pg_fingerprint
from pglast.parser import parse_sql_json

from gateway.sql.facts import (
    LINEAGE_OPAQUE_BUILTINS,
    Category,
    ColumnRef,
    OutputColumn,
    StatementFacts,
    TableRef,
)

__all__ = ["analyze", "analyze_shaped", "unknown_facts"]

# (schema, table, column): a column of a base relation; column "*" means all of them.
Base = tuple[str, str, str]
Node = Any  # a decoded JSON parse-tree value: dict, list, str, int, bool

_DML = ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")
_DML_COMMAND = {
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
}
# pg_settings is a view whose UPDATE rule calls set_config(): writing it changes settings.
_SETTINGS_VIEW = {TableRef("", "pg_settings"), TableRef("pg_catalog", "pg_settings")}
_IDENTITY_SETTINGS = {"role": "set_role", "session_authorization": "set_session_authorization"}
# Settings that switch off the server's own checks: session_replication_role = replica turns
# off triggers and foreign-key enforcement for the session's writes.
_GUARD_SETTINGS = {"session_replication_role": "set_replication_role"}
# Settings pgwarden can enforce on a session (gateway/guards): a statement that may change one
# other than by a plain SET or RESET of it (set_config(), ALTER ROLE/DATABASE ... SET, a
# write to pg_settings) is flagged "enforced_setting"; one that asks for a read-write
# transaction, "read_write".
ENFORCEABLE_SETTINGS = frozenset(
    {
        "default_transaction_read_only",
        "transaction_read_only",
        "statement_timeout",
        "idle_in_transaction_session_timeout",
    }
)


def unknown_facts(text: str, *, flags: tuple[str, ...] = ()) -> StatementFacts:
    """Facts for text that could not be understood: policy denies category unknown."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return StatementFacts(
        text=text,
        fingerprint=f"unparsed:{digest}",
        command="UNKNOWN",
        category="unknown",
        flags=flags,
    )


def analyze(text: str) -> tuple[StatementFacts, ...]:
    """Facts for every statement in `text`; never raises (failures become category unknown).

    Text holding only comments or whitespace has no statements and gives an empty tuple.
    """
    return analyze_shaped(text)[0]


def analyze_shaped(text: str) -> tuple[tuple[StatementFacts, ...], bool]:
    """analyze(), and whether its facts hold for every text of the same tokens whatever the
    literals' values: one query or DML statement none of whose facts read a literal's value.
    Such texts may share these facts (with their own `text`)."""
    if "\x00" in text:  # the C parser would stop at NUL and never see what follows
        return (unknown_facts(text),), False
    try:
        tree = orjson.loads(parse_sql_json(text))
    except Exception:  # parse errors, over-deep nesting in the JSON decoder: fail closed
        return (unknown_facts(text),), False
    stmts = tree.get("stmts") or []
    # Locations are byte offsets into the UTF-8 source.
    source = text.encode("utf-8", "surrogatepass")
    multi = len(stmts) > 1
    shaped = not multi
    out: list[StatementFacts] = []
    for raw in stmts:
        start = raw.get("stmt_location", 0)
        length = raw.get("stmt_len", 0)
        end = start + length if length else len(source)
        piece = source[start:end].decode("utf-8", "replace").strip()
        _literals.read = False
        try:
            facts = _analyze_statement(raw["stmt"], piece)
        except Exception:  # a shape this walker does not know: fail closed, not open
            facts = unknown_facts(piece, flags=("analysis_error",))
            shaped = False
        if _literals.read or next(iter(raw["stmt"]), None) not in _SHAPED_KINDS:
            shaped = False
        if multi:
            facts = _with_flag(facts, "multi_statement")
        out.append(facts)
    return tuple(out), shaped and bool(out)


def _with_flag(facts: StatementFacts, flag: str) -> StatementFacts:
    if flag in facts.flags:
        return facts
    return _replace(facts, flags=(*facts.flags, flag))


def _replace(facts: StatementFacts, **changes: Any) -> StatementFacts:
    return replace(facts, **changes)


def _fingerprint(piece: str) -> str:
    try:
        return str(_pg_fingerprint(piece))
    except Exception:
        return unknown_facts(piece).fingerprint


# --------------------------------------------------------------------------- scopes


@dataclass(slots=True, eq=False)
class _Out:
    """One output column of a derived relation: its name and the base columns it comes from."""

    name: str | None
    sources: frozenset[Base]
    star_of: tuple[_Rel, ...] = ()
    # Stands for a number of columns the parser cannot tell: `(f()).*`.
    spread: bool = False


@dataclass(slots=True, eq=False)
class _Rel:
    """A relation visible in a FROM scope: a base table, a derived table, or opaque rows."""

    alias: str
    table: TableRef | None = None
    outputs: list[_Out] | None = None  # derived relations (subquery, CTE, VALUES, join alias)
    # Rows of a function: every column may carry what its arguments read (unnest(ARRAY[x])).
    inputs: frozenset[Base] = frozenset()
    # One side of a JOIN ... USING or NATURAL JOIN: `*` shows the shared columns once.
    merged: bool = False

    def star(self) -> set[Base]:
        if self.table is not None:
            return {(self.table.schema, self.table.table, "*")}
        if self.outputs is None:
            return set(self.inputs)
        found: set[Base] = set()
        for out in self.outputs or ():
            found |= out.sources
        return found

    def column(self, name: str) -> set[Base]:
        if self.table is not None:
            return {(self.table.schema, self.table.table, name)}
        if self.outputs is None:  # rows of a function: what its arguments read
            return set(self.inputs)
        found: set[Base] = set()
        placed = False
        for out in self.outputs:
            if out.name == name:
                found |= out.sources
                placed = True
            for rel in out.star_of:
                found |= rel.column(name)
                placed = True
        # A name we cannot place: blame every column the relation draws on (over-report).
        # A placed name with no sources (a literal) draws on none.
        return found if placed else self.star()


@dataclass(slots=True, eq=False)
class _Scope:
    parent: _Scope | None = None
    rels: list[_Rel] = field(default_factory=list)
    ctes: dict[str, _Rel] = field(default_factory=dict)
    # Outer clause usage for a sub-select in WHERE/ORDER BY...: its output is used there.
    usage: str = "output"

    def cte(self, name: str) -> _Rel | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.ctes:
                return scope.ctes[name]
            scope = scope.parent
        return None

    def find(self, alias: str) -> _Rel | None:
        scope: _Scope | None = self
        while scope is not None:
            for rel in reversed(scope.rels):
                if rel.alias == alias:
                    return rel
            scope = scope.parent
        return None

    def all_rels(self) -> list[_Rel]:
        rels: list[_Rel] = []
        scope: _Scope | None = self
        while scope is not None:
            rels.extend(scope.rels)
            scope = scope.parent
        return rels


# --------------------------------------------------------------------------- collector


@dataclass(slots=True)
class _Draft:
    reads: dict[TableRef, None] = field(default_factory=dict)
    writes: dict[TableRef, None] = field(default_factory=dict)
    columns: dict[ColumnRef, None] = field(default_factory=dict)
    functions: dict[str, None] = field(default_factory=dict)
    operators: dict[str, None] = field(default_factory=dict)
    attributes: dict[str, None] = field(default_factory=dict)
    types: dict[str, None] = field(default_factory=dict)
    flags: dict[str, None] = field(default_factory=dict)
    dml: list[str] = field(default_factory=list)
    # UPDATE/DELETE seen without a real WHERE anywhere in the statement.
    unfiltered: bool = False
    filtered: bool = False
    # The output list of the statement's rows (SELECT, VALUES, RETURNING), for lineage.
    outputs: list[_Out] | None = None

    def flag(self, name: str) -> None:
        self.flags[name] = None

    def emit(self, bases: Iterable[Base], usage: str) -> None:
        for schema, table, column in bases:
            self.columns[ColumnRef(schema, table, column, usage)] = None


def _s(node: Node) -> str:
    """The text of a String node."""
    return str(node["String"]["sval"]) if "String" in node else ""


def _table(rv: dict[str, Any]) -> TableRef:
    return TableRef(rv.get("schemaname", ""), rv["relname"])


def _names(items: list[Node]) -> list[str]:
    return [_s(i) for i in items if "String" in i]


def _unwrap(node: Node) -> tuple[str, dict[str, Any]]:
    ((kind, body),) = node.items()
    return kind, body


# --------------------------------------------------------------------------- walker


class _Walker:
    """Walks one statement's parse tree and fills a _Draft."""

    def __init__(self, draft: _Draft) -> None:
        self.d = draft

    # ---- expressions

    def expr(self, node: Node, scope: _Scope, usage: str) -> set[Base]:
        """Walk any sub-tree; emit columns with `usage`; return the base columns it uses."""
        found: set[Base] = set()
        if isinstance(node, list):
            for item in node:
                found |= self.expr(item, scope, usage)
            return found
        if not isinstance(node, dict):
            return found
        if len(node) == 1:
            kind, body = next(iter(node.items()))
            if isinstance(body, dict) and kind[:1].isupper():
                return self.typed(kind, body, scope, usage)
        if "funcname" in node and "funcformat" in node:  # a bare FuncCall (CALL's funccall)
            return self.func_call(node, scope, usage)
        if "relname" in node and "relpersistence" in node:  # a bare RangeVar
            self.d.reads[_table(node)] = None
            return found
        for value in node.values():
            if isinstance(value, (dict, list)):
                found |= self.expr(value, scope, usage)
        return found

    def typed(self, kind: str, body: dict[str, Any], scope: _Scope, usage: str) -> set[Base]:
        if usage == "output":
            if kind == "A_Indirection":
                # `(c).email` shows the field itself; a subscript computed from a column
                # (`a[ascii(email)]`) is a computation.
                found = self.expr(body.get("arg"), scope, usage)
                found |= self.typed("List", {"items": body.get("indirection")}, scope, usage)
                for name in _names(body.get("indirection") or []):
                    self.d.attributes[name] = None
                return found
            if kind == "SubLink" and body.get("subLinkType") in _SHOWN_SUBLINKS:
                pass  # (SELECT email ...), ARRAY(SELECT ...): the sub-select's list decides
            elif kind not in _SHOWN_KINDS:
                # A column under a function, operator, cast, CASE...: the statement computes
                # on the value, and what it computes (an error, a row count) is not masked.
                usage = "expression"
        if kind == "ColumnRef":
            bases = self.column_ref(body["fields"], scope)
            self.d.emit(bases, usage)
            return bases
        if kind == "FuncCall":
            return self.func_call(body, scope, usage)
        if kind == "A_Expr":
            self.operator(body.get("name") or [])
        elif kind == "SortBy":
            self.operator(body.get("useOp") or [])
        elif kind == "A_Indirection":
            for name in _names(body.get("indirection") or []):
                self.d.attributes[name] = None
        elif kind == "CaseExpr" and body.get("arg") is not None:
            self.operator([{"String": {"sval": "="}}])  # CASE x WHEN v compares x = v
        elif kind == "TypeCast":
            type_name = _names((body.get("typeName") or {}).get("names") or [])
            if type_name:
                self.d.types[".".join(type_name[-2:])] = None
        if kind == "SubLink":
            # The sub-select's output is used where the sub-link stands (e.g. in WHERE).
            self.operator(body.get("operName") or [])
            found = self.expr(body.get("testexpr"), scope, usage)
            outs = self.query(body["subselect"], _Scope(parent=scope, usage=usage))
            for out in outs:
                found |= out.sources
            return found
        if kind in _STATEMENT_KINDS:
            outs = self.query({kind: body}, _Scope(parent=scope, usage=usage))
            found = set()
            for out in outs:
                found |= out.sources
            return found
        if kind == "RangeVar":
            self.d.reads[_table(body)] = None
            return set()
        found = set()
        for value in body.values():
            if isinstance(value, (dict, list)):
                found |= self.expr(value, scope, usage)
        return found

    def column_ref(self, fields: list[Node], scope: _Scope) -> set[Base]:
        star = bool(fields) and "A_Star" in fields[-1]
        names = _names(fields)
        if star:
            if not names:  # bare *: every relation of this level
                found: set[Base] = set()
                for rel in scope.rels:
                    found |= rel.star()
                return found
            starred = scope.find(names[-1])
            return starred.star() if starred is not None else set()
        if not names:
            return set()
        column = names[-1]
        if len(names) >= 2:
            self.d.attributes[column] = None
            qualified = scope.find(names[-2])
            if qualified is not None:
                return qualified.column(column)
            # Not a relation: `composite_column.field` — the first name is the column.
            column = names[0]
        found = set()
        candidates = scope.all_rels()
        if len(candidates) == 1:
            found |= candidates[0].column(column)
        else:
            # Which relation holds it is for the catalog to know: list it against all.
            for rel in candidates:
                found |= rel.column(column)
        whole = scope.find(column)
        if whole is not None:  # `SELECT c FROM customers c` returns whole rows
            found |= whole.star()
        return found

    def func_call(self, body: dict[str, Any], scope: _Scope, usage: str) -> set[Base]:
        name = _function_name(_names(body.get("funcname", [])))
        counts = name == "pg_catalog.count"
        self.d.functions[name] = None
        unqualified = name.rsplit(".", 1)[-1]
        if unqualified in LINEAGE_OPAQUE_BUILTINS:
            # It reads what a text, a cursor or a relation's name says: no lineage of ours
            # reaches its result. Known without the catalog, so flagged even without one.
            self.d.flag("opaque_function")
        if unqualified == "set_config":
            self.identity_setting(body.get("args") or [])
        found: set[Base] = set()
        found |= self.expr(body.get("args"), scope, usage)
        found |= self.expr(body.get("agg_order"), scope, "order")
        found |= self.expr(body.get("agg_filter"), scope, "predicate")
        over = body.get("over")
        if over:
            found |= self.expr(over.get("partitionClause"), scope, "group")
            found |= self.expr(over.get("orderClause"), scope, "order")
        if counts:
            # count(x) is a number of rows: no value of x reaches the output (a user-written
            # count() on the search_path makes the statement opaque instead).
            return set()
        return found

    def operator(self, name: list[Node]) -> None:
        """An operator runs the function behind it: note its name for the catalog to check."""
        parts = _names(name)
        if not parts:
            return
        if parts[-1].upper().endswith(("BETWEEN", "BETWEEN SYMMETRIC")):
            words = [">=", "<="]  # x BETWEEN a AND b is x >= a AND x <= b
        else:
            words = [parts[-1]]
        for word in words:
            self.d.operators[".".join([*parts[:-1], word])] = None

    def identity_setting(self, args: list[Node]) -> None:
        first = args[0] if args else None
        value = _const(first) if first is not None else _UNKNOWN
        if not isinstance(value, str):  # computed name: it could be 'role'
            self.d.flag("set_role")
            self.d.flag("set_session_authorization")
            self.d.flag("enforced_setting")
            return
        if value.strip().lower() in ENFORCEABLE_SETTINGS:
            self.d.flag("enforced_setting")
        flag = _IDENTITY_SETTINGS.get(value.strip().lower())
        if flag:
            self.d.flag("set_role")
            self.d.flag(flag)
        guard = _GUARD_SETTINGS.get(value.strip().lower())
        if guard:
            self.d.flag(guard)

    # ---- FROM

    def from_items(self, items: list[Node] | None, scope: _Scope) -> None:
        for item in items or ():
            for rel in self.from_item(item, scope):
                scope.rels.append(rel)

    def from_item(self, node: Node, scope: _Scope) -> list[_Rel]:
        kind, body = _unwrap(node)
        if kind == "RangeVar":
            return [self.range_var(body, scope)]
        if kind == "JoinExpr":
            left = self.from_item(body["larg"], scope)
            # A LATERAL item on the right of a JOIN sees what is on its left, as the items
            # of a comma list see those before them (`a CROSS JOIN LATERAL f(a.x)`).
            right = self.from_item(body["rarg"], _Scope(parent=scope, rels=list(left)))
            both = [*left, *right]
            inner = _Scope(parent=scope, rels=both)
            if body.get("usingClause") or body.get("isNatural"):
                self.operator([{"String": {"sval": "="}}])  # USING (id) compares with =
                for rel in both:
                    rel.merged = True
            for using in _names(body.get("usingClause") or []):
                for rel in both:
                    self.d.emit(rel.column(using), "join")
            if body.get("isNatural"):
                self.natural_join(left, right)
            self.expr(body.get("quals"), inner, "join")
            alias = body.get("alias")
            if alias:
                return [_Rel(alias["aliasname"], outputs=[_Out(None, frozenset(), tuple(both))])]
            return both
        if kind == "RangeSubselect":
            # LATERAL or not, a sub-select sees the items before it (over-reporting is safe).
            outs = self.query(body["subquery"], _Scope(parent=scope))
            return [_Rel(_alias(body), outputs=_rename(outs, body.get("alias")))]
        if kind == "RangeFunction":
            # FROM f(col), LATERAL generate_series(1, col), ROWS FROM (...): rows computed
            # from the value, so every column of them comes from what the arguments read.
            inputs = self.expr(body.get("functions"), scope, "expression")
            return [_Rel(_alias(body), inputs=frozenset(inputs))]
        if kind == "RangeTableSample":
            rels = self.from_item(body["relation"], scope)
            self.expr(body.get("args"), scope, "other")
            self.expr(body.get("repeatable"), scope, "other")
            return rels
        # XMLTABLE, JSON_TABLE and the like: their columns are computed from their inputs.
        inputs = self.expr(body, scope, "expression")
        return [_Rel(_alias(body), inputs=frozenset(inputs))]

    def natural_join(self, left: list[_Rel], right: list[_Rel]) -> None:
        """NATURAL JOIN compares every column name the two sides share. A side whose names
        are known (sub-selects, CTEs) bounds them; where neither side's names are known
        (tables: the catalog has them, not the parser), every column of both is a join
        column, which over-reports but never misses one."""
        left_names, right_names = _side_names(left), _side_names(right)
        if left_names is not None and right_names is not None:
            shared: set[str] | None = left_names & right_names
        else:
            shared = left_names if left_names is not None else right_names
        for rel in (*left, *right):
            if shared is None:
                self.d.emit(rel.star(), "join")
                continue
            own = _side_names([rel])
            for name in shared:
                if own is None or name in own:
                    self.d.emit(rel.column(name), "join")

    def range_var(self, body: dict[str, Any], scope: _Scope) -> _Rel:
        alias = body.get("alias", {}).get("aliasname") or body["relname"]
        if "schemaname" not in body:
            cte = scope.cte(body["relname"])
            if cte is not None:
                return _Rel(alias, outputs=_rename(cte.outputs or [], body.get("alias")))
        ref = _table(body)
        self.d.reads[ref] = None
        return _Rel(alias, table=ref)

    # ---- queries

    def with_clause(self, node: dict[str, Any] | None, scope: _Scope) -> None:
        if not node:
            return
        recursive = bool(node.get("recursive"))
        for item in node.get("ctes", []):
            cte = item["CommonTableExpr"]
            name = cte["ctename"]
            query = cte["ctequery"]
            kind = next(iter(query))
            if kind in _DML:
                self.d.flag("dml_in_cte")
            placeholder = _Rel(name, outputs=[])
            if recursive:
                # A recursive CTE reads itself: learn its columns first, on a scratch draft.
                scope.ctes[name] = placeholder
                scratch = _Walker(_Draft())
                placeholder.outputs = scratch.query(query, _Scope(parent=scope))
            outs = self.query(query, _Scope(parent=scope))
            aliases = [_s(c) for c in cte.get("aliascolnames", [])]
            placeholder.outputs = (
                _rename(outs, {"colnames": cte.get("aliascolnames")}) if aliases else outs
            )
            scope.ctes[name] = placeholder

    def query(self, node: Node, scope: _Scope) -> list[_Out]:
        """A SELECT/VALUES/DML node; returns its output columns."""
        kind, body = _unwrap(node)
        if kind == "SelectStmt":
            return self.select(body, scope)
        if kind in _DML:
            return self.dml(kind, body, scope)
        # Anything else nested where a query belongs (rule actions, NOTIFY...): still walk it.
        self.expr(body, scope, "other")
        return []

    def select(self, body: dict[str, Any], scope: _Scope) -> list[_Out]:
        self.with_clause(body.get("withClause"), scope)
        if body.get("op", "SETOP_NONE") != "SETOP_NONE":
            left = self.query({"SelectStmt": body["larg"]}, _Scope(parent=scope, usage=scope.usage))
            right = self.query(
                {"SelectStmt": body["rarg"]}, _Scope(parent=scope, usage=scope.usage)
            )
            outs = _union(left, right)
            if body["op"] != "SETOP_UNION" or not body.get("all"):
                # INTERSECT, EXCEPT and UNION (not ALL) compare whole rows: which rows come
                # back says which values are equal, as GROUP BY would.
                for out in (*left, *right):
                    self.d.emit(out.sources, "group")
            self.order_clause(body.get("sortClause"), outs, _Scope(parent=scope))
            self.expr(body.get("limitCount"), scope, "other")
            self.expr(body.get("limitOffset"), scope, "other")
            return outs
        if body.get("valuesLists"):
            rows = [
                self.expr_list(row["List"]["items"], scope, scope.usage)
                for row in body["valuesLists"]
            ]
            return _union_rows(rows)
        into = body.get("intoClause")
        if into:
            self.d.flag("select_into")
            self.d.writes[_table(into["rel"])] = None
        self.from_items(body.get("fromClause"), scope)
        outs = self.targets(body.get("targetList"), scope, scope.usage)
        self.expr(body.get("whereClause"), scope, "predicate")
        self.expr(body.get("havingClause"), scope, "predicate")
        self.group_clause(body.get("groupClause"), outs, scope)
        distinct = body.get("distinctClause") or []
        if distinct and not any(distinct):
            # Plain DISTINCT dedupes on every output column: it compares their values.
            for out in outs:
                self.d.emit(out.sources, "group")
        else:  # DISTINCT ON (expr, 1, alias): like GROUP BY
            self.group_clause([item for item in distinct if item], outs, scope)
        for window in body.get("windowClause") or ():
            w = window["WindowDef"]
            self.expr(w.get("partitionClause"), scope, "group")
            self.expr(w.get("orderClause"), scope, "order")
        self.order_clause(body.get("sortClause"), outs, scope)
        self.expr(body.get("limitCount"), scope, "other")
        self.expr(body.get("limitOffset"), scope, "other")
        if body.get("lockingClause"):
            # FOR UPDATE/SHARE marks each row it returns as locked (a write to the row's
            # header that blocks other writers); PostgreSQL asks for UPDATE privilege.
            self.d.flag("row_lock")
            self.expr(body["lockingClause"], scope, "other")
        return outs

    def targets(self, items: list[Node] | None, scope: _Scope, usage: str) -> list[_Out]:
        """A target list (or RETURNING): each entry's name and the base columns it shows."""
        outs: list[_Out] = []
        for target in items or ():
            rt = target["ResTarget"]
            val = rt.get("val")
            sources = frozenset(self.expr(val, scope, usage))
            star_of: tuple[_Rel, ...] = ()
            spread = False
            name = rt.get("name")
            if name is None and isinstance(val, dict) and "ColumnRef" in val:
                fields = val["ColumnRef"]["fields"]
                if "A_Star" in fields[-1]:
                    qual = _names(fields)
                    found = scope.find(qual[-1]) if qual else None
                    star_of = (found,) if found else tuple(scope.rels)
                    spread = bool(qual) and found is None
                else:
                    name = _s(fields[-1])
            elif name is None and isinstance(val, dict) and "FuncCall" in val:
                name = _s(val["FuncCall"]["funcname"][-1])
            elif isinstance(val, dict) and "A_Indirection" in val:
                # (row).* stands for as many columns as the row's type has.
                indirection = val["A_Indirection"].get("indirection") or [{}]
                spread = "A_Star" in indirection[-1]
            outs.append(_Out(name, sources, star_of, spread))
        return outs

    def expr_list(self, items: list[Node], scope: _Scope, usage: str) -> list[_Out]:
        return [_Out(None, frozenset(self.expr(item, scope, usage))) for item in items]

    def order_clause(self, items: list[Node] | None, outs: list[_Out], scope: _Scope) -> None:
        for item in items or ():
            sort = item["SortBy"]
            self.operator(sort.get("useOp") or [])
            self.d.emit(_output_reference(sort["node"], outs), "order")
            self.expr(sort["node"], scope, "order")

    def group_clause(self, items: list[Node] | None, outs: list[_Out], scope: _Scope) -> None:
        for item in items or ():
            self.d.emit(_output_reference(item, outs), "group")
            self.expr(item, scope, "group")

    # ---- data-modifying statements

    def dml(self, kind: str, body: dict[str, Any], scope: _Scope) -> list[_Out]:
        self.d.dml.append(kind)
        self.with_clause(body.get("withClause"), scope)
        target = _table(body["relation"])
        self.d.writes[target] = None
        alias = body["relation"].get("alias", {}).get("aliasname") or target.table
        rel = _Rel(alias, table=target)
        returning = (body.get("returningClause") or {}).get("exprs") or body.get("returningList")
        if kind == "InsertStmt":
            if returning or body.get("onConflictClause"):
                self.d.reads[target] = None
            cols = [t["ResTarget"]["name"] for t in body.get("cols") or ()]
            self.d.emit([(target.schema, target.table, c) for c in cols or ["*"]], "assignment")
            if body.get("selectStmt"):
                # What the SELECT or VALUES lists is written into the table's columns.
                self.query(body["selectStmt"], _Scope(parent=scope, usage="source"))
            conflict = body.get("onConflictClause")
            if conflict:
                inner = _Scope(parent=scope, rels=[rel, _Rel("excluded", table=target)])
                self.expr(conflict.get("infer"), inner, "predicate")
                self.assignments(conflict.get("targetList"), target, inner)
                self.expr(conflict.get("whereClause"), inner, "predicate")
            scope.rels.append(rel)
        else:
            self.d.reads[target] = None
            scope.rels.append(rel)
            if kind == "UpdateStmt":
                self.from_items(body.get("fromClause"), scope)
                self.assignments(body.get("targetList"), target, scope)
                self.where(body.get("whereClause"), scope)
            elif kind == "DeleteStmt":
                self.from_items(body.get("usingClause"), scope)
                self.where(body.get("whereClause"), scope)
            else:
                self.merge(body, scope, target)
        return self.targets(returning, scope, "returning")

    def assignments(self, items: list[Node] | None, target: TableRef, scope: _Scope) -> None:
        for item in items or ():
            rt = item["ResTarget"]
            self.d.emit([(target.schema, target.table, rt["name"])], "assignment")
            # Values copied into the table are a data flow, not an output: a classified
            # column read here ends up in a written column (usage "source").
            self.expr(rt.get("val"), scope, "source")

    def where(self, clause: Node | None, scope: _Scope) -> None:
        if clause is None or _is_true(clause) or _tautology(clause):
            self.d.unfiltered = True
        else:
            self.d.filtered = True
        self.expr(clause, scope, "predicate")

    def merge(self, body: dict[str, Any], scope: _Scope, target: TableRef) -> None:
        for rel in self.from_item(body["sourceRelation"], scope):
            scope.rels.append(rel)
        self.where(body.get("joinCondition"), scope)
        for item in body.get("mergeWhenClauses") or ():
            when = item["MergeWhenClause"]
            self.expr(when.get("condition"), scope, "predicate")
            if when.get("commandType") == "CMD_INSERT":
                cols = [t["ResTarget"]["name"] for t in when.get("targetList") or ()]
                self.d.emit([(target.schema, target.table, c) for c in cols or ["*"]], "assignment")
                self.expr(when.get("values"), scope, "source")
            else:
                self.assignments(when.get("targetList"), target, scope)


_STATEMENT_KINDS = {"SelectStmt", *_DML}
# Nodes in an output list that pass a column's value through as it is (masked by lineage):
# everything else computes on it (usage "expression"). A sub-select decides for itself.
_SHOWN_KINDS = {"ColumnRef", "List", "ResTarget", "A_Const", "ParamRef", *_STATEMENT_KINDS}
_SHOWN_SUBLINKS = {"EXPR_SUBLINK", "ARRAY_SUBLINK", "EXISTS_SUBLINK"}


def _alias(body: dict[str, Any]) -> str:
    alias = body.get("alias")
    return str(alias["aliasname"]) if alias else ""


def _rename(outs: list[_Out], alias: dict[str, Any] | None) -> list[_Out]:
    colnames = _names((alias or {}).get("colnames") or [])
    if not colnames:
        return outs
    renamed = [
        _Out(colnames[i] if i < len(colnames) else o.name, o.sources, o.star_of)
        for i, o in enumerate(outs)
    ]
    return renamed


def _side_names(rels: list[_Rel]) -> set[str] | None:
    """The column names of one side of a join, or None where only the catalog knows them."""
    names: set[str] = set()
    for rel in rels:
        if rel.table is not None or rel.outputs is None:
            return None
        for out in rel.outputs:
            if out.name is None or out.star_of:
                return None
            names.add(out.name)
    return names


def _union(left: list[_Out], right: list[_Out]) -> list[_Out]:
    if len(left) == len(right) and not any(o.star_of or o.spread for o in (*left, *right)):
        return [_Out(a.name, a.sources | b.sources) for a, b in zip(left, right, strict=True)]
    # Arms whose widths the parser cannot match: every name is found, no column is placed.
    return [_Out(o.name, o.sources, o.star_of, spread=True) for o in (*left, *right)]


def _output_columns(outs: list[_Out]) -> tuple[OutputColumn, ...]:
    """The output list column by column: `*` over derived relations opened up, over a base
    table left for the catalog to count, over anything else a spread of unknown width."""
    columns: list[OutputColumn] = []

    def relation(rel: _Rel) -> None:
        if rel.merged or (rel.table is None and rel.outputs is None):
            columns.append(OutputColumn(frozenset(rel.star()), spread=True))
        elif rel.table is not None:
            columns.append(OutputColumn(frozenset(rel.star()), table=rel.table))
        else:
            add(rel.outputs or [])

    def add(items: list[_Out]) -> None:
        for out in items:
            if out.spread:
                sources = set(out.sources)
                for rel in out.star_of:
                    sources |= rel.star()
                columns.append(OutputColumn(frozenset(sources), spread=True))
            elif out.star_of:
                for rel in out.star_of:
                    relation(rel)
            else:
                columns.append(OutputColumn(out.sources))

    add(outs)
    return tuple(columns)


def _union_rows(rows: list[list[_Out]]) -> list[_Out]:
    width = max(len(r) for r in rows)
    outs: list[_Out] = []
    for i in range(width):
        sources: frozenset[Base] = frozenset()
        for row in rows:
            if i < len(row):
                sources |= row[i].sources
        outs.append(_Out(f"column{i + 1}", sources))
    return outs


def _output_reference(node: Node, outs: list[_Out]) -> set[Base]:
    """ORDER BY 2 / ORDER BY alias name an output column: its sources are used there."""
    found: set[Base] = set()
    if not isinstance(node, dict):
        return found
    if "A_Const" in node:
        _literals.read = True
        position = node["A_Const"].get("ival", {}).get("ival")
        if isinstance(position, int):
            if any(o.star_of for o in outs):
                for o in outs:
                    found |= o.sources
            elif 0 < position <= len(outs):
                found |= outs[position - 1].sources
    elif "ColumnRef" in node:
        fields = node["ColumnRef"]["fields"]
        if len(fields) == 1 and "String" in fields[0]:
            name = _s(fields[0])
            for o in outs:
                if o.name == name:
                    found |= o.sources
    return found


def _function_name(parts: list[str]) -> str:
    parts = [p.lower() for p in parts]
    if not parts:
        return "pg_catalog.?"
    if len(parts) == 1:
        return f"pg_catalog.{parts[0]}"
    return f"{parts[-2]}.{parts[-1]}"  # a leading database name must be the current one


# --------------------------------------------------------------------------- constant folding

_UNKNOWN = object()
_TRUE_TEXT = {"t", "true", "y", "yes", "on", "1"}
_FALSE_TEXT = {"f", "false", "n", "no", "off", "0"}


def _bool_text(text: str) -> bool | None:
    """PostgreSQL's parse_bool: surrounding space and case ignored, unique prefixes accepted."""
    t = text.strip().lower()
    if t and ("true".startswith(t) or "yes".startswith(t) or t in ("on", "1")):
        return True
    if t and ("false".startswith(t) or "no".startswith(t) or t in ("of", "off", "0")):
        return False
    return None


def _is_true(node: Node) -> bool:
    """A condition true for every row: `true`, and an untyped literal such as `'t'`, which
    PostgreSQL reads as a boolean where a condition is expected."""
    value = _const(node)
    return value is True or (isinstance(value, str) and _bool_text(value) is True)


def _const(node: Node) -> Any:
    """The value of a constant expression, or _UNKNOWN; enough to see `WHERE 1=1` for what it is."""
    if not isinstance(node, dict) or len(node) != 1:
        return _UNKNOWN
    kind, body = next(iter(node.items()))
    if kind == "A_Const":
        _literals.read = True
        if body.get("isnull"):
            return None
        if "boolval" in body:
            return bool(body["boolval"].get("boolval", False))
        if "ival" in body:
            return int(body["ival"].get("ival", 0))
        if "fval" in body:
            return float(body["fval"]["fval"])
        if "sval" in body:
            return str(body["sval"].get("sval", ""))
        return _UNKNOWN
    if kind == "TypeCast":
        value = _const(body.get("arg"))
        type_name = _names(body.get("typeName", {}).get("names", []))
        if type_name and type_name[-1] == "bool":
            if isinstance(value, str):
                text = value.strip().lower()
                return True if text in _TRUE_TEXT else False if text in _FALSE_TEXT else _UNKNOWN
            if isinstance(value, int):
                return value != 0
        return value
    if kind == "BoolExpr":
        values = [_const(a) for a in body.get("args", [])]
        op = body.get("boolop")
        if op == "NOT_EXPR":
            return (not values[0]) if isinstance(values[0], bool) else _UNKNOWN
        if op == "OR_EXPR":
            return True if True in values else _UNKNOWN
        if op == "AND_EXPR":
            return True if all(v is True for v in values) else _UNKNOWN
        return _UNKNOWN
    if kind == "A_Expr" and body.get("kind") == "AEXPR_OP":
        op = _names(body.get("name", []))
        left = _const(body.get("lexpr"))
        if left is _UNKNOWN or left is None or not op:
            # Unknown whatever the right side is: its literal decides nothing (`aid = 42`).
            return _UNKNOWN
        right = _const(body.get("rexpr"))
        if right is _UNKNOWN or right is None:
            return _UNKNOWN
        try:
            return _COMPARE[op[-1]](left, right) if op[-1] in _COMPARE else _UNKNOWN
        except TypeError:
            return _UNKNOWN
    if kind == "NullTest":
        value = _const(body.get("arg"))
        if value is _UNKNOWN:
            return _UNKNOWN
        return (value is None) == (body.get("nulltesttype") == "IS_NULL")
    if kind == "BooleanTest":
        value = _const(body.get("arg"))
        test = body.get("booltesttype")
        if test == "IS_TRUE" and isinstance(value, bool):
            return value
        if test == "IS_NOT_FALSE" and isinstance(value, bool):
            return value
        return _UNKNOWN
    return _UNKNOWN


_COMPARE = {
    "=": lambda a, b: a == b,
    "<>": lambda a, b: a != b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
}


def _tautology(node: Node) -> bool:
    """`x = x`, `x >= x`, `p OR true`...: true for every row that has a value."""
    if not isinstance(node, dict) or len(node) != 1:
        return False
    kind, body = next(iter(node.items()))
    if kind == "A_Expr" and body.get("kind") == "AEXPR_OP":
        op = _names(body.get("name", []))
        if not op or op[-1] not in ("=", "<=", ">=") or body.get("lexpr") is None:
            return False
        left, right = _strip_locations(body.get("lexpr")), _strip_locations(body.get("rexpr"))
        if left == right:
            # `1 = 1` is one with `1 = 2` but for the literals' values: the answer is theirs.
            _literals.read = _literals.read or _has_literal(left)
            return True
        if _literals.read is False and _has_literal(left) and _has_literal(right):
            _literals.read = True
        return False
    if kind == "BoolExpr" and body.get("boolop") == "OR_EXPR":
        return any(_is_true(a) or _tautology(a) for a in body.get("args", []))
    if kind == "BoolExpr" and body.get("boolop") == "AND_EXPR":
        return all(_is_true(a) or _tautology(a) for a in body.get("args", []))
    return False


def _has_literal(node: Node) -> bool:
    if isinstance(node, dict):
        return "A_Const" in node or any(_has_literal(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_literal(v) for v in node)
    return False


def _strip_locations(node: Node) -> Node:
    if isinstance(node, dict):
        return {k: _strip_locations(v) for k, v in node.items() if k != "location"}
    if isinstance(node, list):
        return [_strip_locations(v) for v in node]
    return node


# Statements whose facts may be shared by texts that differ only in literal values (see
# analyze_shaped): queries and DML, where a literal is a value, never a name or an option.
_SHAPED_KINDS = frozenset({"SelectStmt", *_DML})


class _LiteralReads(threading.local):
    """Whether the statement being analysed had a fact decided by a literal's value (`WHERE
    1 = 1`, `ORDER BY 2`, `set_config('role', ...)`): then its facts are its text's own."""

    read = False


_literals = _LiteralReads()

# --------------------------------------------------------------------------- statements


def _analyze_statement(node: Node, text: str) -> StatementFacts:
    kind, body = _unwrap(node)
    draft = _Draft()
    walker = _Walker(draft)
    command, category = _statement(kind, body, walker, draft)
    return _finish(text, command, category, draft, kind, body)


def _finish(
    text: str, command: str, category: Category, draft: _Draft, kind: str, body: dict[str, Any]
) -> StatementFacts:
    if any(t in _SETTINGS_VIEW for t in draft.writes):
        draft.flag("set_role")
        draft.flag("set_session_authorization")
        draft.flag("enforced_setting")
    prepared_name: str | None = None
    setting: tuple[str, str | None] | None = None
    if kind == "PrepareStmt":
        prepared_name = body["name"]
    elif kind in ("ExecuteStmt", "DeallocateStmt"):
        prepared_name = body.get("name")
    elif "execute" in draft.flags:
        prepared_name = _execute_name(body)
    portal = body.get("portalname") if kind in _CURSOR_KINDS else None
    if kind == "VariableSetStmt" and body.get("name"):
        name = str(body["name"])
        setting = (name, _setting_value(body, quote=name == "search_path"))
    if draft.dml and any(k in ("UpdateStmt", "DeleteStmt", "MergeStmt") for k in draft.dml):
        has_where = draft.filtered and not draft.unfiltered
    else:
        where = _top_where(kind, body)
        has_where = where is not None and not _is_true(where) and not _tautology(where)
    return StatementFacts(
        text=text,
        fingerprint=_fingerprint(text),
        command=command,
        category=category,
        reads=tuple(draft.reads),
        writes=tuple(draft.writes),
        columns=tuple(draft.columns),
        functions=tuple(draft.functions),
        operators=tuple(draft.operators),
        attributes=tuple(draft.attributes),
        types=tuple(draft.types),
        has_where=has_where,
        flags=tuple(draft.flags),
        prepared_name=prepared_name,
        setting=setting,
        portal=portal,
        outputs=None if draft.outputs is None else _output_columns(draft.outputs),
    )


_CURSOR_KINDS = frozenset({"DeclareCursorStmt", "FetchStmt", "ClosePortalStmt"})


def _top_where(kind: str, body: dict[str, Any]) -> Node | None:
    if kind == "SelectStmt":
        return body.get("whereClause")
    if kind in ("ExplainStmt", "PrepareStmt", "DeclareCursorStmt", "CreateTableAsStmt"):
        inner = body.get("query")
        if isinstance(inner, dict):
            k, b = _unwrap(inner)
            return _top_where(k, b)
    if kind == "CopyStmt" and body.get("query"):
        k, b = _unwrap(body["query"])
        return _top_where(k, b)
    return None


def _execute_name(body: dict[str, Any]) -> str | None:
    query = body.get("query")
    if isinstance(query, dict) and "ExecuteStmt" in query:
        return str(query["ExecuteStmt"]["name"])
    return None


_PLAIN_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]*")


def _setting_value(body: dict[str, Any], *, quote: bool) -> str | None:
    """The value as PostgreSQL's SHOW would print it; schema names quoted where needed."""
    if body.get("kind") != "VAR_SET_VALUE":
        return None
    parts: list[str] = []
    for arg in body.get("args") or ():
        value = _const(arg)
        if value is _UNKNOWN or value is None:
            return None
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if quote and not _PLAIN_IDENTIFIER.fullmatch(text):
            text = '"' + text.replace('"', '""') + '"'
        parts.append(text)
    return ", ".join(parts)


def _query_category(draft: _Draft, base: Category = "read") -> Category:
    if draft.dml:
        return "write"
    return base


_Handler = Callable[[dict[str, Any], _Walker, _Draft], tuple[str, Category]]


def _statement(kind: str, body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    handler = _HANDLERS.get(kind)
    if handler is not None:
        return handler(body, w, d)
    return _generic(kind, body, w)


def _select_stmt(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    d.outputs = w.query({"SelectStmt": body}, _Scope())
    if "select_into" in d.flags:
        return "SELECT INTO", "ddl"
    if body.get("valuesLists") and not body.get("fromClause"):
        return "VALUES", _query_category(d)
    return "SELECT", _query_category(d)


def _dml_stmt(kind: str) -> _Handler:
    def handle(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
        d.outputs = w.query({kind: body}, _Scope())  # RETURNING
        return _DML_COMMAND[kind], "write"

    return handle


def _explain(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    analyze_ = False
    for option in body.get("options") or ():
        opt = option["DefElem"]
        if opt["defname"] == "analyze":
            arg = opt.get("arg")
            value = _const(arg) if arg is not None else True
            if isinstance(arg, dict) and "String" in arg:
                value = _s(arg)
            # Anything other than a clear "off" counts as on: the statement may run.
            analyze_ = (
                not (isinstance(value, str) and value.lower() in _FALSE_TEXT) and value is not False
            )
    inner_kind, inner = _unwrap(body["query"])
    _, category = _statement(inner_kind, inner, w, d)
    d.outputs = None  # EXPLAIN returns the plan, not the statement's rows
    if analyze_:
        d.flag("explain_analyze")
        return "EXPLAIN", category
    # Plain EXPLAIN only plans: what the statement would read, nothing it would write or lock.
    d.writes.clear()
    for flag in ("select_into", "dml_in_cte", "row_lock"):
        d.flags.pop(flag, None)
    return "EXPLAIN", "read"


def _copy(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    if body.get("is_program"):
        d.flag("copy_program")
    elif body.get("filename") is not None:
        d.flag("copy_server_file")
    category: Category
    if body.get("query"):
        w.query(body["query"], _Scope())
        category = _query_category(d)
    else:
        table = _table(body["relation"])
        scope = _Scope(rels=[_Rel(table.table, table=table)])
        cols = _names(body.get("attlist") or []) or ["*"]
        if body.get("is_from"):
            d.writes[table] = None
            d.emit([(table.schema, table.table, c) for c in cols], "assignment")
            w.expr(body.get("whereClause"), scope, "predicate")
            category = "write"
        else:
            d.reads[table] = None
            d.emit([(table.schema, table.table, c) for c in cols], "output")
            category = "read"
    w.expr(body.get("options"), _Scope(), "other")
    return "COPY", category


def _prepare(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    d.flag("prepare")
    inner_kind, inner = _unwrap(body["query"])
    return _statement(inner_kind, inner, w, d)


def _execute(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    # What it runs is in the session's prepared registry; the params still call functions.
    d.flag("execute")
    w.expr(body.get("params"), _Scope(), "other")
    return "EXECUTE", "unknown"


def _declare(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    inner_kind, inner = _unwrap(body["query"])
    _, category = _statement(inner_kind, inner, w, d)
    return "DECLARE", category


def _create_table_as(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    d.writes[_table(body["into"]["rel"])] = None
    query = body["query"]
    if "ExecuteStmt" in query:
        _execute(query["ExecuteStmt"], w, d)
    else:
        w.query(query, _Scope())
    if body.get("objtype") == "OBJECT_MATVIEW":
        return "CREATE MATERIALIZED VIEW", "ddl"
    return "CREATE TABLE AS", "ddl"


def _set(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    kind = body.get("kind", "")
    name = str(body.get("name", "")).lower()
    reset = kind in ("VAR_RESET", "VAR_RESET_ALL")
    if kind == "VAR_RESET_ALL":
        # RESET ALL leaves role and session_authorization alone (PostgreSQL excludes them
        # from it) and returns every other setting to its value at login; pgwarden reads
        # search_path again afterwards and ends the session if standard_conforming_strings
        # came back off. Connection pools send it on every checkout.
        return "RESET ALL", "session"
    if name == "role":
        d.flag("set_role")
        return ("RESET ROLE" if reset else "SET ROLE"), "dcl"
    if name == "session_authorization":
        d.flag("set_session_authorization")
        return ("RESET SESSION AUTHORIZATION" if reset else "SET SESSION AUTHORIZATION"), "dcl"
    if name in _GUARD_SETTINGS:
        d.flag(_GUARD_SETTINGS[name])
    if name == "transaction":
        _read_write(body.get("args"), d)
        return "SET TRANSACTION", "tcl"
    if name == "session characteristics":
        _read_write(body.get("args"), d)
        return "SET SESSION CHARACTERISTICS", "session"
    w.expr(body.get("args"), _Scope(), "other")
    return ("RESET" if reset else "SET"), "session"


def _transaction(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    _read_write(body.get("options"), d)
    return _TRANSACTION_COMMANDS.get(body.get("kind", ""), "TRANSACTION"), "tcl"


def _read_write(options: list[Node] | None, d: _Draft) -> None:
    """BEGIN/START TRANSACTION/SET TRANSACTION/SET SESSION CHARACTERISTICS ... READ WRITE
    (transaction_read_only = 0): flagged "read_write", since it lifts an enforced read-only."""
    for option in options or ():
        kind, body = _unwrap(option)
        read_only = body.get("defname") == "transaction_read_only"
        if kind == "DefElem" and read_only and _const(body.get("arg")) != 1:
            d.flag("read_write")


def _alter_defaults(command: str, category: Category) -> _Handler:
    """ALTER ROLE/DATABASE ... SET/RESET: another session's defaults, flagged
    "enforced_setting" when it names a setting pgwarden can enforce (or RESET ALL)."""

    def handle(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
        setstmt = body.get("setstmt") or {}
        name = str(setstmt.get("name") or "").lower()
        if name in ENFORCEABLE_SETTINGS or setstmt.get("kind") == "VAR_RESET_ALL":
            d.flag("enforced_setting")
        w.expr(body, _Scope(), "other")
        return command, category

    return handle


_TRANSACTION_COMMANDS = {
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "START TRANSACTION",
    "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK TO SAVEPOINT",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}


def _object_word(objtype: str | None) -> str:
    return (
        (objtype or "OBJECT_UNKNOWN")
        .removeprefix("OBJECT_")
        .replace("_", " ")
        .replace("MATVIEW", "MATERIALIZED VIEW")
    )


_TABLE_LIKE = {
    "OBJECT_TABLE",
    "OBJECT_VIEW",
    "OBJECT_MATVIEW",
    "OBJECT_FOREIGN_TABLE",
    "OBJECT_SEQUENCE",
}


def _drop(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    objtype = body.get("removeType")
    if objtype in _TABLE_LIKE:
        for obj in body.get("objects") or ():
            parts = _names(obj["List"]["items"]) if "List" in obj else []
            if parts:
                d.writes[TableRef(parts[-2] if len(parts) > 1 else "", parts[-1])] = None
    if objtype == "OBJECT_ROLE":
        return "DROP ROLE", "dcl"
    if objtype in ("OBJECT_POLICY",):
        return "DROP POLICY", "dcl"
    return f"DROP {_object_word(objtype)}", "ddl"


def _relation_ddl(command: str, category: Category = "ddl") -> _Handler:
    """DDL on one relation (`relation` field): writes it, walks the rest for functions."""

    def handle(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
        key = "sequence" if "sequence" in body else "relation"
        rel = body.get(key)
        if isinstance(rel, dict) and "relname" in rel:
            d.writes[_table(rel)] = None
        rest = {k: v for k, v in body.items() if k != key}
        w.expr(rest, _Scope(), "other")
        return command, category

    return handle


def _alter_table(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    objtype = body.get("objtype", "OBJECT_TABLE")
    command = f"ALTER {_object_word(objtype)}"
    rel = body.get("relation")
    if objtype in _TABLE_LIKE and isinstance(rel, dict):
        d.writes[_table(rel)] = None
    w.expr(body.get("cmds"), _Scope(), "other")
    return command, "ddl"


def _rename_stmt(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    objtype = body.get("renameType")
    if objtype == "OBJECT_COLUMN":
        objtype = body.get("relationType")
    rel = body.get("relation")
    if objtype in _TABLE_LIKE and isinstance(rel, dict):
        d.writes[_table(rel)] = None
    if objtype == "OBJECT_ROLE":
        return "ALTER ROLE", "dcl"
    return f"ALTER {_object_word(objtype)}", "ddl"


def _trigger(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    d.writes[_table(body["relation"])] = None
    # The trigger function runs on every later write to the table.
    d.functions[_function_name(_names(body.get("funcname") or []))] = None
    w.expr(body.get("whenClause"), _Scope(), "other")
    return "CREATE TRIGGER", "ddl"


def _view(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    d.writes[_table(body["view"])] = None
    w.query(body["query"], _Scope())
    return "CREATE VIEW", "ddl"


def _create_function(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    # The body is code that runs later, in any language the server has (even C).
    d.flag("procedural")
    w.expr(body.get("parameters"), _Scope(), "other")
    w.expr(body.get("sql_body"), _Scope(), "other")
    return ("CREATE PROCEDURE" if body.get("is_procedure") else "CREATE FUNCTION"), "ddl"


def _create_schema(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    for element in body.get("schemaElts") or ():
        kind, inner = _unwrap(element)
        _statement(kind, inner, w, d)
    return "CREATE SCHEMA", "ddl"


def _grant(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    return ("GRANT" if body.get("is_grant") else "REVOKE"), "dcl"


def _create_role(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    word = {"ROLESTMT_USER": "USER", "ROLESTMT_GROUP": "GROUP"}.get(
        body.get("stmt_type", ""), "ROLE"
    )
    return f"CREATE {word}", "dcl"


def _fixed(command: str, category: Category, *flags: str) -> _Handler:
    def handle(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
        for flag in flags:
            d.flag(flag)
        w.expr(body, _Scope(), "other")
        return command, category

    return handle


def _call(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    w.expr(body.get("funccall"), _Scope(), "other")
    # A procedure exists for its side effects: treat the call as a write.
    return "CALL", "write"


def _vacuum(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    for rel in body.get("rels") or ():
        relation = rel["VacuumRelation"].get("relation")
        if relation:
            d.reads[_table(relation)] = None
    return ("VACUUM" if body.get("is_vacuumcmd") else "ANALYZE"), "utility"


def _truncate(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    for rel in body.get("relations") or ():
        d.writes[_table(rel["RangeVar"])] = None
    d.dml.append("TruncateStmt")
    d.unfiltered = True
    return "TRUNCATE", "write"


def _discard(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    if body.get("target") == "DISCARD_ALL":
        # DISCARD ALL is SET SESSION AUTHORIZATION DEFAULT, RESET ALL, CLOSE ALL, DEALLOCATE
        # ALL and more: back to the login identity and state, nothing beyond it (pools send
        # it on every checkout). The flag tells the session to forget prepared statements.
        d.flag("discard_all")
    return "DISCARD", "session"


def _fetch(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    return ("MOVE" if body.get("ismove") else "FETCH"), "read"


def _refresh(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    d.writes[_table(body["relation"])] = None
    return "REFRESH MATERIALIZED VIEW", "write"


def _lock(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    for rel in body.get("relations") or ():
        d.reads[_table(rel["RangeVar"])] = None
    return "LOCK", "utility"


def _rule(body: dict[str, Any], w: _Walker, d: _Draft) -> tuple[str, Category]:
    d.writes[_table(body["relation"])] = None
    scope = _Scope()
    w.expr(body.get("whereClause"), scope, "predicate")
    for action in body.get("actions") or ():
        w.query(action, _Scope())
    return "CREATE RULE", "ddl"


_HANDLERS: dict[str, _Handler] = {
    "SelectStmt": _select_stmt,
    "InsertStmt": _dml_stmt("InsertStmt"),
    "UpdateStmt": _dml_stmt("UpdateStmt"),
    "DeleteStmt": _dml_stmt("DeleteStmt"),
    "MergeStmt": _dml_stmt("MergeStmt"),
    "ExplainStmt": _explain,
    "CopyStmt": _copy,
    "PrepareStmt": _prepare,
    "ExecuteStmt": _execute,
    "DeallocateStmt": _fixed("DEALLOCATE", "session"),
    "DeclareCursorStmt": _declare,
    "FetchStmt": _fetch,
    # Closing a cursor (or all of them) ends what DECLARE started; drivers do it routinely.
    "ClosePortalStmt": _fixed("CLOSE", "session"),
    "CreateTableAsStmt": _create_table_as,
    "CreateStmt": _relation_ddl("CREATE TABLE"),
    "CreateForeignTableStmt": _fixed("CREATE FOREIGN TABLE", "ddl"),
    "IndexStmt": _relation_ddl("CREATE INDEX"),
    "CreateTrigStmt": _trigger,
    "CreatePolicyStmt": _fixed("CREATE POLICY", "dcl"),
    "AlterPolicyStmt": _fixed("ALTER POLICY", "dcl"),
    "RuleStmt": _rule,
    "ViewStmt": _view,
    "AlterTableStmt": _alter_table,
    "RenameStmt": _rename_stmt,
    "DropStmt": _drop,
    "CreateFunctionStmt": _create_function,
    "CreateSchemaStmt": _create_schema,
    "CreateExtensionStmt": _fixed("CREATE EXTENSION", "ddl"),
    "AlterExtensionStmt": _fixed("ALTER EXTENSION", "ddl"),
    "GrantStmt": _grant,
    "GrantRoleStmt": _grant,
    "CreateRoleStmt": _create_role,
    "AlterRoleStmt": _fixed("ALTER ROLE", "dcl"),
    "AlterRoleSetStmt": _alter_defaults("ALTER ROLE", "dcl"),
    "DropRoleStmt": _fixed("DROP ROLE", "dcl"),
    "ReassignOwnedStmt": _fixed("REASSIGN OWNED", "dcl"),
    "DropOwnedStmt": _fixed("DROP OWNED", "dcl"),
    "AlterDefaultPrivilegesStmt": _fixed("ALTER DEFAULT PRIVILEGES", "dcl"),
    "AlterOwnerStmt": _fixed("ALTER OWNER", "dcl"),
    "CreateUserMappingStmt": _fixed("CREATE USER MAPPING", "dcl"),
    "AlterUserMappingStmt": _fixed("ALTER USER MAPPING", "dcl"),
    # Server configuration and shared libraries: outside any one database's DDL.
    "AlterSystemStmt": _fixed("ALTER SYSTEM", "dcl"),
    "LoadStmt": _fixed("LOAD", "dcl"),
    "TransactionStmt": _transaction,
    "VacuumStmt": _vacuum,
    "ConstraintsSetStmt": _fixed("SET CONSTRAINTS", "tcl"),
    "CheckPointStmt": _fixed("CHECKPOINT", "utility"),
    "ReindexStmt": _fixed("REINDEX", "utility"),
    "ClusterStmt": _fixed("CLUSTER", "utility"),
    "ListenStmt": _fixed("LISTEN", "session"),
    "UnlistenStmt": _fixed("UNLISTEN", "session"),
    "NotifyStmt": _fixed("NOTIFY", "session"),
    "VariableShowStmt": _fixed("SHOW", "session"),
    "DiscardStmt": _discard,
    "VariableSetStmt": _set,
    "DoStmt": _fixed("DO", "utility", "procedural"),
    "CallStmt": _call,
    "TruncateStmt": _truncate,
    "RefreshMatViewStmt": _refresh,
    "LockStmt": _lock,
    "CreatedbStmt": _fixed("CREATE DATABASE", "ddl"),
    "DropdbStmt": _fixed("DROP DATABASE", "ddl"),
    "AlterDatabaseStmt": _fixed("ALTER DATABASE", "ddl"),
    "AlterDatabaseSetStmt": _alter_defaults("ALTER DATABASE", "ddl"),
    "CommentStmt": _fixed("COMMENT", "ddl"),
    "CreateSeqStmt": _relation_ddl("CREATE SEQUENCE"),
    "AlterSeqStmt": _relation_ddl("ALTER SEQUENCE"),
    "CompositeTypeStmt": _fixed("CREATE TYPE", "ddl"),
    "CreateEnumStmt": _fixed("CREATE TYPE", "ddl"),
    "CreateDomainStmt": _fixed("CREATE DOMAIN", "ddl"),
    "DefineStmt": _fixed("CREATE", "ddl"),
    "CreatePLangStmt": _fixed("CREATE LANGUAGE", "ddl", "procedural"),
    "CreateEventTrigStmt": _fixed("CREATE EVENT TRIGGER", "ddl", "procedural"),
}


_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def _generic(kind: str, body: dict[str, Any], w: _Walker) -> tuple[str, Category]:
    """Statements without a handler: a name from the node type, ddl-or-utility by its verb."""
    words = _CAMEL.sub(" ", kind.removesuffix("Stmt")).upper()
    w.expr(body, _Scope(), "other")
    verb = words.split(" ", 1)[0]
    category: Category = (
        "ddl" if verb in ("CREATE", "ALTER", "DROP", "COMMENT", "SEC", "IMPORT") else "utility"
    )
    return words, category
