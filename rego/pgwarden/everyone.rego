# Rules that hold whatever the principal's groups.
package pgwarden

deny_reasons contains "statements that do not parse are denied to all but admins" if {
	category == "unknown"
	not unparsed_text_for_admins
}

# Admins may send text the analyser could not understand: the server answers it (with its
# own 42601 syntax error, as drivers and tools expect) and the audit record keeps the text
# with its "unparsed:" fingerprint. Only the analyser's own "unknown": a category value this
# policy does not know is still denied. What it returns is masked whole (masks below).
unparsed_text_for_admins if {
	role == "admins"
	input.statement.category == "unknown"
}

# Without the catalog, views and * cannot be read through: the facts may not name every
# classified column in play, so nothing can be masked or checked reliably.
deny_reasons contains "the target's catalog is unavailable, so the statement cannot be checked" if {
	"catalog_unavailable" in flags
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
