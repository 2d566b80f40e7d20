"""The metric contract (tests/deploy/contract.py), which the Grafana dashboard is checked
against, is what the admin listener's collector exposes: same names, kinds and labels."""

from __future__ import annotations

from collections import Counter

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.admin import GatewayState, gateway_registry
from gateway.metrics import GatewayMetrics, Latencies

from .contract import METRICS


class _Part:
    up = True
    restarts = 0
    hits = 0
    misses = 0
    position: int | None = None
    index_lag = 0
    accepting = True

    def __init__(self) -> None:
        self.commit_seconds = Latencies()


def test_the_contract_names_exactly_the_exposed_metrics() -> None:
    metrics = GatewayMetrics()
    # One sample in each labelled family, so that its labels show in the exposition.
    metrics.session_started("app", ["engineers"])
    metrics.statements_decided("app", "allow", 1, masked=True)
    metrics.upstream_connect_failed("app")
    metrics.execute_planned("app")
    metrics.query_planned("app")
    metrics.in_band_checked("app", passed=True)
    part = _Part()
    state = GatewayState(
        metrics=metrics,
        open_sessions=lambda: Counter({("app", "engineers"): 1}),
        decisions=part,
        opa=part,
        audit=part,
    )
    text = generate_latest(gateway_registry(state)).decode()
    exposed: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = frozenset(k for s in family.samples for k in s.labels) - {"le"}
        exposed[name] = (family.type, labels)
    assert exposed == METRICS
