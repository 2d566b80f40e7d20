"""Turn SQL text into one StatementFacts per statement, describing what each really does."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson
from pglast.parser import fingerprint as _pg_fingerprint
from pglast.parser import parse_sql_json

from gateway.sql.facts import (
    Category,
    StatementFacts,
    TableRef,
)
from gateway.sql.walker import (
    _DML,
    _FALSE_TEXT,
    _GUARD_SETTINGS,
    _UNKNOWN,
    ENFORCEABLE_SETTINGS,
    Node,
    _const,
    _Draft,
    _function_name,
    _is_true,
    _literals,
    _names,
    _output_columns,
    _Rel,
    _s,
    _Scope,
    _table,
    _tautology,
    _unwrap,
    _Walker,
)

__all__ = ["analyze", "analyze_shaped", "unknown_facts"]


_DML_COMMAND = {
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
}
# pg_settings is a view whose UPDATE rule calls set_config(): writing it changes settings.
_SETTINGS_VIEW = {TableRef("", "pg_settings"), TableRef("pg_catalog", "pg_settings")}


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


# Statements whose facts may be shared by texts that differ only in literal values (see
# analyze_shaped): queries and DML, where a literal is a value, never a name or an option.
_SHAPED_KINDS = frozenset({"SelectStmt", *_DML})


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
