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

test_admins_denied_unparsable_text if {
	d := decide(["admins", "pii-readers"], statement_of.unknown)
	d.action == "deny"
	d.reasons == ["statements that do not parse are denied to everyone, admins included"]
}

test_admins_win_over_lesser_groups if {
	decide(["ai-agents", "admins"], statement_of.dcl).action == "allow"
	decide(["engineers", "admins"], statement_of.ddl).action == "allow"
}
