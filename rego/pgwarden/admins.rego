# The admins row: everything that parses, escapes included (masks still apply).
package pgwarden

allow_reasons contains "admins may run any statement" if {
	role == "admins"
	category != "unknown"
}
