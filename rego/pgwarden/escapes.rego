# Server-side escapes and privilege changes: denied to everyone but admins.
package pgwarden

# Functions that read or write server files, reach other servers, signal backends or
# reload configuration. Matched on the unqualified name so that a function of the same
# name in another schema (public.pg_read_file) is caught as well.
escape_functions := {
	"pg_read_file",
	"pg_read_binary_file",
	"pg_ls_dir",
	"pg_stat_file",
	"lo_import",
	"lo_export",
	"pg_terminate_backend",
	"pg_cancel_backend",
	"pg_reload_conf",
	# adminpack writes server files, the same escape as reading them.
	"pg_file_write",
	"pg_file_rename",
	"pg_file_unlink",
	"pg_file_sync",
	# Logical decoding hands out every table's changes, unmasked; replication slots keep
	# WAL on the server's disk; the rest control the server process itself.
	"pg_create_logical_replication_slot",
	"pg_create_physical_replication_slot",
	"pg_copy_logical_replication_slot",
	"pg_copy_physical_replication_slot",
	"pg_drop_replication_slot",
	"pg_replication_slot_advance",
	"pg_logical_emit_message",
	"pg_promote",
	"pg_switch_wal",
	"pg_rotate_logfile",
	"pg_create_restore_point",
	"pg_backup_start",
	"pg_backup_stop",
}

# Name prefixes of escape function families: dblink*, pg_ls_* (pg_ls_dir, pg_ls_waldir,
# pg_ls_logdir, ... all list server directories) and pg_logical_slot_* (get or peek the
# changes decoded from WAL).
escape_function_prefixes := {"dblink", "pg_ls_", "pg_logical_slot_"}

escape_commands := {
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
}

escape_flags := {
	"copy_program": "COPY ... PROGRAM",
	"copy_server_file": "COPY to or from a server file",
	"set_role": "changing role",
	"set_session_authorization": "changing session authorization",
	"set_replication_role": "session_replication_role (switches off triggers and foreign keys)",
}

escapes contains sprintf("function %s", [f]) if {
	some f in functions
	unqualified(f) in escape_functions
}

escapes contains sprintf("function %s", [f]) if {
	some f in functions
	some prefix in escape_function_prefixes
	startswith(unqualified(f), prefix)
}

escapes contains command if command in escape_commands

escapes contains what if {
	some flag, what in escape_flags
	flag in flags
}

deny_reasons contains sprintf("%s may not use server-side escapes (%s): only admins may", [role, escape]) if {
	role in {"engineers", "ai-agents"}
	some escape in escapes
}

deny_reasons contains sprintf("%s may not change privileges or roles (%s): only admins may", [role, command]) if {
	role in {"engineers", "ai-agents"}
	category == "dcl"
}
