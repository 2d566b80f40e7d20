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
    """The databases `facts`' statement fails on (55006, after waiting 5 s) while another
    connection is open to them: the one DROP DATABASE drops (FORCE ends only client
    backends), the one ALTER DATABASE renames or moves to another tablespace, and the
    template CREATE DATABASE copies. pgwarden must not hold them open itself."""
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
        elif isinstance(stmt, ast.AlterDatabaseStmt):
            if any(o.defname == "tablespace" for o in stmt.options or ()):
                found[stmt.dbname] = None
        elif isinstance(stmt, ast.CreatedbStmt):
            template: str | None = _DEFAULT_TEMPLATE
            for option in stmt.options or ():
                if option.defname == "template" and isinstance(option.arg, ast.String):
                    template = option.arg.sval
            found[template] = None
    return tuple(name for name in found if name)
