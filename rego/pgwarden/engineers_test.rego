package pgwarden

test_engineers_read if {
	d := decide(["engineers"], statement_of.read)
	d.action == "allow"
	d.reasons == ["engineers may read"]
}

test_engineers_write_with_where if {
	every command in ["INSERT", "UPDATE", "DELETE", "MERGE", "COPY"] {
		d := decide(["engineers"], {"command": command, "category": "write", "has_where": true, "writes": [customers]})
		d.action == "allow"
		d.reasons == ["engineers may write"]
	}
}

test_engineers_insert_merge_copy_need_no_where if {
	every command in ["INSERT", "MERGE", "COPY"] {
		decide(["engineers"], {"command": command, "category": "write", "has_where": false}).action == "allow"
	}
}

test_engineers_unbounded_update_delete_approved_by_admins if {
	every command in ["UPDATE", "DELETE"] {
		d := decide(["engineers"], {"command": command, "category": "write", "has_where": false})
		d.action == "approve"
		d.reasons == ["engineers may not UPDATE or DELETE without a WHERE clause without approval"]
		d.approvers == ["admins"]
	}
}

test_engineers_missing_has_where_counts_as_unbounded if {
	d := decide(["engineers"], {"command": "DELETE", "category": "write", "has_where": null})
	d.action == "approve"
}

test_engineers_hidden_unbounded_writes_approved if {
	# WITH d AS (DELETE FROM t) SELECT * FROM d
	decide(["engineers"], {"command": "SELECT", "category": "write", "flags": ["dml_in_cte"]}).action == "approve"

	# EXPLAIN ANALYZE DELETE FROM t
	decide(["engineers"], {"command": "EXPLAIN", "category": "write", "flags": ["explain_analyze"], "writes": [customers]}).action == "approve"
}

test_engineers_hidden_bounded_writes_allowed if {
	decide(["engineers"], {"command": "SELECT", "category": "write", "flags": ["dml_in_cte"], "has_where": true}).action == "allow"
	decide(["engineers"], {"command": "EXPLAIN", "category": "write", "flags": ["explain_analyze"], "has_where": true}).action == "allow"
}

test_engineers_truncate_approved_by_admins if {
	every category in ["write", "ddl"] {
		d := decide(["engineers"], {"command": "TRUNCATE", "category": category, "writes": [customers]})
		d.action == "approve"
		"engineers may not TRUNCATE without approval" in d.reasons
		d.approvers == ["admins"]
	}
}

test_engineers_ddl_approved_by_admins if {
	every command in ["CREATE TABLE", "ALTER TABLE", "DROP TABLE", "CREATE INDEX"] {
		d := decide(["engineers"], {"command": command, "category": "ddl"})
		d.action == "approve"
		d.reasons == ["engineers may not change the schema (DDL) without approval"]
		d.approvers == ["admins"]
	}
}

test_engineers_select_into_is_ddl if {
	d := decide(["engineers"], {"command": "SELECT", "category": "read", "flags": ["select_into"]})
	d.action == "approve"
	d.reasons == ["engineers may not change the schema (DDL) without approval"]
}

test_engineers_dcl_denied if {
	every command in ["GRANT", "REVOKE", "ALTER DEFAULT PRIVILEGES"] {
		d := decide(["engineers"], {"command": command, "category": "dcl"})
		d.action == "deny"
		sprintf("engineers may not change privileges or roles (%s): only admins may", [command]) in d.reasons
	}
}

test_engineers_utility_allowed if {
	every command in ["VACUUM", "ANALYZE", "CHECKPOINT"] {
		decide(["engineers"], {"command": command, "category": "utility"}).action == "allow"
	}
}

test_engineers_do_block_approved if {
	d := decide(["engineers"], {"command": "DO", "category": "utility", "flags": ["procedural"]})
	d.action == "approve"
	d.reasons == ["engineers may not run DO blocks (opaque code) without approval"]
}

test_engineers_call_allowed if {
	decide(["engineers"], {"command": "CALL", "category": "write", "has_where": false}).action == "allow"
}

test_engineers_win_over_ai_agents if {
	decide(["ai-agents", "engineers"], {"command": "INSERT", "category": "write"}).action == "allow"
}

test_engineers_may_use_classified_columns_in_predicates if {
	d := decide(["engineers"], {"reads": [customers], "columns": [customer_column("ssn", "predicate")]})
	d.action == "allow"
}

test_engineers_row_locks_and_data_modifying_functions_allowed if {
	every statement in [
		{"command": "SELECT", "category": "read", "flags": ["row_lock"]},
		{"command": "SELECT", "category": "read", "functions": ["pg_catalog.nextval"]},
	] {
		d := decide(["engineers"], statement)
		d.action == "allow"
	}
}

test_engineers_copying_a_classified_value_need_approval if {
	copy := {
		"command": "INSERT", "category": "write", "writes": [{"schema": "public", "table": "notes"}],
		"columns": [
			{"schema": "public", "table": "notes", "column": "body", "usage": "assignment"},
			customer_column("ssn", "source"),
		],
	}
	d := decide(["engineers"], copy)
	d.action == "approve"
	d.reasons == ["engineers may not copy classified column public.customers.ssn into a written column without approval"]
	d.approvers == ["admins"]
	{"schema": "public", "table": "notes", "column": "body", "method": "redact"} in d.masks
	decide(["engineers", "pii-readers"], copy).action == "allow"
}

test_engineers_writing_what_opaque_code_computes_need_approval if {
	write := {
		"command": "INSERT", "category": "write", "writes": [{"schema": "public", "table": "notes"}],
		"columns": [{"schema": "public", "table": "notes", "column": "body", "usage": "assignment"}],
		"functions": ["public.pl_mail"], "flags": ["opaque_function"],
	}
	d := decide(["engineers"], write)
	d.action == "approve"
	"engineers may not write what code the policy cannot see into computes without approval while columns are classified" in d.reasons
	d.approvers == ["admins"]
	decide(["engineers", "pii-readers"], write).action == "allow"
	seen := object.union(write, {"functions": ["pg_catalog.upper"], "flags": []})
	decide(["engineers"], seen).action == "allow"
}
