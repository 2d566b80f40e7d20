"""The session rule's answer and the enforced settings' arithmetic, without a server."""

from __future__ import annotations

import pytest

from gateway.guards.budgets import RowBudget, StatementLimits, parse_limits
from gateway.guards.enforced import EnforcedSettings, boolean, milliseconds
from gateway.guards.rates import RateLimiter
from gateway.guards.rules import NO_GUARDS, RateLimits, RulesUnavailable, parse_rules
from gateway.policy.parse import parse_answer
from gateway.sql.analyzer import StatementAnalyzer


def test_undefined_means_no_guards() -> None:
    assert parse_rules(None) == NO_GUARDS
    assert parse_rules({}) == NO_GUARDS
    assert not NO_GUARDS.enforced.active


def test_rules_are_read() -> None:
    guards = parse_rules(
        {
            "default_transaction_read_only": True,
            "statement_timeout_ms": 30000,
            "idle_in_transaction_session_timeout_ms": 60000,
            "statements_per_second": 0.5,
            "statement_burst": 3,
            "max_sessions_per_principal": 4,
            "max_sessions_per_token": 2,
        }
    )
    assert guards.enforced == EnforcedSettings(True, 30000, 60000)
    assert guards.limits == RateLimits(0.5, 3, 4, 2)
    assert guards.enforced.startup_parameters() == {
        "default_transaction_read_only": "on",
        "statement_timeout": "30000",
        "idle_in_transaction_session_timeout": "60000",
    }


@pytest.mark.parametrize(
    "answer",
    [
        [],
        "on",
        {"default_transaction_read_only": "yes"},
        {"statement_timeout_ms": 0},
        {"statement_timeout_ms": -5},
        {"statement_timeout_ms": 1.5},
        {"statement_timeout_ms": True},
        {"max_sessions_per_token": "2"},
        {"statement_timeout": 5},  # unknown: it would silently not be enforced
    ],
)
def test_malformed_rules_refuse_the_login(answer: object) -> None:
    with pytest.raises(RulesUnavailable):
        parse_rules(answer)


@pytest.mark.parametrize(
    ("text", "ms"),
    [("5000", 5000), ("'30s'", 30000), ("1.5min", 90000), ("1 h", 3_600_000), ("0", 0)],
)
def test_time_values_read_as_postgresql_does(text: str, ms: float) -> None:
    assert milliseconds(text) == ms


@pytest.mark.parametrize("text", ["forever", "5 parsecs", ""])
def test_unreadable_time_values(text: str) -> None:
    assert milliseconds(text) is None


@pytest.mark.parametrize(
    ("text", "value"),
    [("on", True), ("of", False), ("t", True), ("NO", False), ("1", True), ("o", None)],
)
def test_booleans_read_as_postgresql_does(text: str, value: bool | None) -> None:
    assert boolean(text) is value


def test_read_only_guard_refuses_read_write_only_when_enforced() -> None:
    facts = StatementAnalyzer().analyze("BEGIN READ WRITE")
    assert EnforcedSettings(read_only=True).refusal(facts) is not None
    assert EnforcedSettings(statement_timeout_ms=10).refusal(facts) is None
    assert EnforcedSettings().refusal(facts) is None


def test_escaped_names_what_moved() -> None:
    guards = EnforcedSettings(True, 2000, None)
    ok = {"default_transaction_read_only": "on", "statement_timeout": "1s"}
    assert guards.escaped(ok) is None
    assert "statement_timeout" in (guards.escaped({**ok, "statement_timeout": "0"}) or "")
    assert guards.escaped({**ok, "default_transaction_read_only": "off"}) is not None


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_statement_bucket_counts_exactly() -> None:
    clock = _Clock()
    rates = RateLimiter(clock)
    limits = RateLimits(statements_per_second=2, statement_burst=3)
    assert [rates.take("p", "t", limits, 1) for _ in range(3)] == [None, None, None]
    assert rates.take("p", "t", limits, 1) is not None
    clock.now += 0.5  # one statement's worth
    assert rates.take("p", "t", limits, 1) is None
    assert rates.take("p", "t", limits, 1) is not None
    clock.now += 100  # never beyond the burst
    assert rates.take("p", "t", limits, 4) is not None
    assert rates.take("p", "t", limits, 3) is None


def test_principal_and_token_buckets_are_both_taken_or_neither() -> None:
    clock = _Clock()
    rates = RateLimiter(clock)
    limits = RateLimits(statements_per_second=1, statement_burst=2)
    assert rates.take("p", "t1", limits, 2) is None
    # Another token of the same principal: the principal's bucket is empty.
    assert rates.take("p", "t2", limits, 1) is not None
    # Another principal: its own buckets.
    assert rates.take("q", "t3", limits, 2) is None


def test_session_counts_release_on_close() -> None:
    rates = RateLimiter()
    limits = RateLimits(max_sessions_per_principal=2, max_sessions_per_token=1)
    assert rates.open_session("s1", "p", "t1", limits) is None
    assert "token t1" in (rates.open_session("s2", "p", "t1", limits) or "")
    assert rates.open_session("s3", "p", "t2", limits) is None
    assert "principal p" in (rates.open_session("s4", "p", "t3", limits) or "")
    rates.close_session("s1")
    rates.close_session("s1")  # idempotent
    assert rates.open_session("s5", "p", "t1", limits) is None


def test_row_budget_counts_rows_and_bytes() -> None:
    rows = RowBudget(max_rows=2, max_bytes=None, decision_id="d")
    assert [rows.admit(10) for _ in range(4)] == [True, True, False, False]
    assert rows.withheld == 2 and rows.cut
    assert b"row budget of 2 exceeded" in rows.error and b"decision id: d" in rows.error
    size = RowBudget(max_rows=None, max_bytes=25, decision_id=None)
    assert [size.admit(10) for _ in range(3)] == [True, True, False]
    assert b"byte budget of 25 exceeded" in size.error


@pytest.mark.parametrize(
    "limits",
    [[], {"max_rows": 0}, {"max_rows": 1.5}, {"max_rows": True}, {"rows": 5}],
)
def test_malformed_limits_are_refused(limits: object) -> None:
    with pytest.raises(ValueError):
        parse_limits(limits)


def test_a_decision_with_malformed_limits_is_a_deny() -> None:
    bad = parse_answer({"result": {"action": "allow", "limits": {"max_rows": -1}}})
    assert bad.action == "deny" and bad.refused
    assert "limits.max_rows" in bad.reasons[0]
    good = parse_answer({"result": {"action": "allow", "limits": {"max_rows": 3}}})
    assert good.action == "allow"
    assert good.extra["limits"] == StatementLimits(max_rows=3)
