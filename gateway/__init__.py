"""pgwarden: a policy-as-code gateway for PostgreSQL."""
