"""What the deployment artefacts may name: the settings of gateway/settings.py and the
names issue 13's shared contract gives to parts built on another branch (the admin listener,
logging, the metrics), so that a deployment file naming anything else fails a test."""

from __future__ import annotations

from gateway.reload import flat_settings
from gateway.settings import Settings

# Settings of the admin listener and of logging (wt/opsadmin); merged, they are in Settings.
CONTRACT_SETTINGS = frozenset(
    {
        "admin.host",
        "admin.port",
        "admin.tls_cert",
        "admin.tls_key",
        "admin.token_groups",
        "log.format",
        "log.level",
    }
)

# The Prometheus metrics the gateway exports, by name: the Grafana dashboard is built on them.
METRICS = {
    "pgwarden_sessions_open": "gauge",
    "pgwarden_sessions_total": "counter",
    "pgwarden_statements_total": "counter",
    "pgwarden_masked_statements_total": "counter",
    "pgwarden_decision_seconds": "histogram",
    "pgwarden_decision_cache_total": "counter",
    "pgwarden_opa_up": "gauge",
    "pgwarden_opa_restarts_total": "counter",
    "pgwarden_audit_position": "gauge",
    "pgwarden_audit_commit_seconds": "histogram",
    "pgwarden_audit_index_lag_records": "gauge",
    "pgwarden_audit_writer_up": "gauge",
    "pgwarden_audit_writer_restarts_total": "counter",
    "pgwarden_upstream_connect_errors_total": "counter",
    "pgwarden_bytes_relayed_total": "counter",
}


def setting_names() -> set[str]:
    """Every setting by dotted name (`listener.port`), the contract's included."""
    return set(flat_settings(Settings.model_construct())) | CONTRACT_SETTINGS


def setting_of_env(name: str) -> str:
    """`PGWARDEN_LISTENER__PORT` → `listener.port`."""
    assert name.startswith("PGWARDEN_"), name
    return name.removeprefix("PGWARDEN_").lower().replace("__", ".")
