"""A principal's session rules, asked of the policy once at login: the settings enforced on
its sessions and its rate limits (`data.pgwarden.session` by default).

The rule's answer is an object; undefined (a policy without the rule) means no guards. A
malformed answer, an OPA error or a timeout refuse the login: the session cannot start
without knowing what it must enforce.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from gateway.guards.enforced import EnforcedSettings
from gateway.policy.transport import OpaTransport, OpaUnreachable

log = logging.getLogger("pgwarden.guards")
# Session-rule answers kept at most (expired ones are dropped when it is reached).
_MAX_ANSWERS = 10_000


class RulesUnavailable(Exception):
    """The session rules could not be read or made no sense: the login is refused."""


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Per principal (subject) and per token (jti); None: no limit."""

    statements_per_second: float | None = None
    # How many statements may come at once above the rate (a token bucket's size).
    statement_burst: int | None = None
    max_sessions_per_principal: int | None = None
    max_sessions_per_token: int | None = None


@dataclass(frozen=True, slots=True)
class SessionGuards:
    enforced: EnforcedSettings = field(default_factory=EnforcedSettings)
    limits: RateLimits = field(default_factory=RateLimits)
    # Reads are explained first and `statement.estimate` goes into the input; a sequential
    # scan estimated to return more rows than this is flagged (gateway/guards/estimate.py).
    estimate_seq_scan_rows: int | None = None
    # A statement estimated to return more rows than this is flagged the same way: a policy
    # that reads the flag rather than the count shares its decision between statements that
    # differ only in literals (the decision cache keys by what the policy reads).
    estimate_plan_rows: int | None = None


NO_GUARDS = SessionGuards()

_BOOLS = {"default_transaction_read_only"}
_MILLISECONDS = {
    "statement_timeout_ms": "statement_timeout_ms",
    "idle_in_transaction_session_timeout_ms": "idle_in_transaction_ms",
}
_COUNTS = {
    "estimate_seq_scan_rows",
    "estimate_plan_rows",
    "statement_burst",
    "max_sessions_per_principal",
    "max_sessions_per_token",
}
_RATES = {"statements_per_second"}


def _positive(name: str, value: Any, *, whole: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise RulesUnavailable(f"session rule {name} must be a positive number, not {value!r}")
    if whole and value != int(value):
        raise RulesUnavailable(f"session rule {name} must be a whole number, not {value!r}")
    return float(value)


def parse_rules(result: Any) -> SessionGuards:
    """The rule's answer as guards; RulesUnavailable for anything it cannot mean."""
    if result is None:
        return NO_GUARDS
    if not isinstance(result, dict):
        raise RulesUnavailable(f"session rules must be an object, not {type(result).__name__}")
    unknown = set(result) - _BOOLS - set(_MILLISECONDS) - _COUNTS - _RATES
    if unknown:
        # A guard pgwarden does not know would silently not be enforced: fail closed.
        raise RulesUnavailable(f"unknown session rule(s): {', '.join(sorted(unknown))}")
    read_only = result.get("default_transaction_read_only", False)
    if not isinstance(read_only, bool):
        raise RulesUnavailable("session rule default_transaction_read_only must be true or false")
    enforced: dict[str, Any] = {"read_only": read_only}
    for name, attr in _MILLISECONDS.items():
        if name in result:
            enforced[attr] = int(_positive(name, result[name], whole=True))
    limits: dict[str, Any] = {}
    for name in _COUNTS:
        if name in result:
            limits[name] = int(_positive(name, result[name], whole=True))
    for name in _RATES:
        if name in result:
            limits[name] = _positive(name, result[name], whole=False)
    threshold = limits.pop("estimate_seq_scan_rows", None)
    plan_rows = limits.pop("estimate_plan_rows", None)
    return SessionGuards(EnforcedSettings(**enforced), RateLimits(**limits), threshold, plan_rows)


class SessionRules(Protocol):
    async def for_session(self, policy_input: dict[str, Any]) -> SessionGuards:
        """The guards for a session whose principal and target `policy_input` describes."""
        ...


class OpaSessionRules:
    """Reads the session rule from OPA's data API, bounded in time.

    Logins with the same input (a pool opening 200 connections on one token) share one
    query while it runs and its answer for `fresh_seconds` after: a burst of logins must
    not queue 200 queries behind each other into the timeout. A policy change reaches new
    logins within that time; a failed query is never reused."""

    def __init__(
        self,
        transport: OpaTransport,
        *,
        path: str,
        timeout_seconds: float,
        fresh_seconds: float = 1.0,
    ) -> None:
        self.transport = transport
        self.path = path.strip("/")
        self.timeout_seconds = timeout_seconds
        self.fresh_seconds = fresh_seconds
        self._answers: dict[bytes, tuple[float, asyncio.Future[SessionGuards]]] = {}

    async def for_session(self, policy_input: dict[str, Any]) -> SessionGuards:
        key = orjson.dumps(policy_input, option=orjson.OPT_SORT_KEYS)
        now = time.monotonic()
        held = self._answers.get(key)
        if held is not None and (not held[1].done() or now - held[0] < self.fresh_seconds):
            return await asyncio.shield(held[1])
        if len(self._answers) >= _MAX_ANSWERS:
            self._answers = {
                k: v for k, v in self._answers.items() if now - v[0] < self.fresh_seconds
            }
        answer = asyncio.ensure_future(self._ask(policy_input))
        self._answers[key] = (now, answer)
        try:
            return await asyncio.shield(answer)
        except RulesUnavailable:
            if self._answers.get(key, (0.0, None))[1] is answer:
                del self._answers[key]
            raise

    async def _ask(self, policy_input: dict[str, Any]) -> SessionGuards:
        try:
            async with asyncio.timeout(self.timeout_seconds):
                status, body = await self.transport.query_rule(self.path, policy_input)
        except TimeoutError:
            raise RulesUnavailable(
                f"the policy engine did not answer within {self.timeout_seconds:g}s"
            ) from None
        except OpaUnreachable as exc:
            log.warning("%s", exc)
            # Worded as the decider's own refusal: the client reads the same advice.
            raise RulesUnavailable(
                "OPA unreachable: the policy engine is not answering, so no statement can run;"
                " retry shortly, or tell the gateway's operator if it persists"
            ) from None
        if status != 200:
            raise RulesUnavailable(f"the policy engine answered HTTP {status}")
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise RulesUnavailable("the policy engine's answer is not JSON") from None
        if not isinstance(answer, dict):
            raise RulesUnavailable("the policy engine's answer is not an object")
        return parse_rules(answer.get("result"))
