"""The gateway's Prometheus metrics: a collector that reads the plain counters and the parts'
state when /metrics is scraped, into a registry of this gateway's own (several gateways may
run in one process)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.metrics import GatewayMetrics, Latencies


class DecisionCounts(Protocol):
    hits: int
    misses: int


class OpaHealth(Protocol):
    up: bool
    restarts: int


class AuditState(Protocol):
    position: int | None
    restarts: int
    commit_seconds: Latencies

    @property
    def index_lag(self) -> int: ...

    @property
    def accepting(self) -> bool: ...


@dataclass(frozen=True)
class GatewayState:
    """What the collector reads; the composition root points each at the running part."""

    metrics: GatewayMetrics
    open_sessions: Callable[[], Counter[tuple[str, str]]]
    decisions: DecisionCounts
    opa: OpaHealth
    audit: AuditState


def _histogram(name: str, doc: str, latencies: Latencies) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, doc, buckets=latencies.cumulative(), sum_value=latencies.total
    )


def _labelled(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    doc: str,
    labels: list[str],
    counts: Iterable[tuple[tuple[str, ...], int]],
) -> Metric:
    family = kind(name, doc, labels=labels)
    for values, n in sorted(counts):
        family.add_metric(list(values), n)
    return family


class GatewayCollector(Collector):
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        s = self.state
        m = s.metrics

        yield _labelled(
            GaugeMetricFamily,
            "pgwarden_sessions_open",
            "Client sessions relaying now.",
            ["target", "group"],
            s.open_sessions().items(),
        )
        yield _labelled(
            CounterMetricFamily,
            "pgwarden_sessions",
            "Client sessions that passed login.",
            ["target", "group"],
            m.sessions_started.items(),
        )
        yield _labelled(
            CounterMetricFamily,
            "pgwarden_statements",
            "Statements by what became of them (error: pgwarden could not decide or record).",
            ["target", "action"],
            m.statements.items(),
        )
        yield _labelled(
            CounterMetricFamily,
            "pgwarden_masked_statements",
            "Allowed statements relayed with masks.",
            ["target"],
            (((t,), n) for t, n in m.masked_statements.items()),
        )
        yield _labelled(
            CounterMetricFamily,
            "pgwarden_planned_executes",
            "Executes of prepared statements relayed on their Parse-time plan, still valid.",
            ["target"],
            (((t,), n) for t, n in m.planned_executes.items()),
        )
        yield _labelled(
            CounterMetricFamily,
            "pgwarden_planned_queries",
            "Simple-protocol Queries relayed on the plan of their statement shape, still valid.",
            ["target"],
            (((t,), n) for t, n in m.planned_queries.items()),
        )
        yield _labelled(
            CounterMetricFamily,
            "pgwarden_in_band_catalog_checks",
            "Catalog checks sent on the session's own connection ahead of a planned Execute:"
            " passed, or failed (the Execute decided afresh and sent again).",
            ["target", "result"],
            m.in_band_checks.items(),
        )
        yield _histogram(
            "pgwarden_decision_seconds",
            "Time to decide a message's statements (cache hits included).",
            m.decision_seconds,
        )
        cache = CounterMetricFamily(
            "pgwarden_decision_cache", "Decisions served from the cache or asked of OPA.",
            labels=["result"],
        )  # fmt: skip
        cache.add_metric(["hit"], s.decisions.hits)
        cache.add_metric(["miss"], s.decisions.misses)
        yield cache

        yield GaugeMetricFamily("pgwarden_opa_up", "OPA answers.", value=int(s.opa.up))
        yield CounterMetricFamily(
            "pgwarden_opa_restarts", "Restarts of the OPA sidecar.", value=s.opa.restarts
        )

        audit = s.audit
        yield GaugeMetricFamily(
            "pgwarden_audit_position",
            "Sequence number of the last durable audit record of this gateway's chain.",
            value=audit.position if audit.position is not None else 0,
        )
        yield _histogram(
            "pgwarden_audit_commit_seconds",
            "Time from handing records to the audit writer to their durable commit.",
            audit.commit_seconds,
        )
        yield GaugeMetricFamily(
            "pgwarden_audit_index_lag_records",
            "Durable audit records not yet searchable.",
            value=audit.index_lag,
        )
        yield GaugeMetricFamily(
            "pgwarden_audit_writer_up",
            "The audit writer takes records.",
            value=int(audit.accepting),
        )
        yield CounterMetricFamily(
            "pgwarden_audit_writer_restarts",
            "Restarts of the audit writer process.",
            value=audit.restarts,
        )

        yield _labelled(
            CounterMetricFamily,
            "pgwarden_upstream_connect_errors",
            "Failed connects to a target (network, TLS, login).",
            ["target"],
            (((t,), n) for t, n in m.upstream_connect_errors.items()),
        )

        relayed = CounterMetricFamily(
            "pgwarden_bytes_relayed", "Bytes relayed between clients and targets.",
            labels=["direction"],
        )  # fmt: skip
        relayed.add_metric(["to_client"], m.traffic.to_client)
        relayed.add_metric(["to_server"], m.traffic.to_server)
        yield relayed


def gateway_registry(state: GatewayState) -> CollectorRegistry:
    """A registry holding only this gateway's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(state))
    return registry
