# Builders shared by the tests: a well-formed input with one statement, and its decision.
package pgwarden

base_statement := {
	"text": "SELECT 1",
	"fingerprint": "f",
	"protocol": "simple",
	"index": 0,
	"count": 1,
	"command": "SELECT",
	"category": "read",
	"reads": [],
	"writes": [],
	"columns": [],
	"functions": [],
	"has_where": false,
	"flags": [],
	"params": [],
	# A small plan, as the gateway gives every read it explains for a session rule that asks
	# for estimates (ai-agents); tests of a read without one remove it (without_estimate).
	"estimate": {"total_cost": 1.0, "plan_rows": 1, "relations": [], "seq_scan_over_threshold": false, "rows_over_threshold": false},
}

request(principal_groups, statement) := {
	"version": 1,
	"principal": {"subject": "test:principal", "issuer": "pgwarden", "groups": principal_groups, "token_id": "j", "claims": {}},
	"target": {"name": "app", "database": "appdb", "default_database": "appdb", "databases": [], "labels": {"env": "prod"}},
	"session": {"id": "s", "client_addr": "127.0.0.1", "application_name": "opa test", "user": "u", "in_transaction": false},
	"statement": object.union(base_statement, statement),
}

decide(principal_groups, statement) := d if {
	d := decision with input as request(principal_groups, statement)
}

# The decision for a statement the gateway gave no estimate.
decide_without_estimate(principal_groups, statement) := d if {
	d := decision with input as json.remove(request(principal_groups, statement), ["statement/estimate"])
}

# A typical statement of each category.
statement_of := {
	"read": {"command": "SELECT", "category": "read", "reads": [{"schema": "public", "table": "orders"}]},
	"write": {"command": "INSERT", "category": "write", "writes": [{"schema": "public", "table": "orders"}]},
	"ddl": {"command": "CREATE TABLE", "category": "ddl"},
	"dcl": {"command": "GRANT", "category": "dcl"},
	"tcl": {"command": "BEGIN", "category": "tcl"},
	"session": {"command": "SET", "category": "session"},
	"utility": {"command": "VACUUM", "category": "utility"},
	"unknown": {"command": "", "category": "unknown", "text": "SELEC 1"},
}

customers := {"schema": "public", "table": "customers"}

customer_column(column, usage) := object.union(customers, {"column": column, "usage": usage})

# The action for every (groups, category) pair in `expected` that differs from it.
mismatches(principal_groups, expected) := {[category, want, got] |
	some category, want in expected
	got := decide(principal_groups, statement_of[category]).action
	got != want
}
