"""Names as PostgreSQL resolves them: the search_path, the relations a name may denote and
their columns, and where an output column's sources sit once their schemas are known."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gateway.sql.facts import OutputColumn, TableRef

DEFAULT_SEARCH_PATH: tuple[str, ...] = ("$user", "public")

# Relations a statement can name in FROM: tables, views, matviews, foreign and
# partitioned tables, sequences.
_RELKINDS = ["r", "v", "m", "f", "p", "S"]

_QUERY = """
SELECT n.nspname, c.relname, c.relkind::text,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum) AS columns,
       c.oid::int8,
       ARRAY(SELECT a.attnum::int4 FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS attnums
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = ANY($1::text[]) AND c.relkind::text = ANY($2::text[])
"""


Column = tuple[str, str, str]  # (schema, table, column)


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


def _placed_output(
    output: OutputColumn,
    place: Callable[[str, str], str],
    relations: Mapping[str, Mapping[str, tuple[str, ...]]],
) -> list[OutputColumn]:
    """One output entry with its sources' schemas placed and `*` made the table's columns;
    `*` over a known base table becomes one entry per column, as PostgreSQL expands it."""
    sources: set[Column] = set()
    for schema, table, column in output.sources:
        placed = place(schema, table)
        known = relations.get(table, {}).get(placed)
        if column == "*" and known is not None:
            sources.update((placed, table, name) for name in known)
        else:
            sources.add((placed, table, column))
    if output.table is not None and any(column == "*" for _, _, column in output.sources):
        star = TableRef(place(output.table.schema, output.table.table), output.table.table)
        known = relations.get(star.table, {}).get(star.schema)
        if known is None:  # its width is unknown here
            return [OutputColumn(frozenset(sources), spread=True)]
        # Each keeps `table`: a column of a `*` whose width came from the catalog's cache.
        return [
            OutputColumn(frozenset({(star.schema, star.table, name)}), table=star) for name in known
        ]
    return [OutputColumn(frozenset(sources), table=output.table, spread=output.spread)]
