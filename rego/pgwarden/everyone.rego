# Rules that hold whatever the principal's groups.
package pgwarden

deny_reasons contains "statements that do not parse are denied to everyone, admins included" if {
	category == "unknown"
}

deny_reasons contains "principals in none of admins, engineers, ai-agents may not run statements" if {
	role == "none"
}

allow_reasons contains sprintf("%s may control transactions and session settings", [role]) if {
	role in known_roles
	category in {"tcl", "session"}
}

# Fail closed: a statement no rule speaks for is denied, never silently allowed.
deny_reasons contains "no rule of the reference policy allows this statement" if {
	category != "unknown"
	role != "none"
	count(approval_reasons) == 0
	count(allow_reasons) == 0
}
