"""PREPARE/EXECUTE through the session registry, and the analyzer's cache."""

from __future__ import annotations

from gateway.sql import PreparedStatements, StatementAnalyzer, TableRef, analyze

T = TableRef("", "t")


def test_execute_is_what_prepare_prepared() -> None:
    reg = PreparedStatements()
    (prep,) = reg.resolve(analyze("PREPARE p (int) AS DELETE FROM t WHERE id = $1"))
    assert prep.category == "write"
    (ex,) = reg.resolve(analyze("EXECUTE p (5)"))
    assert (ex.command, ex.category, ex.writes) == ("DELETE", "write", (T,))
    assert ex.text == "EXECUTE p (5)"
    assert "execute" in ex.flags and "prepare" not in ex.flags
    assert ex.prepared_name == "p"


def test_prepare_and_execute_in_one_message() -> None:
    reg = PreparedStatements()
    facts = reg.resolve(analyze("PREPARE q AS DELETE FROM t; EXECUTE q"))
    assert [f.command for f in facts] == ["DELETE", "DELETE"]
    assert facts[1].writes == (T,)
    assert "multi_statement" in facts[1].flags


def test_execute_params_add_their_functions() -> None:
    reg = PreparedStatements()
    reg.resolve(analyze("PREPARE p (int) AS SELECT $1"))
    (ex,) = reg.resolve(analyze("EXECUTE p (pg_terminate_backend(42))"))
    assert "pg_catalog.pg_terminate_backend" in ex.functions


def test_operators_survive_execute_and_merging() -> None:
    """The catalog checks operators too (one may run a user's function): none may be lost."""
    reg = PreparedStatements()
    reg.resolve(analyze("PREPARE p AS SELECT 1 #=# 2"))
    (ex,) = reg.resolve(analyze("EXPLAIN ANALYZE EXECUTE p"))
    assert ex.operators == ("#=#",)
    reg.resolve(analyze("PREPARE r (int) AS SELECT $1"))
    (ex,) = reg.resolve(analyze("EXECUTE r (1 #<# 2)"))
    assert ex.operators == ("#<#",)
    reg.register("p", analyze("DELETE FROM t")[0])  # the server may still hold the old one
    merged = reg.lookup("p")
    assert merged is not None and merged.operators == ("#=#",)


def test_unknown_name_is_unknown() -> None:
    (ex,) = PreparedStatements().resolve(analyze("EXECUTE nope"))
    assert (ex.command, ex.category) == ("EXECUTE", "unknown")


def test_deallocate_and_discard_remove_after_the_server_confirms() -> None:
    reg = PreparedStatements()
    reg.resolve(analyze("PREPARE p AS SELECT 1; PREPARE r AS SELECT 2"))
    (dealloc,) = reg.resolve(analyze("DEALLOCATE p"))
    assert "p" in reg  # not yet: the server may still refuse it
    reg.completed(dealloc)
    assert "p" not in reg and "r" in reg
    reg.completed(analyze("DEALLOCATE ALL")[0])
    assert "r" not in reg
    reg.resolve(analyze("PREPARE s AS SELECT 1"))
    reg.completed(analyze("DISCARD PLANS")[0])
    assert "s" in reg
    reg.completed(analyze("DISCARD ALL")[0])
    assert "s" not in reg


def test_reprepare_of_a_held_name_keeps_the_stronger_facts() -> None:
    # The server refuses a second PREPARE p and keeps the first; judge EXECUTE on both.
    reg = PreparedStatements()
    reg.resolve(analyze("PREPARE p AS DELETE FROM t"))
    reg.resolve(analyze("PREPARE p AS SELECT 1"))
    (ex,) = reg.resolve(analyze("EXECUTE p"))
    assert ex.category == "write" and ex.writes == (T,)


def test_protocol_level_statements_share_the_namespace() -> None:
    reg = PreparedStatements()
    reg.register("s1", analyze("UPDATE t SET a = 1")[0])
    (ex,) = reg.resolve(analyze("EXECUTE s1"))
    assert ex.command == "UPDATE" and ex.has_where is False
    reg.register("", analyze("DELETE FROM t")[0])
    reg.register("", analyze("SELECT 1")[0])  # the unnamed statement is simply replaced
    unnamed = reg.lookup("")
    assert unnamed is not None and unnamed.category == "read"
    reg.closed("s1")
    assert reg.lookup("s1") is None


def test_wrapped_execute() -> None:
    reg = PreparedStatements()
    reg.resolve(analyze("PREPARE p AS DELETE FROM t RETURNING *"))
    (explain,) = reg.resolve(analyze("EXPLAIN ANALYZE EXECUTE p"))
    assert (explain.command, explain.category, explain.writes) == ("EXPLAIN", "write", (T,))
    (plain,) = reg.resolve(analyze("EXPLAIN EXECUTE p"))
    assert (plain.category, plain.writes, plain.reads) == ("read", (), (T,))
    (ctas,) = reg.resolve(analyze("CREATE TABLE x AS EXECUTE p"))
    assert ctas.category == "ddl"
    assert set(ctas.writes) == {TableRef("", "x"), T}


def test_analyzer_caches_by_text_with_a_bound() -> None:
    analyzer = StatementAnalyzer(max_entries=2)
    first = analyzer.analyze("SELECT 1")
    assert analyzer.analyze("SELECT 1") is first
    # Other shapes (not only other literals, which share the first one's analysis).
    analyzer.analyze("SELECT 2 AS b")
    analyzer.analyze("SELECT 3 AS c")
    assert len(analyzer) == 2
    assert analyzer.analyze("SELECT 1") is not first  # evicted, analysed again
    assert (analyzer.hits, analyzer.misses) == (1, 4)
