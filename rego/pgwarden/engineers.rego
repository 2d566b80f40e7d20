# The engineers row: read and write freely; what is hard to undo waits for an admin.
package pgwarden

allow_reasons contains "engineers may read" if {
	role == "engineers"
	category == "read"
}

allow_reasons contains "engineers may write" if {
	role == "engineers"
	writes_data
}

allow_reasons contains "engineers may run maintenance commands" if {
	role == "engineers"
	category == "utility"
}

approval_reasons contains "engineers may not UPDATE or DELETE without a WHERE clause without approval" if {
	role == "engineers"
	unbounded_write
}

approval_reasons contains "engineers may not TRUNCATE without approval" if {
	role == "engineers"
	command == "TRUNCATE"
}

approval_reasons contains "engineers may not change the schema (DDL) without approval" if {
	role == "engineers"
	changes_schema
}

# DESIGN is silent on DO for engineers; a block the policy cannot see into could do
# anything the gateway's credential may, so an admin looks at it first.
approval_reasons contains "engineers may not run DO blocks (opaque code) without approval" if {
	role == "engineers"
	do_block
}

# A classified value copied into another column (UPDATE ... SET note = email, INSERT ...
# SELECT ssn) leaves its mask behind: any later SELECT of that column reads it in
# cleartext. An admin looks at the copy first; pii-readers copy nothing classified.
approval_reasons contains sprintf(
	"engineers may not copy classified column %s into a written column without approval",
	[key],
) if {
	role == "engineers"
	some key in copied_classified
}

# The same copy made by code the policy cannot see into: which classified column it copies
# is unknown, so an admin looks at it whatever it copies.
approval_reasons contains "engineers may not write what code the policy cannot see into computes without approval while columns are classified" if {
	role == "engineers"
	copies_unseen_values
}
