"""The gateway's counters as plain numbers, cheap to move on the hot path; the admin listener
turns them into Prometheus metric families only when /metrics is scraped.

A prometheus_client `Counter.labels(...).inc()` costs about 3 µs and `Histogram.observe()`
about 1.7 µs on this project's machines; an integer add on a slotted attribute about 60 ns
and `Latencies.observe()` about 200 ns. The relay counts every message it passes, so it keeps
integers here and nothing under `gateway/proxy/` imports prometheus_client.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence

# Seconds. Decisions from the cache take microseconds, from OPA about a millisecond; an
# audit group commit with fsync a few milliseconds; timeouts are seconds.
DEFAULT_BOUNDS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class Latencies:
    """A histogram of durations: one count per bucket (not cumulative) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BOUNDS) -> None:
        self.bounds = tuple(bounds)
        # The last bucket is +Inf.
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations at or below it) as Prometheus buckets, +Inf last."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class Traffic:
    """Bytes the relay passed each way, over every session the gateway ever had."""

    __slots__ = ("to_client", "to_server")

    def __init__(self) -> None:
        self.to_client = 0
        self.to_server = 0


def group_label(groups: Sequence[str]) -> str:
    """A principal's groups as one label value: each session counts once, whatever its
    groups, so sums over the label are session counts."""
    return ",".join(sorted(groups))


class GatewayMetrics:
    """What the sessions and their statements move; read by the admin listener's collector."""

    def __init__(self) -> None:
        self.traffic = Traffic()
        # (target, group label) -> sessions that passed login and reached the relay.
        self.sessions_started: Counter[tuple[str, str]] = Counter()
        # (target, action) -> statements; action is allow, deny, approve or error.
        self.statements: Counter[tuple[str, str]] = Counter()
        # target -> allowed statements relayed with at least one mask.
        self.masked_statements: Counter[str] = Counter()
        # target -> Executes relayed on the plan their Parse made (no task per statement).
        self.planned_executes: Counter[str] = Counter()
        # Simple-protocol Queries relayed on the plan of their shape (no task).
        self.planned_queries: Counter[str] = Counter()
        # (target, result) -> catalog checks sent in band, ahead of their statement: passed,
        # or failed (the plan stale, or the check could not run) and the statement sent again.
        self.in_band_checks: Counter[tuple[str, str]] = Counter()
        # target -> failed connects to the target (network, TLS, login).
        self.upstream_connect_errors: Counter[str] = Counter()
        # Each decision of a message's statements, cache hits included.
        self.decision_seconds = Latencies()

    def session_started(self, target: str, groups: Sequence[str]) -> None:
        self.sessions_started[(target, group_label(groups))] += 1

    def statements_decided(self, target: str, action: str, count: int, *, masked: bool) -> None:
        self.statements[(target, action)] += count
        if masked:
            self.masked_statements[target] += count

    def execute_planned(self, target: str) -> None:
        self.planned_executes[target] += 1

    def query_planned(self, target: str) -> None:
        self.planned_queries[target] += 1

    def in_band_checked(self, target: str, *, passed: bool) -> None:
        self.in_band_checks[(target, "passed" if passed else "failed")] += 1

    def upstream_connect_failed(self, target: str) -> None:
        self.upstream_connect_errors[target] += 1
