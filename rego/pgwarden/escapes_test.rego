package pgwarden

escape_function_names := [
	"pg_read_file",
	"pg_read_binary_file",
	"pg_ls_dir",
	"pg_stat_file",
	"lo_import",
	"lo_export",
	"dblink",
	"dblink_exec",
	"dblink_connect_u",
	"pg_terminate_backend",
	"pg_cancel_backend",
	"pg_reload_conf",
	"pg_ls_waldir",
	"pg_file_write",
]

escape_command_names := [
	"ALTER SYSTEM",
	"LOAD",
	"CREATE EXTENSION",
	"SET ROLE",
	"SET SESSION AUTHORIZATION",
	"GRANT",
	"REVOKE",
	"CREATE ROLE",
	"ALTER ROLE",
	"DROP ROLE",
	"CREATE USER",
	"ALTER USER",
	"DROP USER",
	"CREATE GROUP",
	"ALTER GROUP",
	"DROP GROUP",
]

escape_flag_names := [
	"copy_program",
	"copy_server_file",
	"set_role",
	"set_session_authorization",
	"set_replication_role",
]

test_escape_functions_denied_to_non_admins if {
	every name in escape_function_names {
		every principal_groups in [["engineers"], ["ai-agents"], ["engineers", "pii-readers"]] {
			qualified := sprintf("pg_catalog.%s", [name])
			d := decide(principal_groups, {"command": "SELECT", "category": "read", "functions": ["pg_catalog.now", qualified]})
			d.action == "deny"
			sprintf("%s may not use server-side escapes (function %s): only admins may", [role_of(principal_groups), qualified]) in d.reasons
		}
	}
}

role_of(principal_groups) := r if {
	r := role with input as {"principal": {"groups": principal_groups}}
}

test_escape_functions_allowed_to_admins if {
	every name in escape_function_names {
		decide(["admins"], {"functions": [sprintf("pg_catalog.%s", [name])]}).action == "allow"
	}
}

test_shadowed_escape_function_caught if {
	every name in ["public.pg_read_file", "myschema.dblink", "pg_read_file", "\"public\".\"PG_READ_FILE\""] {
		d := decide(["engineers"], {"functions": [name]})
		d.action == "deny"
	}
}

test_ordinary_functions_allowed if {
	d := decide(["ai-agents"], {"functions": ["pg_catalog.now", "public.read_file_summary", "pg_catalog.set_config"]})
	d.action == "allow"
}

test_escape_commands_denied_to_non_admins if {
	every command in escape_command_names {
		every principal_groups in [["engineers"], ["ai-agents"]] {
			d := decide(principal_groups, {"command": command, "category": "utility"})
			d.action == "deny"
			sprintf("%s may not use server-side escapes (%s): only admins may", [role_of(principal_groups), command]) in d.reasons
		}
	}
}

test_escape_commands_matched_case_insensitively if {
	decide(["engineers"], {"command": "alter system", "category": "utility"}).action == "deny"
}

test_escape_commands_allowed_to_admins if {
	every command in escape_command_names {
		decide(["admins"], {"command": command, "category": "utility"}).action == "allow"
	}
}

test_escape_flags_denied_to_non_admins if {
	every flag in escape_flag_names {
		every principal_groups in [["engineers"], ["ai-agents"]] {
			# COPY t TO PROGRAM 'sh', COPY t FROM '/etc/passwd', SELECT set_config('role', ...)
			d := decide(principal_groups, {"command": "COPY", "category": "read", "flags": [flag]})
			d.action == "deny"
			sprintf("%s may not use server-side escapes (%s): only admins may", [role_of(principal_groups), escape_flags[flag]]) in d.reasons
		}
	}
}

test_escape_flags_allowed_to_admins if {
	every flag in escape_flag_names {
		decide(["admins"], {"command": "COPY", "category": "write", "flags": [flag]}).action == "allow"
	}
}

test_set_config_role_denied if {
	d := decide(["ai-agents"], {"command": "SELECT", "category": "read", "functions": ["pg_catalog.set_config"], "flags": ["set_role"]})
	d.action == "deny"
	d.reasons == ["ai-agents may not use server-side escapes (changing role): only admins may"]
}

test_escapes_denied_to_no_known_group if {
	d := decide([], {"command": "ALTER SYSTEM", "category": "utility"})
	d.action == "deny"
}

test_logical_decoding_and_server_control_are_escapes if {
	every f in [
		"pg_catalog.pg_logical_slot_get_changes",
		"pg_catalog.pg_logical_slot_peek_binary_changes",
		"pg_catalog.pg_create_logical_replication_slot",
		"pg_catalog.pg_switch_wal",
		"pg_catalog.pg_promote",
	] {
		d := decide(["engineers"], {"command": "SELECT", "category": "read", "functions": [f]})
		d.action == "deny"
		sprintf("engineers may not use server-side escapes (function %s): only admins may", [f]) in d.reasons
	}
}
