"""Which databases a statement needs free of every other connection to run at all."""

from __future__ import annotations

import pglast
from pglast import ast
from pglast.enums import ObjectType

from gateway.sql.facts import StatementFacts

__all__ = ["databases_held_by_statement"]

# The commands whose statements may name such a database; anything else is not parsed again.
_COMMANDS = frozenset({"DROP DATABASE", "ALTER DATABASE", "CREATE DATABASE"})
# CREATE DATABASE copies this one unless TEMPLATE names another.
_DEFAULT_TEMPLATE = "template1"


def databases_held_by_statement(facts: StatementFacts) -> tuple[str, ...]:
    """The databases whose name `facts`' statement frees, moves or copies: the one DROP
    DATABASE drops, the one ALTER DATABASE renames (old and new name) or moves to another
    tablespace, the template CREATE DATABASE copies and the database it creates. The first
    kind fail (55006, after waiting 5 s) while another connection is open to them, so
    pgwarden must not hold them open itself; what pgwarden read from any of them (OIDs,
    names) may afterwards describe another database of that name."""
    if facts.command not in _COMMANDS:
        return ()
    try:
        statements = pglast.parse_sql(facts.text)
    except pglast.parser.ParseError:
        return ()  # the analysis called it unknown: it is never forwarded
    found: dict[str | None, None] = {}
    for raw in statements:
        stmt = raw.stmt
        if isinstance(stmt, ast.DropdbStmt):
            found[stmt.dbname] = None
        elif isinstance(stmt, ast.RenameStmt) and stmt.renameType == ObjectType.OBJECT_DATABASE:
            found[stmt.subname] = None
            found[stmt.newname] = None
        elif isinstance(stmt, ast.AlterDatabaseStmt):
            if any(o.defname == "tablespace" for o in stmt.options or ()):
                found[stmt.dbname] = None
        elif isinstance(stmt, ast.CreatedbStmt):
            found[stmt.dbname] = None
            template: str | None = _DEFAULT_TEMPLATE
            for option in stmt.options or ():
                if option.defname == "template" and isinstance(option.arg, ast.String):
                    template = option.arg.sval
            found[template] = None
    return tuple(name for name in found if name)
