"""What the deployment artefacts may name: the settings of gateway/settings.py (the admin
listener's and logging's among them) and the metrics gateway/admin exports, so that a
deployment file naming anything else fails a test. test_contract.py checks METRICS against
what the admin listener's collector really exposes."""

from __future__ import annotations

from gateway.reload import flat_settings
from gateway.settings import Settings

# The Prometheus metrics the gateway exports (gateway/admin/exposition.py), by name as
# scraped, with their kind and labels: the Grafana dashboard is built on exactly these.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "pgwarden_sessions_open": ("gauge", frozenset({"target", "group"})),
    "pgwarden_sessions_total": ("counter", frozenset({"target", "group"})),
    "pgwarden_statements_total": ("counter", frozenset({"target", "action"})),
    "pgwarden_masked_statements_total": ("counter", frozenset({"target"})),
    "pgwarden_planned_executes_total": ("counter", frozenset({"target"})),
    "pgwarden_planned_queries_total": ("counter", frozenset({"target"})),
    "pgwarden_in_band_catalog_checks_total": ("counter", frozenset({"target", "result"})),
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
    """Every setting by dotted name (`listener.port`)."""
    return set(flat_settings(Settings.model_construct()))


def setting_of_env(name: str) -> str:
    """`PGWARDEN_LISTENER__PORT` → `listener.port`."""
    assert name.startswith("PGWARDEN_"), name
    return name.removeprefix("PGWARDEN_").lower().replace("__", ".")
