# Maps the principal's groups onto the row of the reference policy that governs it.
package pgwarden

groups := {g | some g in input.principal.groups}

known_roles := {"admins", "engineers", "ai-agents"}

# Groups grant, never restrict: a principal in several groups gets its most privileged row.
role := "admins" if {
	"admins" in groups
} else := "engineers" if {
	"engineers" in groups
} else := "ai-agents" if {
	"ai-agents" in groups
} else := "none"

# pii-readers is orthogonal to the rows: it only lifts column masking (and with it the
# oracle rule, which exists to protect masked values).
pii_reader if "pii-readers" in groups

# Who may approve what a role asked for. Admins never need approval.
approvers_by_role := {
	"engineers": ["admins"],
	"ai-agents": ["engineers", "admins"],
}
