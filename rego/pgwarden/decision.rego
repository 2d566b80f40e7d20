# Assembles the decision: any deny reason denies, else any approval reason holds, else allow.
package pgwarden

# Total by construction: every part below has a final else. Allow is never a fallthrough:
# everyone.rego denies a statement that no rule allows or holds.
decision := object.union(
	{
		"action": action,
		"reasons": reasons,
		"approvers": approvers,
		"approvers_required": approvers_required,
		"masks": masks,
	},
	limits_part,
)

# Budgets per statement for the row that governs the principal (data.pgwarden.statement_limits:
# max_rows, max_bytes, max_rows_total, statement_timeout_ms); the gateway enforces them as the
# result is relayed. A denied statement has nothing to bound.
limits_part := {"limits": data.pgwarden.statement_limits[role]} if {
	action != "deny"
} else := {}

action := "deny" if {
	count(deny_reasons) > 0
} else := "approve" if {
	count(approval_reasons) > 0
} else := "allow"

reasons := sort(deny_reasons) if {
	action == "deny"
} else := sort(approval_reasons) if {
	action == "approve"
} else := sort(allow_reasons)

approvers := object.get(approvers_by_role, role, ["admins"]) if {
	action == "approve"
} else := []

# Four eyes: a schema change an AI agent asks for needs two distinct approvers (the
# requester is never one of them). Everything else needs one.
approvers_required := 2 if {
	action == "approve"
	role == "ai-agents"
	changes_schema
} else := 1

# Masks travel with allow and approve alike: an approved statement runs later and its
# results still need masking. A denied statement returns nothing to mask.
masks := sort(masks_in_play) if {
	action != "deny"
} else := []
