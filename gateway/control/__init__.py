"""The control plane: what operators register (targets today; tokens, approvals, grants)."""
