# Normalises the analysed statement into the few facts the rules decide on.
package pgwarden

# The categories the analyser reports for text it understood; anything else, including a
# value this policy does not know, is treated as "unknown" and denied.
known_categories := {"read", "write", "ddl", "dcl", "tcl", "session", "utility"}

category := input.statement.category if {
	input.statement.category in known_categories
} else := "unknown"

command := upper(trim_space(input.statement.command)) if {
	is_string(input.statement.command)
} else := ""

flags := {f | some f in input.statement.flags}

functions := {f | some f in input.statement.functions; is_string(f)}

# "pg_catalog.pg_read_file" and a shadowing "public.pg_read_file" both name pg_read_file.
unqualified(name) := lower(trim(parts[count(parts) - 1], "\"")) if {
	parts := split(name, ".")
}

# Commands that change what others see: rows, notifications delivered to other sessions'
# listeners, and two-phase transactions (committing or discarding another session's
# prepared writes, or leaving one's own prepared with its locks held).
data_modifying_commands := {
	"INSERT",
	"UPDATE",
	"DELETE",
	"MERGE",
	"TRUNCATE",
	"NOTIFY",
	"PREPARE TRANSACTION",
	"COMMIT PREPARED",
	"ROLLBACK PREPARED",
}

# Built-in functions that change stored data from inside any statement, a SELECT included:
# large objects (created, written, truncated, unlinked) and sequences (nextval, setval).
data_modifying_functions := {
	"lo_create",
	"lo_creat",
	"lo_from_bytea",
	"lo_put",
	"lowrite",
	"lo_truncate",
	"lo_truncate64",
	"lo_unlink",
	"nextval",
	"setval",
	"pg_notify",
}

# A statement writes data when the analyser says so in any of the ways it can: a write
# category, a data-modifying command, a written table, DML hidden in a CTE, or a call of a
# function that changes data.
writes_data if category == "write"

writes_data if command in data_modifying_commands

writes_data if count(input.statement.writes) > 0

writes_data if "dml_in_cte" in flags

writes_data if {
	some f in functions
	unqualified(f) in data_modifying_functions
}

# SELECT ... FOR UPDATE/SHARE locks the rows it reads until the transaction ends.
locks_rows if "row_lock" in flags

# SELECT ... INTO creates a table whatever category it arrives with.
changes_schema if category == "ddl"

changes_schema if "select_into" in flags

has_where if input.statement.has_where == true

# An UPDATE or DELETE that may touch every row of its table. A write hidden under another
# command word (a DML CTE, EXPLAIN ANALYZE) counts unless the statement has a WHERE: the
# policy cannot see which hidden write the WHERE belongs to, so it errs towards approval.
unbounded_write if {
	command in {"UPDATE", "DELETE"}
	not has_where
}

unbounded_write if {
	"dml_in_cte" in flags
	not has_where
}

unbounded_write if {
	"explain_analyze" in flags
	writes_data
	not command in data_modifying_commands
	not has_where
}

# Opaque code: the policy cannot see what a DO block does.
do_block if command == "DO"

do_block if "procedural" in flags

# A function the gateway cannot see into (user-defined, or a built-in that runs SQL given as
# text): it may read classified columns, or write, without any of it showing in the input.
opaque_function if "opaque_function" in flags
