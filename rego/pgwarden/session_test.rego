package pgwarden

session_of(principal_groups) := s if {
	s := session with input as {"principal": {"subject": "agent:x", "groups": principal_groups}}
}

# Not read-only (their writes are held for approval, and an approved write must run) and no
# statement rate (a deployment's choice): timeouts, session caps and the estimate threshold.
test_ai_agents_sessions_have_timeouts_and_session_caps if {
	s := session_of(["ai-agents"])
	not s.default_transaction_read_only
	not s.statements_per_second
	s.statement_timeout_ms == 30000
	s.idle_in_transaction_session_timeout_ms == 60000
	s.max_sessions_per_principal == 50
	s.max_sessions_per_token == 20
	s.estimate_seq_scan_rows == 100000
	s.estimate_plan_rows == 100000
}

test_other_rows_have_no_guards if {
	every groups in [["admins"], ["engineers"], ["ai-agents", "engineers"], [], ["pii-readers"]] {
		session_of(groups) == {}
	}
}

test_the_guards_come_from_data if {
	s := session with input as {"principal": {"groups": ["engineers"]}}
		with data.pgwarden.session_guards as {"engineers": {"statement_timeout_ms": 5}}
	s == {"statement_timeout_ms": 5}
}

test_ai_agents_reads_carry_their_row_budget if {
	d := decide(["ai-agents"], statement_of.read)
	d.action == "allow"
	d.limits == {"max_rows": 10000, "max_bytes": 67108864}
}

test_other_rows_and_denied_statements_carry_no_budget if {
	every groups in [["admins"], ["engineers"]] {
		not decide(groups, statement_of.read).limits
	}
	d := decide(["ai-agents"], statement_of.dcl)
	d.action == "deny"
	not d.limits
}

estimated(rows, seq) := object.union(statement_of.read, {"estimate": {
	"total_cost": 1.0,
	"plan_rows": rows,
	"relations": [],
	"seq_scan_over_threshold": seq,
	"rows_over_threshold": rows > 100000,
}})

test_ai_agents_reads_estimated_above_the_threshold_need_approval if {
	d := decide(["ai-agents"], estimated(100001, false))
	d.action == "approve"
	d.reasons == ["ai-agents may not run reads estimated at more than 100000 rows without approval"]
	s := decide(["ai-agents"], estimated(5, true))
	s.action == "approve"
	s.reasons == ["ai-agents may not run reads estimated to scan a large table sequentially without approval"]
}

test_small_estimates_and_other_rows_run if {
	decide(["ai-agents"], estimated(100000, false)).action == "allow"
	decide(["engineers"], estimated(100000000, true)).action == "allow"
}

test_ai_agents_reads_without_an_estimate_need_approval if {
	d := decide_without_estimate(["ai-agents"], statement_of.read)
	d.action == "approve"
	d.reasons == ["ai-agents may not run reads that could not be estimated without approval"]
	every command in ["DECLARE", "VALUES"] {
		one := object.union(statement_of.read, {"command": command})
		decide_without_estimate(["ai-agents"], one).action == "approve"
	}
}

# PREPARE runs nothing (its EXECUTE is estimated); a failed transaction's statement is
# rejected by the server (the gateway says so instead of a plan); where the session rule
# asks for no estimates, none is expected; other statements have none.
test_reads_not_estimated_on_purpose_run if {
	prepare := object.union(statement_of.read, {"flags": ["prepare"]})
	decide_without_estimate(["ai-agents"], prepare).action == "allow"
	not_run := json.patch(request(["ai-agents"], statement_of.read), [{
		"op": "replace",
		"path": "/statement/estimate",
		"value": {"not_run": "the transaction is failed: the server rejects the statement"},
	}])
	n := decision with input as not_run
	n.action == "allow"
	d := decide_without_estimate(["ai-agents"], statement_of.read) with data.pgwarden.session_guards as {}
	d.action == "allow"
	decide_without_estimate(["engineers"], statement_of.read).action == "allow"
	decide_without_estimate(["ai-agents"], statement_of.tcl).action == "allow"
}
