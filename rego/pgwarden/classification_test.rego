package pgwarden

all_customer_masks := [
	{"schema": "public", "table": "customers", "column": "card_number", "method": "hash"},
	{"schema": "public", "table": "customers", "column": "email", "method": "email"},
	{"schema": "public", "table": "customers", "column": "phone", "method": "partial"},
	{"schema": "public", "table": "customers", "column": "ssn", "method": "redact"},
]

test_bundle_data_classifies_customers if {
	data.pgwarden.classification["public.customers.email"] == "email"
	data.pgwarden.classification["public.customers.phone"] == "partial"
	data.pgwarden.classification["public.customers.ssn"] == "redact"
	data.pgwarden.classification["public.customers.card_number"] == "hash"
}

test_bundle_data_classifies_credentials if {
	data.pgwarden.classification["pg_catalog.pg_authid.rolpassword"] == "redact"
	data.pgwarden.classification["pg_catalog.pg_shadow.passwd"] == "redact"
	data.pgwarden.classification["pg_catalog.pg_user_mapping.umoptions"] == "null"
	data.pgwarden.classification["pg_catalog.pg_user_mappings.umoptions"] == "null"
}

test_credentials_masked_for_all_but_pii_readers if {
	authid := {"schema": "pg_catalog", "table": "pg_authid"}
	every principal_groups in [["ai-agents"], ["engineers"], ["admins"]] {
		d := decide(principal_groups, {"reads": [authid]})
		d.action == "allow"
		d.masks == [{"schema": "pg_catalog", "table": "pg_authid", "column": "rolpassword", "method": "redact"}]
	}
	decide(["admins", "pii-readers"], {"reads": [authid]}).masks == []
}

test_output_column_masked_with_classified_method if {
	d := decide(["engineers"], {"columns": [customer_column("phone", "output")]})
	d.action == "allow"
	d.masks == [{"schema": "public", "table": "customers", "column": "phone", "method": "partial"}]
}

test_every_classified_column_of_a_read_table_masked if {
	# SELECT row_to_json(c) FROM customers c: no column reference, every column in play.
	d := decide(["ai-agents"], {"reads": [customers]})
	d.masks == all_customer_masks
}

test_written_table_masked_for_returning if {
	d := decide(["engineers"], {"command": "INSERT", "category": "write", "writes": [customers]})
	d.masks == all_customer_masks
}

test_masks_deduplicated if {
	d := decide(["admins"], {"reads": [customers, customers], "columns": [customer_column("email", "output"), customer_column("email", "output")]})
	d.masks == all_customer_masks
}

test_admins_masked_unless_pii_readers if {
	decide(["admins"], {"reads": [customers]}).masks == all_customer_masks
	decide(["admins", "pii-readers"], {"reads": [customers]}).masks == []
}

test_pii_readers_unmasked if {
	every principal_groups in [["engineers", "pii-readers"], ["ai-agents", "pii-readers"]] {
		d := decide(principal_groups, {"reads": [customers], "columns": [customer_column("ssn", "output")]})
		d.action == "allow"
		d.masks == []
	}
}

test_unclassified_tables_unmasked if {
	d := decide(["ai-agents"], {"reads": [{"schema": "public", "table": "orders"}], "columns": [{"schema": "public", "table": "orders", "column": "email", "usage": "output"}]})
	d.masks == []
}

test_other_schema_not_confused if {
	d := decide(["ai-agents"], {"reads": [{"schema": "archive", "table": "customers"}]})
	d.masks == []
}

test_masks_travel_with_approval if {
	d := decide(["ai-agents"], {"command": "DELETE", "category": "write", "has_where": true, "writes": [customers], "columns": [customer_column("email", "returning")]}) with data.pgwarden.classification as {"public.customers.ssn": "redact"}
	d.action == "approve"
	d.masks == [{"schema": "public", "table": "customers", "column": "ssn", "method": "redact"}]
}

test_denied_statement_has_no_masks if {
	d := decide(["engineers"], {"command": "GRANT", "category": "dcl", "reads": [customers]})
	d.action == "deny"
	d.masks == []
}

test_unknown_method_becomes_redact if {
	d := decide(["engineers"], {"reads": [customers]}) with data.pgwarden.classification as {"public.customers.ssn": "scramble"}
	d.masks == [{"schema": "public", "table": "customers", "column": "ssn", "method": "redact"}]
}

test_every_method_passes_through if {
	every method in ["redact", "null", "hash", "partial", "email"] {
		d := decide(["engineers"], {"reads": [customers]}) with data.pgwarden.classification as {"public.customers.ssn": method}
		d.masks[0].method == method
	}
}

test_malformed_keys_ignored_for_tables if {
	d := decide(["engineers"], {"reads": [customers]}) with data.pgwarden.classification as {"public.customers": "redact", "customers.ssn": "hash"}
	d.masks == []
}

test_no_classification_data if {
	d := decide(["ai-agents"], {"reads": [customers], "columns": [customer_column("ssn", "predicate")]}) with data.pgwarden.classification as null
	d.action == "allow"
	d.masks == []
}

pg_stats := {"schema": "pg_catalog", "table": "pg_stats"}

test_statistics_samples_masked_while_anything_is_classified if {
	d := decide(["ai-agents"], {"reads": [pg_stats], "columns": [object.union(pg_stats, {"column": "histogram_bounds", "usage": "output"})]})
	d.action == "allow"
	d.masks == [
		{"schema": "pg_catalog", "table": "pg_stats", "column": "histogram_bounds", "method": "null"},
		{"schema": "pg_catalog", "table": "pg_stats", "column": "most_common_elems", "method": "null"},
		{"schema": "pg_catalog", "table": "pg_stats", "column": "most_common_vals", "method": "null"},
	]
}

test_statistics_samples_are_an_oracle_too if {
	d := decide(["ai-agents"], {"reads": [pg_stats], "columns": [object.union(pg_stats, {"column": "most_common_vals", "usage": "predicate"})]})
	d.action == "deny"
}

test_statistics_samples_open_to_pii_readers if {
	decide(["ai-agents", "pii-readers"], {"reads": [pg_stats]}).masks == []
}

test_statistics_samples_unmasked_without_classification if {
	decide(["ai-agents"], {"reads": [pg_stats]}).masks == [] with data.pgwarden.classification as {}
}

test_value_channels_denied_with_classified_columns_in_play if {
	every f in ["pg_catalog.set_config", "pg_notify", "pg_catalog.pg_advisory_lock", "pg_try_advisory_xact_lock_shared", "pg_sleep_for", "lo_from_bytea", "public.SETVAL"] {
		d := decide(["ai-agents"], {"reads": [customers], "functions": [f]})
		d.action == "deny"
		contains(concat(" ", d.reasons), "would carry their values past the masks")
	}
	decide(["engineers"], {"reads": [customers], "functions": ["pg_notify"]}).action == "deny"
}

test_value_channels_allowed_without_classified_columns if {
	decide(["ai-agents"], {"reads": [{"schema": "public", "table": "orders"}], "functions": ["pg_catalog.set_config"]}).action == "allow"
	decide(["ai-agents", "pii-readers"], {"reads": [customers], "functions": ["pg_advisory_lock"]}).action == "allow"
	decide(["ai-agents"], {"reads": [customers], "functions": ["pg_catalog.upper"]}).action == "allow"
}

pg_stat_activity := {"schema": "pg_catalog", "table": "pg_stat_activity"}

test_other_sessions_statement_text_masked_for_ai_agents if {
	d := decide(["ai-agents"], {"reads": [pg_stat_activity]})
	d.action == "allow"
	d.masks == [{"schema": "pg_catalog", "table": "pg_stat_activity", "column": "query", "method": "redact"}]
	decide(["ai-agents"], {"reads": [pg_stat_activity], "columns": [object.union(pg_stat_activity, {"column": "query", "usage": "predicate"})]}).action == "deny"
	decide(["engineers"], {"reads": [pg_stat_activity]}).masks == []
	decide(["ai-agents", "pii-readers"], {"reads": [pg_stat_activity]}).masks == []
}

test_statement_text_functions_denied_to_ai_agents if {
	every f in ["pg_catalog.pg_stat_get_activity", "pg_stat_get_backend_activity"] {
		decide(["ai-agents"], {"functions": [f]}).action == "deny"
		decide(["engineers"], {"functions": [f]}).action == "allow"
	}
}

notes_body(usage) := {"schema": "public", "table": "notes", "column": "body", "usage": usage}

mask_keys(d) := {concat(".", [m.schema, m.table, m.column]) | some m in d.masks}

test_opaque_function_puts_every_classified_column_in_play if {
	every principal_groups in [["engineers"], ["admins"], ["ai-agents"]] {
		d := decide(principal_groups, {"functions": ["pg_catalog.table_to_xml"], "flags": ["opaque_function"]})
		d.action in {"allow", "approve"}
		every key, _ in data.pgwarden.classification {
			key in mask_keys(d)
		}
	}
	decide(["engineers", "pii-readers"], {"functions": ["pg_catalog.table_to_xml"], "flags": ["opaque_function"]}).masks == []
}

test_copied_classified_value_masks_every_assigned_column if {
	copy := {
		"command": "UPDATE", "category": "write", "has_where": true, "writes": [{"schema": "public", "table": "notes"}],
		"columns": [notes_body("assignment"), customer_column("email", "source"), notes_body("returning")],
	}
	d := decide(["admins"], copy)
	d.action == "allow"
	{"schema": "public", "table": "notes", "column": "body", "method": "redact"} in d.masks
	decide(["admins", "pii-readers"], copy).masks == []
}

test_unclassified_source_masks_nothing if {
	d := decide(["engineers"], {
		"command": "UPDATE", "category": "write", "has_where": true, "writes": [{"schema": "public", "table": "notes"}],
		"columns": [notes_body("assignment"), customer_column("name", "source")],
	})
	d.action == "allow"
	d.masks == []
}

test_function_call_with_masks_in_play_denied if {
	call := {"command": "FUNCTION CALL", "category": "utility", "functions": ["pg_catalog.query_to_xml"], "flags": ["function_call", "opaque_function"]}
	every principal_groups in [["engineers"], ["admins"]] {
		d := decide(principal_groups, call)
		d.action == "deny"
		d.reasons == ["classified columns may be in play and the FunctionCall message's result cannot be masked"]
	}
	decide(["engineers", "pii-readers"], call).action == "allow"
	plain := {"command": "FUNCTION CALL", "category": "utility", "functions": ["pg_catalog.now"], "flags": ["function_call"]}
	decide(["engineers"], plain).action == "allow"
}

test_a_write_through_opaque_code_masks_every_assigned_column if {
	write := {
		"command": "INSERT", "category": "write", "writes": [{"schema": "public", "table": "notes"}],
		"columns": [notes_body("assignment")], "functions": ["public.pl_mail"], "flags": ["opaque_function"],
	}
	d := decide(["admins"], write)
	d.action == "allow"
	{"schema": "public", "table": "notes", "column": "body", "method": "redact"} in d.masks
	decide(["admins", "pii-readers"], write).masks == []
	unparsed := {"command": "UNKNOWN", "category": "unknown", "writes": [{"schema": "public", "table": "notes"}], "columns": [notes_body("assignment")]}
	{"schema": "public", "table": "notes", "column": "body", "method": "redact"} in decide(["admins"], unparsed).masks
}

test_a_read_through_opaque_code_assigns_nothing if {
	read := {"command": "SELECT", "category": "read", "columns": [notes_body("output")], "functions": ["public.pl_mail"], "flags": ["opaque_function"]}
	not {"schema": "public", "table": "notes", "column": "body", "method": "redact"} in decide(["admins"], read).masks
}
