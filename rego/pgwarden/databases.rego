# Which database of a target a session may use: the target's default database for everyone
# who may run statements; another one only where the target serves it, and then only to
# admins and engineers (ai-agents keep to the default).
package pgwarden

session_database := object.get(input, ["target", "database"], "")

# An input without a default (an older gateway, a hand-written input) reaches the default.
default_database := object.get(input, ["target", "default_database"], session_database)

other_database if session_database != default_database

target_serves_database if "*" in object.get(input, ["target", "databases"], [])

target_serves_database if session_database in object.get(input, ["target", "databases"], [])

deny_reasons contains sprintf(
	"target %s does not serve database %s (only its default database %s and those it lists)",
	[object.get(input, ["target", "name"], ""), session_database, default_database],
) if {
	other_database
	not target_serves_database
}

deny_reasons contains sprintf(
	"ai-agents may use only the default database %s of target %s, not %s",
	[default_database, object.get(input, ["target", "name"], ""), session_database],
) if {
	role == "ai-agents"
	other_database
}
