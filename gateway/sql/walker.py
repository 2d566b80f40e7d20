"""The walk over one statement's parse tree: scopes, relations, output columns and the
lineage of each, collected into a draft of its facts (analysis.py turns drafts into facts)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.sql.facts import (
    LINEAGE_OPAQUE_BUILTINS,
    ColumnRef,
    OutputColumn,
    TableRef,
)

# (schema, table, column): a column of a base relation; column "*" means all of them.
Base = tuple[str, str, str]
Node = Any  # a decoded JSON parse-tree value: dict, list, str, int, bool

_DML = ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")
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


class _LiteralReads(threading.local):
    """Whether the statement being analysed had a fact decided by a literal's value (`WHERE
    1 = 1`, `ORDER BY 2`, `set_config('role', ...)`): then its facts are its text's own."""

    read = False


_literals = _LiteralReads()
