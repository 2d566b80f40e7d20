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

approval_reasons contains "ai-agents may not CALL procedures without approval" if {
	role == "ai-agents"
	command == "CALL"
}

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
}
