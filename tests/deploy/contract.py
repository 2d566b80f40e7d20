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

# The Prometheus metrics the gateway exports, by name, with their kind and labels: the
# Grafana dashboard is built on exactly these.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "pgwarden_sessions_open": ("gauge", frozenset({"target", "group"})),
    "pgwarden_sessions_total": ("counter", frozenset({"target", "group"})),
    "pgwarden_statements_total": ("counter", frozenset({"target", "action"})),
    "pgwarden_masked_statements_total": ("counter", frozenset({"target"})),
    "pgwarden_decision_seconds": ("histogram", frozenset()),
    "pgwarden_decision_cache_total": ("counter", frozenset({"result"})),
    "pgwarden_opa_up": ("gauge", frozenset()),
    "pgwarden_opa_restarts_total": ("counter", frozenset()),
    "pgwarden_audit_position": ("gauge", frozenset()),
    "pgwarden_audit_commit_seconds": ("histogram", frozenset()),
    "pgwarden_audit_index_lag_records": ("gauge", frozenset()),
    "pgwarden_audit_writer_up": ("gauge", frozenset()),
    "pgwarden_audit_writer_restarts_total": ("counter", frozenset()),
    "pgwarden_upstream_connect_errors_total": ("counter", frozenset({"target"})),
    "pgwarden_bytes_relayed_total": ("counter", frozenset({"direction"})),
}
# Labels Prometheus adds to every series it scrapes.
SCRAPE_LABELS = frozenset({"instance", "job"})


def setting_names() -> set[str]:
    """Every setting by dotted name (`listener.port`), the contract's included."""
    return set(flat_settings(Settings.model_construct())) | CONTRACT_SETTINGS


def setting_of_env(name: str) -> str:
    """`PGWARDEN_LISTENER__PORT` → `listener.port`."""
    assert name.startswith("PGWARDEN_"), name
    return name.removeprefix("PGWARDEN_").lower().replace("__", ".")
