package pgwarden

test_ai_agents_read_allowed if {
	d := decide(["ai-agents"], statement_of.read)
	d.action == "allow"
	d.reasons == ["ai-agents may read, with classified columns masked"]
}

test_ai_agents_read_masked if {
	d := decide(["ai-agents"], {"reads": [customers], "columns": [customer_column("email", "output")]})
	d.action == "allow"
	{"schema": "public", "table": "customers", "column": "email", "method": "email"} in d.masks
}

test_ai_agents_writes_approved_by_engineers_or_admins if {
	every command in ["INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "TRUNCATE"] {
		d := decide(["ai-agents"], {"command": command, "category": "write", "has_where": true, "writes": [customers]})
		d.action == "approve"
		"ai-agents may not write without approval" in d.reasons
		d.approvers == ["engineers", "admins"]
	}
}

test_ai_agents_hidden_writes_approved if {
	d := decide(["ai-agents"], {"command": "SELECT", "category": "read", "flags": ["dml_in_cte"]})
	d.action == "approve"
	d.reasons == ["ai-agents may not write without approval"]
}

test_ai_agents_notify_and_two_phase_commit_approved if {
	every command in ["NOTIFY", "PREPARE TRANSACTION", "COMMIT PREPARED", "ROLLBACK PREPARED"] {
		d := decide(["ai-agents"], {"command": command, "category": "session"})
		d.action == "approve"
		d.reasons == ["ai-agents may not write without approval"]
	}
	d := decide(["ai-agents"], {"command": "SELECT", "category": "read", "functions": ["pg_catalog.pg_notify"]})
	d.action == "approve"
}

test_ai_agents_listen_allowed if {
	d := decide(["ai-agents"], {"command": "LISTEN", "category": "session"})
	d.action == "allow"
}

test_ai_agents_ddl_approved if {
	d := decide(["ai-agents"], statement_of.ddl)
	d.action == "approve"
	d.reasons == ["ai-agents may not change the schema (DDL) without approval"]
	d.approvers == ["engineers", "admins"]
}

test_ai_agents_dcl_denied if {
	d := decide(["ai-agents"], {"command": "REVOKE", "category": "dcl"})
	d.action == "deny"
	"ai-agents may not change privileges or roles (REVOKE): only admins may" in d.reasons
}

test_ai_agents_do_denied if {
	every statement in [
		{"command": "DO", "category": "utility"},
		{"command": "DO", "category": "write", "flags": ["procedural"]},
		{"command": "SELECT", "category": "read", "flags": ["procedural"]},
	] {
		d := decide(["ai-agents"], statement)
		d.action == "deny"
		"ai-agents may not run DO blocks: opaque code is denied" in d.reasons
	}
}

test_ai_agents_call_approved if {
	d := decide(["ai-agents"], {"command": "CALL", "category": "utility"})
	d.action == "approve"
	"ai-agents may not CALL procedures without approval" in d.reasons
	d.approvers == ["engineers", "admins"]
}

test_ai_agents_opaque_function_approved if {
	every groups in [["ai-agents"], ["ai-agents", "pii-readers"]] {
		d := decide(groups, {"functions": ["public.get_customers"], "flags": ["opaque_function"]})
		d.action == "approve"
		d.reasons == ["ai-agents may not call functions the policy cannot see into without approval"]
		d.approvers == ["engineers", "admins"]
	}
}

test_opaque_function_is_no_concern_of_other_rows if {
	every groups in [["engineers"], ["admins"]] {
		d := decide(groups, {"functions": ["public.get_customers"], "flags": ["opaque_function"]})
		d.action == "allow"
	}
}

test_ai_agents_utility_approved if {
	d := decide(["ai-agents"], statement_of.utility)
	d.action == "approve"
	d.reasons == ["ai-agents may not run maintenance commands without approval"]
}

test_ai_agents_oracle_denied if {
	every usage in ["predicate", "join", "order", "group", "assignment", "source", "returning", "other"] {
		d := decide(["ai-agents"], {"reads": [customers], "columns": [customer_column("ssn", usage)]})
		d.action == "deny"
		d.reasons == [sprintf(
			"ai-agents may not use classified column public.customers.ssn outside the output list (%s): a predicate is an oracle",
			[usage],
		)]
		d.masks == []
	}
}

test_ai_agents_expression_over_classified_column_denied if {
	# SELECT 1/(ascii(ssn)-97) FROM customers: the error is the answer.
	d := decide(["ai-agents"], {"reads": [customers], "columns": [customer_column("ssn", "expression")]})
	d.action == "deny"
	d.reasons == ["ai-agents may not use classified column public.customers.ssn outside the output list (expression): a function, operator or cast over it is an oracle"]
	d.masks == []
}

test_ai_agents_expression_over_unclassified_column_allowed if {
	d := decide(["ai-agents"], {"reads": [customers], "columns": [customer_column("id", "expression"), customer_column("ssn", "output")]})
	d.action == "allow"
}

test_ai_agents_pii_readers_may_compute_on_classified_columns if {
	d := decide(["ai-agents", "pii-readers"], {"reads": [customers], "columns": [customer_column("ssn", "expression")]})
	d.action == "allow"
}

test_engineers_may_compute_on_classified_columns_masked if {
	d := decide(["engineers"], {"reads": [customers], "columns": [customer_column("ssn", "expression")]})
	d.action == "allow"
	d.masks == all_customer_masks
}

test_ai_agents_unclassified_predicate_allowed if {
	d := decide(["ai-agents"], {"reads": [customers], "columns": [customer_column("id", "predicate"), customer_column("ssn", "output")]})
	d.action == "allow"
}

test_ai_agents_oracle_denied_even_when_writing if {
	d := decide(["ai-agents"], {"command": "UPDATE", "category": "write", "has_where": true, "writes": [customers], "columns": [customer_column("email", "predicate")]})
	d.action == "deny"
}

test_ai_agents_pii_readers_may_use_classified_predicates if {
	d := decide(["ai-agents", "pii-readers"], {"reads": [customers], "columns": [customer_column("ssn", "predicate")]})
	d.action == "allow"
	d.masks == []
}

test_ai_agents_data_modifying_functions_approved if {
	every f in ["pg_catalog.lo_unlink", "pg_catalog.lo_put", "pg_catalog.lo_from_bytea", "pg_catalog.nextval", "public.setval"] {
		d := decide(["ai-agents"], {"command": "SELECT", "category": "read", "functions": [f]})
		d.action == "approve"
		d.reasons == ["ai-agents may not write without approval"]
	}
}

test_ai_agents_reading_functions_allowed if {
	d := decide(["ai-agents"], {"command": "SELECT", "category": "read", "functions": ["pg_catalog.lo_get", "pg_catalog.currval"]})
	d.action == "allow"
}

test_ai_agents_row_locks_approved if {
	d := decide(["ai-agents"], {"command": "SELECT", "category": "read", "flags": ["row_lock"]})
	d.action == "approve"
	d.reasons == ["ai-agents may not lock rows (SELECT ... FOR UPDATE/SHARE) without approval"]
	d.approvers == ["engineers", "admins"]
}

# What connection pools and drivers send around the statements themselves, as the analyser
# reports it: harmless for every row (RESET ALL and DISCARD ALL return to the login state;
# pgwarden reads search_path again after them).
pool_and_driver_statements := [
	{"command": "CLOSE", "category": "session"},
	{"command": "DISCARD", "category": "session", "flags": ["discard_all"]},
	{"command": "DISCARD", "category": "session"},
	{"command": "DEALLOCATE", "category": "session"},
	{"command": "RESET ALL", "category": "session"},
	{"command": "RESET", "category": "session"},
	{"command": "SET", "category": "session"},
	{"command": "SHOW", "category": "session"},
	{"command": "LISTEN", "category": "session"},
	{"command": "UNLISTEN", "category": "session"},
	{"command": "BEGIN", "category": "tcl"},
	{"command": "SAVEPOINT", "category": "tcl"},
	{"command": "COMMIT", "category": "tcl"},
	{"command": "FETCH", "category": "read"},
	{"command": "MOVE", "category": "read"},
	{"command": "DECLARE", "category": "read", "reads": [customers], "columns": [customer_column("email", "output")]},
]

test_pool_and_driver_statements_allowed_to_every_row if {
	every principal_groups in [["ai-agents"], ["engineers"], ["admins"]] {
		every statement in pool_and_driver_statements {
			decide(principal_groups, statement).action == "allow"
		}
	}
}
