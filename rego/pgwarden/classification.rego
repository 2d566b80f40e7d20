# Column classification: the masks a result needs and the columns an agent may not probe.
package pgwarden

# data.pgwarden.classification maps "schema.table.column" to a mask method.
data_classification := data.pgwarden.classification if {
	is_object(data.pgwarden.classification)
} else := {}

# The planner's statistics keep sample values of every analysed column, classified ones
# included: pg_stats.most_common_vals / histogram_bounds of customers.email list e-mail
# addresses. While anything is classified they are masked like a classified column
# (NULL: no valid masked value of anyarray exists); which table a row describes is not
# known to the gateway, so the samples of every table are hidden.
statistics_samples := {
	"pg_catalog.pg_stats.most_common_vals": "null",
	"pg_catalog.pg_stats.histogram_bounds": "null",
	"pg_catalog.pg_stats.most_common_elems": "null",
	"pg_catalog.pg_stats_ext.most_common_vals": "null",
	"pg_catalog.pg_stats_ext_exprs.most_common_vals": "null",
	"pg_catalog.pg_stats_ext_exprs.histogram_bounds": "null",
	"pg_catalog.pg_stats_ext_exprs.most_common_elems": "null",
	"pg_catalog.pg_statistic.stavalues1": "null",
	"pg_catalog.pg_statistic.stavalues2": "null",
	"pg_catalog.pg_statistic.stavalues3": "null",
	"pg_catalog.pg_statistic.stavalues4": "null",
	"pg_catalog.pg_statistic.stavalues5": "null",
	"pg_catalog.pg_statistic_ext_data.stxdmcv": "null",
	"pg_catalog.pg_statistic_ext_data.stxdexpr": "null",
}

# Other sessions' statement text quotes the values they used (WHERE ssn = '...', an UPDATE
# of an e-mail address): for ai-agents it is masked like a classified column.
statement_texts := {"pg_catalog.pg_stat_activity.query": "redact"} if {
	role == "ai-agents"
} else := {}

classified := object.union(object.union(statistics_samples, statement_texts), data_classification) if {
	count(data_classification) > 0
} else := {}

# The functions under pg_stat_activity return the same text with no column to mask.
deny_reasons contains sprintf("ai-agents may not read other sessions' statement text (%s)", [f]) if {
	role == "ai-agents"
	not pii_reader
	count(data_classification) > 0
	some f in functions
	unqualified(f) in {"pg_stat_get_activity", "pg_stat_get_backend_activity"}
}

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

# Every classified column may be in what the statement returns when it calls a function no
# lineage reaches into (user-defined, or a built-in that runs SQL text, reads a cursor or
# serialises a relation named by text or OID: query_to_xml, table_to_xml, ts_stat, ...), or
# when it is text pgwarden could not analyse: the gateway then masks whole each output column
# whose origin PostgreSQL does not report.
every_classified_column_in_play if opaque_function

every_classified_column_in_play if input.statement.category == "unknown"

masks_in_play contains mask(parts[0], parts[1], parts[2], method) if {
	not pii_reader
	every_classified_column_in_play
	some key, method in classified
	parts := split(key, ".")
	count(parts) == 3
}

# Classified columns read into a value written to a column (UPDATE/MERGE SET, INSERT VALUES,
# INSERT ... SELECT): the copy is no longer under the mask of the column it came from.
copied_classified contains column_key(col) if {
	not pii_reader
	some col in input.statement.columns
	col.usage == "source"
	classified[column_key(col)]
}

# Code no lineage reaches into (an opaque function, unanalysed text) in a statement that
# writes may copy any classified value into what it writes, as a named source would.
copies_unseen_values if {
	not pii_reader
	every_classified_column_in_play
	writes_data
	count(classified) > 0
}

# Every column such a write assigns then carries a classified value for RETURNING (which
# assigned column got which value is not traced): masked whole, whatever its own class.
masks_in_play contains mask(col.schema, col.table, col.column, "redact") if {
	copies_classified
	some col in input.statement.columns
	col.usage == "assignment"
}

copies_classified if count(copied_classified) > 0

copies_classified if copies_unseen_values

# A classified column used anywhere but the output list (WHERE, JOIN, ORDER BY, GROUP BY,
# ...) lets the caller learn masked values by asking questions: a predicate is an oracle.
oracle_uses contains [column_key(col), col.usage] if {
	not pii_reader
	some col in input.statement.columns
	col.usage != "output"
	classified[column_key(col)]
}

# Functions that carry a value out of the statement by a way other than its rows, where no
# mask reaches it: a setting (set_config, read back by current_setting or SHOW, or reported
# in a ParameterStatus), a notification payload (pg_notify), an advisory lock key (pg_locks),
# a large object or a sequence (read by a later, unmasked statement), a WAL message, a
# restore point or backup label, time (pg_sleep*). Matched on the unqualified name.
value_channel_functions := {
	"set_config",
	"pg_notify",
	"pg_logical_emit_message",
	"pg_create_restore_point",
	"pg_backup_start",
	"pg_start_backup",
	"setval",
	"lo_from_bytea",
	"lo_put",
	"lowrite",
	"lo_create",
	"lo_creat",
}

value_channel_prefixes := {"pg_advisory_", "pg_try_advisory_", "pg_sleep"}

value_channel(name) if name in value_channel_functions

value_channel(name) if {
	some prefix in value_channel_prefixes
	startswith(name, prefix)
}

# Masks apply to result rows only: with a classified column in play, such a function would
# hand its value (or any fragment of it) over unmasked. Approval cannot help: once run, the
# value is out. Separate statements (set_config of a constant) are unaffected.
deny_reasons contains sprintf(
	"classified columns are in play and %s would carry their values past the masks",
	[f],
) if {
	count(masks_in_play) > 0
	some f in functions
	value_channel(unqualified(f))
}

# The FunctionCall message answers with one value, not rows: no mask reaches it.
deny_reasons contains "classified columns may be in play and the FunctionCall message's result cannot be masked" if {
	"function_call" in flags
	count(masks_in_play) > 0
}
