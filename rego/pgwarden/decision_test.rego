package pgwarden

decision_keys := {"action", "reasons", "approvers", "approvers_required", "masks"}

test_decision_always_has_the_contract_shape if {
	every principal_groups in [[], ["admins"], ["engineers"], ["ai-agents"], ["pii-readers"]] {
		every statement in statement_of {
			d := decide(principal_groups, statement)

			# The contract's keys, and `limits` where the row has a budget.
			{k | some k, _ in d} - {"limits"} == decision_keys
			d.action in {"allow", "deny", "approve"}
			count(d.reasons) > 0
			is_array(d.approvers)
			d.approvers_required >= 1
			is_array(d.masks)
		}
	}
}

test_decision_defined_for_empty_input if {
	d := decision with input as {}
	d.action == "deny"
	d.reasons == [
		"principals in none of admins, engineers, ai-agents may not run statements",
		"statements that do not parse are denied to all but admins",
	]
}

test_unrecognised_category_is_unknown if {
	d := decide(["admins"], {"category": "frobnicate"})
	d.action == "deny"
	d.reasons == ["statements that do not parse are denied to all but admins"]
}

test_unknown_denied_for_every_group_but_admins if {
	every principal_groups in [["engineers"], ["ai-agents"], ["engineers", "pii-readers"], ["pii-readers"], []] {
		decide(principal_groups, statement_of.unknown).action == "deny"
	}
}

test_deny_wins_over_approval if {
	# An agent's write (approve) that also reads a server file (deny).
	d := decide(["ai-agents"], {"command": "INSERT", "category": "write", "functions": ["pg_catalog.pg_read_file"]})
	d.action == "deny"
	d.approvers == []
	not "ai-agents may not write without approval" in d.reasons
}

test_approval_wins_over_allow if {
	# Engineers may write, but not DELETE everything.
	d := decide(["engineers"], {"command": "DELETE", "category": "write", "has_where": false})
	d.action == "approve"
	not "engineers may write" in d.reasons
}

test_all_approval_reasons_reported if {
	d := decide(["ai-agents"], {"command": "CALL", "category": "utility", "writes": [customers]})
	d.reasons == [
		"ai-agents may not CALL procedures without approval",
		"ai-agents may not run maintenance commands without approval",
		"ai-agents may not write without approval",
	]
}

test_statement_no_rule_allows_is_denied if {
	# No input reaches the guard with today's rows; without any allow rule it must deny.
	d := decision with input as request(["engineers"], {"command": "NOTIFY", "category": "session"})
		with allow_reasons as set()
	d.action == "deny"
	d.reasons == ["no rule of the reference policy allows this statement"]
}

test_approvers_fall_back_to_admins if {
	d := decision with input as request(["engineers"], statement_of.ddl)
		with approvers_by_role as {}
	d.approvers == ["admins"]
}

test_tcl_and_session_allowed_to_every_known_group if {
	every principal_groups in [["admins"], ["engineers"], ["ai-agents"]] {
		every category in ["tcl", "session"] {
			decide(principal_groups, statement_of[category]).action == "allow"
		}
	}
}

test_command_that_is_not_a_string_is_no_command if {
	d := decide(["engineers"], {"command": 42, "category": "read"})
	d.action == "allow"
	command == "" with input as request(["engineers"], {"command": 42})
}

test_command_word_alone_makes_a_write if {
	# The command names the write even where the category and writes[] do not.
	d := decide(["ai-agents"], {"command": "merge", "category": "read"})
	d.action == "approve"
	d.reasons == ["ai-agents may not write without approval"]
}

test_catalog_unavailable_is_denied_to_everyone if {
	every principal_groups in [["admins"], ["engineers"], ["ai-agents"], ["ai-agents", "pii-readers"]] {
		d := decide(principal_groups, {"category": "read", "command": "SELECT", "flags": ["catalog_unavailable"]})
		d.action == "deny"
		"the target's catalog is unavailable, so the statement cannot be checked" in d.reasons
	}
}

test_schema_changes_by_ai_agents_need_two_approvers if {
	d := decide(["ai-agents"], {"command": "CREATE TABLE", "category": "ddl"})
	d.action == "approve"
	d.approvers == ["engineers", "admins"]
	d.approvers_required == 2

	# SELECT ... INTO creates a table: a schema change too.
	into := decide(["ai-agents"], {"command": "SELECT", "category": "read", "flags": ["select_into"]})
	into.approvers_required == 2
}

test_other_approvals_need_one_approver if {
	decide(["ai-agents"], {"command": "DELETE", "category": "write", "has_where": true}).approvers_required == 1
	decide(["engineers"], {"command": "CREATE TABLE", "category": "ddl"}).approvers_required == 1
	decide(["admins"], {"command": "CREATE TABLE", "category": "ddl"}).approvers_required == 1
}
