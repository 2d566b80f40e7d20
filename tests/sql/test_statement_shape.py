"""Facts shared by statement shape: texts that differ only in literals share one analysis,
and only where no fact depends on a literal's value."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from gateway.sql import StatementAnalyzer, analyze
from gateway.sql.analysis import analyze_shaped
from gateway.sql.analyzer import statement_shape
from gateway.sql.facts import StatementFacts

# Pairs of one shape whose facts differ because a literal's value decides them: a text must
# never be served the other's analysis.
LITERAL_MATTERS = [
    ("SELECT a FROM t WHERE 1 = 1", "SELECT a FROM t WHERE 1 = 2"),
    ("SELECT a FROM t WHERE a = 5 OR 'f'", "SELECT a FROM t WHERE a = 5 OR 't'"),
    ("SELECT a FROM t WHERE true", "SELECT a FROM t WHERE false"),
    ("SELECT a FROM t WHERE a + 1 = a + 2", "SELECT a FROM t WHERE a + 1 = a + 1"),
    ("SELECT set_config('search_path', 'x', false)", "SELECT set_config('role', 'x', false)"),
    ("SELECT email, id FROM customers ORDER BY 2", "SELECT email, id FROM customers ORDER BY 1"),
    ("DELETE FROM t WHERE 1 = 2", "DELETE FROM t WHERE 1 = 1"),
    ("SET search_path = a", "SET search_path = b"),
    ("SET ROLE 'alice'", "SET ROLE 'postgres'"),
    ("EXPLAIN (ANALYZE 'off') DELETE FROM t", "EXPLAIN (ANALYZE 'on') DELETE FROM t"),
    ("PREPARE p AS SELECT 1", "PREPARE q AS SELECT 1"),
    # The scanner stops at NUL (the wire protocol refuses one inside a text; this is the
    # analyzer's own guard): what follows it must not vanish from the shape.
    ("SELECT a FROM t WHERE a = 1", "SELECT a FROM t WHERE a = 1\x00; DROP TABLE t"),
]


@pytest.mark.parametrize(("first", "second"), LITERAL_MATTERS)
def test_a_statement_whose_literals_matter_is_never_served_another_shapes_facts(
    first: str, second: str
) -> None:
    analyzer = StatementAnalyzer()
    analyzer.analyze(first)
    assert analyzer.analyze(second) == analyze(second)
    analyzer = StatementAnalyzer()
    analyzer.analyze(second)
    assert analyzer.analyze(first) == analyze(first)
    assert analyzer.shape_hits == 0


SHARED = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
    "UPDATE orders SET total = {} WHERE id = 7",
    "SELECT email FROM customers WHERE name = '{}' LIMIT 3",
    "  /* app */ INSERT INTO t (a) VALUES ({}) ; ",
    "SELECT 'é{}', a FROM t",
]


@pytest.mark.parametrize("template", SHARED)
def test_texts_that_differ_only_in_literals_share_one_analysis_with_their_own_text(
    template: str,
) -> None:
    analyzer = StatementAnalyzer()
    for value in ("1", "22", "333"):
        text = template.format(value)
        assert analyzer.analyze(text) == analyze(text)  # the exact text included
    assert analyzer.shape_hits == 2
    assert analyzer.misses == 1


def test_names_and_layout_of_tokens_make_another_shape() -> None:
    assert statement_shape("SELECT a FROM t x WHERE x.a = 1") != statement_shape(
        "SELECT a FROM t y WHERE y.a = 1"
    )
    assert statement_shape("SELECT 1") != statement_shape("SELECT 1.5")  # another literal kind
    assert statement_shape("SELECT a IN (1, 2)") != statement_shape("SELECT a IN (1)")
    one, other = statement_shape("SELECT 'a'; "), statement_shape("SELECT 'bcd'; ")
    assert one is not None and other is not None and one[0] == other[0]


def test_several_statements_and_unparsed_text_are_never_shared() -> None:
    assert analyze_shaped("SELECT 1; SELECT 2")[1] is False
    assert analyze_shaped("SELEC 1")[1] is False
    assert analyze_shaped("SELECT a FROM t WHERE id = 3")[1] is True


@pytest.mark.parametrize(
    "text",
    [
        "SELECT abalance FROM pgbench_accounts WHERE aid = 42",
        "WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT * FROM d",
        "SELECT upper(email) FROM customers c JOIN orders o ON o.customer_id = c.id",
    ],
)
def test_with_text_is_replace_of_the_text_alone(text: str) -> None:
    """The fast copy used for every statement of a shared shape: every field but the text
    is the model's, the model is left as it was."""
    (model,) = analyze(text)
    copy = model.with_text("-- another text of the same shape")
    assert copy == replace(model, text="-- another text of the same shape")
    assert type(copy) is StatementFacts
    assert model.text == text
    assert all(
        getattr(copy, f.name) is getattr(model, f.name) for f in fields(model) if f.name != "text"
    )
