# The ai-agents row: read masked; every change waits for a human; no opaque code, no oracles.
package pgwarden

allow_reasons contains "ai-agents may read, with classified columns masked" if {
	role == "ai-agents"
	category == "read"
}

approval_reasons contains "ai-agents may not write without approval" if {
	role == "ai-agents"
	writes_data
}

approval_reasons contains "ai-agents may not change the schema (DDL) without approval" if {
	role == "ai-agents"
	changes_schema
}

# Row locks block every other writer of those rows for as long as the transaction lasts.
approval_reasons contains "ai-agents may not lock rows (SELECT ... FOR UPDATE/SHARE) without approval" if {
	role == "ai-agents"
	locks_rows
}

approval_reasons contains "ai-agents may not CALL procedures without approval" if {
	role == "ai-agents"
	command == "CALL"
}

# What such a function reads is unmasked and what it writes is unseen: a human decides, as
# for CALL. This holds for pii-readers too, because the function may write.
approval_reasons contains "ai-agents may not call functions the policy cannot see into without approval" if {
	role == "ai-agents"
	opaque_function
}

# The gateway explains ai-agents' reads (session rule: estimate_seq_scan_rows) and puts the
# server's estimate in the input: a read estimated to return more rows than the session
# rule's estimate_plan_rows, or to scan a table sequentially for more than its
# estimate_seq_scan_rows, waits for a human. The gateway compares (rows_over_threshold,
# seq_scan_over_threshold), so the rules read flags, not counts: the decision cache keys by
# what the policy reads, and statements that differ only in literals share a decision.
approval_reasons contains sprintf(
	"ai-agents may not run reads estimated at more than %d rows without approval",
	[data.pgwarden.session_guards[role].estimate_plan_rows],
) if {
	role == "ai-agents"
	input.statement.estimate.rows_over_threshold == true
}

approval_reasons contains "ai-agents may not run reads estimated to scan a large table sequentially without approval" if {
	role == "ai-agents"
	input.statement.estimate.seq_scan_over_threshold == true
}

# Where the session rule asks for estimates, a read the gateway explains but has no estimate
# for (its upstream was busy with the client's pipeline, the server could not plan it) is
# not taken as small: it waits for a human. The flags are those the gateway does not
# explain (each asks approval or is denied on its own, or runs nothing: PREPARE).
approval_reasons contains "ai-agents may not run reads that could not be estimated without approval" if {
	role == "ai-agents"
	data.pgwarden.session_guards[role].estimate_seq_scan_rows
	category == "read"
	command in {"SELECT", "VALUES", "DECLARE"}
	count(flags & not_estimated_flags) == 0
	not has_estimate
}

# An estimate the gateway made (every one has seq_scan_over_threshold), or its word that the
# server rejects the statement unplanned (failed transaction, a statement it cannot plan).
has_estimate if is_boolean(input.statement.estimate.seq_scan_over_threshold)

has_estimate if is_string(input.statement.estimate.not_run)

not_estimated_flags := {"opaque_function", "dml_in_cte", "procedural", "row_lock", "select_into", "prepare"}

approval_reasons contains "ai-agents may not run maintenance commands without approval" if {
	role == "ai-agents"
	category == "utility"
}

deny_reasons contains "ai-agents may not run DO blocks: opaque code is denied" if {
	role == "ai-agents"
	do_block
}

deny_reasons contains sprintf(
	"ai-agents may not use classified column %s outside the output list (%s): a predicate is an oracle",
	[key, usage],
) if {
	role == "ai-agents"
	some [key, usage] in oracle_uses
	usage != "expression"
}

# 1/(ascii(email)-97) fails only for some values, generate_series(1, ascii(email)) returns
# as many rows as the character code: what an expression computes from a masked value (its
# error, its row count, its timing) reaches the client unmasked.
deny_reasons contains sprintf(
	"ai-agents may not use classified column %s outside the output list (expression): a function, operator or cast over it is an oracle",
	[key],
) if {
	role == "ai-agents"
	some [key, "expression"] in oracle_uses
}
