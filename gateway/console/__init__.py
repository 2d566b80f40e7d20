"""The web console for approvers and auditors, served by the admin listener under /console."""
