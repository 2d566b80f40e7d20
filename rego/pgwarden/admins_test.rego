package pgwarden

test_admins_allowed_everything_that_parses if {
	every category in object.keys(statement_of) - {"unknown"} {
		d := decide(["admins"], statement_of[category])
		d.action == "allow"
		"admins may run any statement" in d.reasons
		d.approvers == []
	}
}

test_admins_allowed_escapes if {
	every statement in [
		{"command": "SELECT", "functions": ["pg_catalog.pg_read_file"]},
		{"command": "ALTER SYSTEM", "category": "utility"},
		{"command": "COPY", "category": "write", "flags": ["copy_program"]},
		{"command": "SET ROLE", "category": "session", "flags": ["set_role"]},
		{"command": "CREATE ROLE", "category": "dcl"},
	] {
		decide(["admins"], statement).action == "allow"
	}
}

test_admins_never_need_approval if {
	every statement in [
		{"command": "DELETE", "category": "write", "has_where": false},
		{"command": "TRUNCATE", "category": "write"},
		{"command": "DO", "category": "utility", "flags": ["procedural"]},
		{"command": "CALL", "category": "write"},
	] {
		decide(["admins"], statement).action == "allow"
	}
}

test_admins_may_send_unparsable_text if {
	d := decide(["admins", "pii-readers"], statement_of.unknown)
	d.action == "allow"
	d.reasons == ["admins may send text pgwarden cannot analyse (category unknown): the server answers it"]
	d.masks == []
}

# Nothing says which columns unanalysed text reads: every classified column is masked.
test_admins_unparsable_text_masks_every_classified_column if {
	d := decide(["admins"], statement_of.unknown)
	d.action == "allow"
	keys := {concat(".", [m.schema, m.table, m.column]) | some m in d.masks}
	keys == {k | some k, _ in classified} with input as request(["admins"], statement_of.unknown)
	"public.customers.email" in keys
}

# Only the analyser's own "unknown": a category this policy does not know stays denied.
test_admins_denied_unrecognised_category if {
	d := decide(["admins"], {"command": "SELECT", "category": "frobnicate"})
	d.action == "deny"
	d.reasons == ["statements that do not parse are denied to all but admins"]
}

test_admins_win_over_lesser_groups if {
	decide(["ai-agents", "admins"], statement_of.dcl).action == "allow"
	decide(["engineers", "admins"], statement_of.ddl).action == "allow"
}
