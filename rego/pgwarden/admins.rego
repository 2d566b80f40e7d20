# The admins row: everything that parses, escapes included (masks still apply).
package pgwarden

allow_reasons contains "admins may run any statement" if {
	role == "admins"
	category != "unknown"
}

allow_reasons contains "admins may send text pgwarden cannot analyse (category unknown): the server answers it" if {
	unparsed_text_for_admins
}
