"""Statement analysis: SQL text → StatementFacts for the policy input's `statement` section."""

from gateway.sql.analysis import analyze, unknown_facts
from gateway.sql.analyzer import StatementAnalyzer
from gateway.sql.catalog import DEFAULT_SEARCH_PATH, Catalog, parse_search_path
from gateway.sql.facts import Category, ColumnRef, StatementFacts, TableRef
from gateway.sql.prepared import PreparedStatements, merge_facts

__all__ = [
    "DEFAULT_SEARCH_PATH",
    "Catalog",
    "Category",
    "ColumnRef",
    "PreparedStatements",
    "StatementAnalyzer",
    "StatementFacts",
    "TableRef",
    "analyze",
    "merge_facts",
    "parse_search_path",
    "unknown_facts",
]
