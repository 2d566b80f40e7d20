package pgwarden

# The target `app` (default database appdb) reached at another database, serving `databases`.
in_database(principal_groups, statement, database, databases) := d if {
	req := request(principal_groups, statement)
	target := object.union(req.target, {"database": database, "databases": databases})
	d := decision with input as object.union(req, {"target": target})
}

connect_statement := {"command": "CONNECT", "category": "session", "text": "-- startup: connect to database \"scratch\"", "flags": ["connect"]}

test_admins_and_engineers_use_a_database_the_target_serves if {
	every groups in [["admins"], ["engineers"]] {
		every statement in [connect_statement, statement_of.read, statement_of.write] {
			in_database(groups, statement, "scratch", ["scratch"]).action == "allow"
			in_database(groups, statement, "scratch", ["*"]).action == "allow"
		}
	}
}

test_ai_agents_keep_to_the_default_database if {
	every statement in [connect_statement, statement_of.read] {
		d := in_database(["ai-agents"], statement, "scratch", ["*"])
		d.action == "deny"
		d.reasons == ["ai-agents may use only the default database appdb of target app, not scratch"]
	}
}

test_ai_agents_in_several_groups_get_the_most_privileged_row if {
	in_database(["ai-agents", "engineers"], statement_of.read, "scratch", ["*"]).action == "allow"
}

test_a_database_the_target_does_not_serve_is_denied_to_everyone if {
	every groups in [["admins"], ["engineers"], ["ai-agents"]] {
		every databases in [[], ["other"]] {
			d := in_database(groups, statement_of.read, "scratch", databases)
			d.action == "deny"
			"target app does not serve database scratch (only its default database appdb and those it lists)" in d.reasons
		}
	}
}

test_the_default_database_is_everyones if {
	decide(["ai-agents"], statement_of.read).action == "allow"
	in_database(["ai-agents"], statement_of.read, "appdb", []).action == "allow"
}

test_an_input_without_a_default_database_reaches_the_default if {
	req := request(["ai-agents"], statement_of.read)
	target := object.remove(req.target, ["default_database"])
	d := decision with input as object.union(object.remove(req, ["target"]), {"target": target})
	d.action == "allow"
}

test_connect_is_a_session_statement_for_every_known_role if {
	every groups in [["admins"], ["engineers"], ["ai-agents"]] {
		in_database(groups, connect_statement, "appdb", []).action == "allow"
	}
	in_database([], connect_statement, "appdb", []).action == "deny"
}
