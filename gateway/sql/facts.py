"""What one SQL statement really does, as the policy input's `statement` section describes it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

Category = Literal["read", "write", "ddl", "dcl", "tcl", "session", "utility", "unknown"]

# Built-in functions that run SQL given as text, read a cursor, or serialise a relation,
# schema or database named by its OID or name: what they read (and return) is as invisible
# to lineage as the body of a user-defined function, so a call sets "opaque_function".
# Built-ins that take the value itself (row_to_json(t), to_jsonb(t), format('%s', t),
# array_agg(t), xmlforest(col), quote_literal(col)) are traced like any expression.
LINEAGE_OPAQUE_BUILTINS = frozenset(
    {
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "table_to_xml",
        "table_to_xmlschema",
        "table_to_xml_and_xmlschema",
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
        "ts_stat",
        "ts_rewrite",
    }
)


@dataclass(frozen=True, slots=True)
class TableRef:
    schema: str
    table: str

    def to_input(self) -> dict[str, str]:
        return {"schema": self.schema, "table": self.table}


@dataclass(frozen=True, slots=True)
class ColumnRef:
    schema: str
    table: str
    column: str
    # output | expression | predicate | join | order | group | assignment | source |
    # returning | other
    # (output: shown as it is, masked; expression: computed on, under a function, operator,
    # cast or CASE, or an argument of a function in FROM; group: also compared by DISTINCT,
    # UNION, INTERSECT and EXCEPT; join: also the shared names of a NATURAL JOIN;
    # assignment: a column written; source: read into the value written to a column, by
    # UPDATE/MERGE SET, INSERT VALUES or INSERT ... SELECT)
    usage: str

    def to_input(self) -> dict[str, str]:
        return {
            "schema": self.schema,
            "table": self.table,
            "column": self.column,
            "usage": self.usage,
        }


@dataclass(frozen=True, slots=True)
class OutputColumn:
    """One entry of a statement's output list and the base columns its value comes from.

    `sources` are (schema, table, column) triples whose value may flow into the entry
    (column "*": any column of that table); a column used only to filter, group, order or
    count rows is not a source. `table` is set for `*` over a base table (it stands for the
    table's columns, which the catalog knows); `spread` for an entry that stands for a
    number of columns nothing here can tell (`(f()).*`, `*` over a function's rows).
    """

    sources: frozenset[tuple[str, str, str]]
    table: TableRef | None = None
    spread: bool = False


@dataclass(frozen=True, slots=True)
class StatementFacts:
    text: str
    fingerprint: str
    command: str
    category: Category
    reads: tuple[TableRef, ...] = ()
    writes: tuple[TableRef, ...] = ()
    columns: tuple[ColumnRef, ...] = ()
    functions: tuple[str, ...] = ()
    has_where: bool = False
    flags: tuple[str, ...] = ()
    # For PREPARE: the name it defines; for EXECUTE/DEALLOCATE: the name it uses.
    prepared_name: str | None = None
    # For SET-like statements: the setting name and value text, when known.
    setting: tuple[str, str | None] | None = None
    # For DECLARE, FETCH, MOVE and CLOSE: the cursor's name (CLOSE ALL: None).
    portal: str | None = None
    # Operators used ("+", "myschema.#=#"), for the catalog to find those backed by
    # user-defined functions (flag opaque_function); not part of the policy input.
    operators: tuple[str, ...] = ()
    # Names after a dot (`t.name`, `(row).name`): where no column answers to one, a function
    # of that name taking the row does (attribute notation), so the catalog checks them.
    attributes: tuple[str, ...] = ()
    # Types cast to ("d", "s.d"): a domain's CHECK or a cast may run a user-written function.
    types: tuple[str, ...] = ()
    # The rows it returns, column by column, for masking by lineage; None where it returns
    # none or their lineage is unknown. Not part of the policy input.
    outputs: tuple[OutputColumn, ...] | None = None
    # Functions outside pg_catalog that the catalog found to compute from their arguments
    # alone (an extension's IMMUTABLE C code): lineage runs through them as through a
    # built-in. Not part of the policy input.
    traced_functions: tuple[str, ...] = ()

    def calls_untraced_function(self) -> bool:
        """Whether a function in `functions` may compute from more than its arguments as far
        as anything here knows: outside pg_catalog and not found traced by the catalog."""
        return any(
            not f.startswith("pg_catalog.") and f not in self.traced_functions
            for f in self.functions
        )

    def with_text(self, text: str) -> StatementFacts:
        """These facts for another text of the same statement shape (dataclasses.replace,
        at less than half its cost: it runs for every simple-protocol statement)."""
        clone = _new_facts(StatementFacts)
        for slot in _FACT_SLOTS:
            slot.__set__(clone, slot.__get__(self))
        _TEXT_SLOT.__set__(clone, text)
        return clone

    def to_input(
        self,
        *,
        protocol: str,
        index: int,
        count: int,
        params: list[str | None] | None = None,
    ) -> dict[str, Any]:
        return {
            "text": self.text,
            "fingerprint": self.fingerprint,
            "protocol": protocol,
            "index": index,
            "count": count,
            "command": self.command,
            "category": self.category,
            "reads": [t.to_input() for t in self.reads],
            "writes": [t.to_input() for t in self.writes],
            "columns": [c.to_input() for c in self.columns],
            "functions": list(self.functions),
            "has_where": self.has_where,
            "flags": list(self.flags),
            "params": params or [],
        }


# StatementFacts.with_text: the slots' descriptors set a frozen instance's fields directly.
_new_facts = object.__new__
_TEXT_SLOT: Any = StatementFacts.__dict__["text"]
_FACT_SLOTS: tuple[Any, ...] = tuple(
    StatementFacts.__dict__[f.name] for f in fields(StatementFacts) if f.name != "text"
)
