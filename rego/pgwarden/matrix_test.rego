# The reference table: every group against every category.
package pgwarden

test_admins_by_category if {
	wrong := mismatches(["admins"], {
		"read": "allow", "write": "allow", "ddl": "allow", "dcl": "allow",
		"tcl": "allow", "session": "allow", "utility": "allow", "unknown": "allow",
	})
	print("admins mismatches [category, want, got]:", wrong)
	count(wrong) == 0
}

test_engineers_by_category if {
	wrong := mismatches(["engineers"], {
		"read": "allow", "write": "allow", "ddl": "approve", "dcl": "deny",
		"tcl": "allow", "session": "allow", "utility": "allow", "unknown": "deny",
	})
	print("engineers mismatches [category, want, got]:", wrong)
	count(wrong) == 0
}

test_ai_agents_by_category if {
	wrong := mismatches(["ai-agents"], {
		"read": "allow", "write": "approve", "ddl": "approve", "dcl": "deny",
		"tcl": "allow", "session": "allow", "utility": "approve", "unknown": "deny",
	})
	print("ai-agents mismatches [category, want, got]:", wrong)
	count(wrong) == 0
}

test_no_known_group_by_category if {
	every principal_groups in [[], ["pii-readers"], ["Admins"], ["readers", "viewers"]] {
		wrong := mismatches(principal_groups, {
			"read": "deny", "write": "deny", "ddl": "deny", "dcl": "deny",
			"tcl": "deny", "session": "deny", "utility": "deny", "unknown": "deny",
		})
		print(principal_groups, "mismatches [category, want, got]:", wrong)
		count(wrong) == 0
	}
}

test_no_known_group_reason if {
	d := decide(["pii-readers"], statement_of.read)
	d.reasons == ["principals in none of admins, engineers, ai-agents may not run statements"]
	d.approvers == []
	d.masks == []
}

test_missing_groups_denied if {
	d := decision with input as {"statement": statement_of.read}
	d.action == "deny"
}
