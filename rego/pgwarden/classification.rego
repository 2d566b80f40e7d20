# Column classification: the masks a result needs and the columns an agent may not probe.
package pgwarden

# data.pgwarden.classification maps "schema.table.column" to a mask method.
classified := data.pgwarden.classification if {
	is_object(data.pgwarden.classification)
} else := {}

mask_methods := {"redact", "null", "hash", "partial", "email"}

# A method the gateway does not know would make the whole decision malformed; the
# strongest known mask keeps the column protected instead.
mask_method(method) := method if {
	method in mask_methods
} else := "redact"

column_key(col) := concat(".", [col.schema, col.table, col.column])

mask(schema, table, column, method) := {
	"schema": schema,
	"table": table,
	"column": column,
	"method": mask_method(method),
}

# Every classified column in play, whatever its usage: the gateway masks output by lineage
# and must know each classified column that could reach a result.
masks_in_play contains mask(col.schema, col.table, col.column, classified[column_key(col)]) if {
	not pii_reader
	some col in input.statement.columns
}

# Classified columns of every table read or written (SELECT *, RETURNING *, row_to_json(t)
# may return them although no column reference names them).
masks_in_play contains mask(parts[0], parts[1], parts[2], method) if {
	not pii_reader
	some tbl in array.concat(
		[t | some t in input.statement.reads],
		[t | some t in input.statement.writes],
	)
	some key, method in classified
	parts := split(key, ".")
	count(parts) == 3
	parts[0] == tbl.schema
	parts[1] == tbl.table
}

# A classified column used anywhere but the output list (WHERE, JOIN, ORDER BY, GROUP BY,
# ...) lets the caller learn masked values by asking questions: a predicate is an oracle.
oracle_uses contains [column_key(col), col.usage] if {
	not pii_reader
	some col in input.statement.columns
	col.usage != "output"
	classified[column_key(col)]
}
