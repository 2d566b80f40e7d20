"""Rate limits per principal (subject) and per token (jti), shared by all sessions of one
gateway: concurrent sessions, and statements per second as a token bucket. Over a limit
the session or the statement is refused at once, never queued: a client that loops gets
errors it can back off on, and nothing waits in memory on its behalf.

SQLSTATEs: 53300 (too_many_connections, as PostgreSQL's own max_connections) for sessions,
53400 (configuration_limit_exceeded) for statements: a limit the operator configured, not
the statement's own size (54000 is kept for that: program_limit_exceeded).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from gateway.guards.rules import RateLimits

TOO_MANY_SESSIONS = "53300"
TOO_MANY_STATEMENTS = "53400"
# Buckets kept for principals and tokens with no open session (so that reconnecting does
# not refill them) are pruned past this many, those full by now first.
_MAX_IDLE_BUCKETS = 10_000

_Key = tuple[str, str]


@dataclass(slots=True)
class _Bucket:
    level: float
    stamp: float


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._open: dict[str, tuple[_Key, _Key]] = {}
        self._counts: Counter[_Key] = Counter()
        self._buckets: dict[_Key, _Bucket] = {}

    def open_session(
        self, session_id: str, subject: str, token_id: str, limits: RateLimits
    ) -> str | None:
        """Count a new session in; why not (it is then not counted) when over a limit."""
        keys = (("principal", subject), ("token", token_id))
        caps = (limits.max_sessions_per_principal, limits.max_sessions_per_token)
        for (kind, name), cap in zip(keys, caps, strict=True):
            if cap is not None and self._counts[(kind, name)] >= cap:
                return f"too many sessions: {kind} {name} has {cap} open, the limit"
        self._open[session_id] = keys
        for key in keys:
            self._counts[key] += 1
        return None

    def close_session(self, session_id: str) -> None:
        keys = self._open.pop(session_id, None)
        for key in keys or ():
            self._counts[key] -= 1
            if self._counts[key] <= 0:
                del self._counts[key]

    def take(self, subject: str, token_id: str, limits: RateLimits, statements: int) -> str | None:
        """Take `statements` from the principal's and the token's buckets, from both or
        neither; why not when either has too few."""
        rate = limits.statements_per_second
        if rate is None:
            return None
        burst = float(limits.statement_burst or max(1, math.ceil(rate)))
        now = self._clock()
        buckets = [
            self._bucket(key, burst, now) for key in (("principal", subject), ("token", token_id))
        ]
        for bucket in buckets:
            bucket.level = min(burst, bucket.level + (now - bucket.stamp) * rate)
            bucket.stamp = now
        if any(b.level < statements for b in buckets):
            return (
                f"rate limit: {rate:g} statements per second (bursts of {burst:g})"
                f" for principal {subject}; retry later"
            )
        for bucket in buckets:
            bucket.level -= statements
        return None

    def _bucket(self, key: _Key, burst: float, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_IDLE_BUCKETS:
                self._prune()
            bucket = self._buckets[key] = _Bucket(burst, now)
        return bucket

    def _prune(self) -> None:
        # Least recently used first: idle longest, so full by now (as a new one starts).
        idle = sorted(
            (k for k in self._buckets if k not in self._counts),
            key=lambda k: self._buckets[k].stamp,
        )
        for key in idle[: len(idle) // 2 + 1]:
            del self._buckets[key]
