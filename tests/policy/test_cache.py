"""The decision cache: same input and policy revision → same decision, never past the token."""

from __future__ import annotations

from typing import Any

from gateway.policy.cache import DecisionCache
from gateway.policy.decision import Decision


class ScriptedDecider:
    """Answers with whatever decision the test put in `next`, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.next = Decision(action="allow", reasons=("ok",), bundle_revision="r1")

    async def decide(self, policy_input: dict[str, Any], *, not_after: float | None) -> Decision:
        self.calls += 1
        return self.next


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


INPUT = {"statement": {"text": "SELECT 1"}, "principal": {"subject": "a", "groups": ["x"]}}


async def test_same_input_is_a_hit() -> None:
    inner = ScriptedDecider()
    cache = DecisionCache(inner, max_entries=10)
    first = await cache.decide(INPUT, not_after=None)
    second = await cache.decide(dict(reversed(list(INPUT.items()))), not_after=None)
    assert inner.calls == 1
    assert not first.cache_hit
    assert second.cache_hit
    assert second.reasons == first.reasons


async def test_new_revision_flushes() -> None:
    inner = ScriptedDecider()
    cache = DecisionCache(inner, max_entries=10)
    await cache.decide(INPUT, not_after=None)
    cache.revision_seen("r2")
    assert len(cache) == 0
    inner.next = Decision(action="deny", reasons=("changed",), bundle_revision="r2")
    decision = await cache.decide(INPUT, not_after=None)
    assert (decision.action, decision.cache_hit, inner.calls) == ("deny", False, 2)


async def test_answer_under_new_revision_flushes_old_entries() -> None:
    inner = ScriptedDecider()
    cache = DecisionCache(inner, max_entries=10)
    await cache.decide(INPUT, not_after=None)
    inner.next = Decision(action="deny", reasons=("changed",), bundle_revision="r2")
    await cache.decide({"other": 1}, not_after=None)
    assert cache.revision == "r2"
    assert (await cache.decide(INPUT, not_after=None)).action == "deny"


async def test_policy_change_suspends_until_a_new_revision() -> None:
    inner = ScriptedDecider()
    cache = DecisionCache(inner, max_entries=10)
    await cache.decide(INPUT, not_after=None)
    cache.policy_changing()
    # A late answer from the old policy is neither served nor kept.
    await cache.decide(INPUT, not_after=None)
    await cache.decide(INPUT, not_after=None)
    assert inner.calls == 3
    cache.revision_seen("r1")
    assert (await cache.decide(INPUT, not_after=None)).cache_hit is False
    inner.next = Decision(action="allow", bundle_revision="r2")
    cache.revision_seen("r2")
    await cache.decide(INPUT, not_after=None)
    assert (await cache.decide(INPUT, not_after=None)).cache_hit


async def test_policy_unchanged_restores_the_old_revision() -> None:
    inner = ScriptedDecider()
    cache = DecisionCache(inner, max_entries=10)
    await cache.decide(INPUT, not_after=None)
    cache.policy_changing()
    cache.policy_unchanged()
    await cache.decide(INPUT, not_after=None)
    assert (await cache.decide(INPUT, not_after=None)).cache_hit


async def test_opa_down_serves_nothing_from_memory() -> None:
    inner = ScriptedDecider()
    cache = DecisionCache(inner, max_entries=10)
    await cache.decide(INPUT, not_after=None)
    cache.opa_down()
    inner.next = Decision.refuse("OPA unreachable")
    decision = await cache.decide(INPUT, not_after=None)
    assert (decision.action, decision.cache_hit) == ("deny", False)
    cache.revision_seen("r1")  # back up on the same policy
    inner.next = Decision(action="allow", bundle_revision="r1")
    await cache.decide(INPUT, not_after=None)
    assert (await cache.decide(INPUT, not_after=None)).cache_hit


async def test_entry_never_outlives_the_token() -> None:
    inner = ScriptedDecider()
    clock = Clock()
    cache = DecisionCache(inner, max_entries=10, clock=clock)
    await cache.decide(INPUT, not_after=clock.now + 5)
    clock.now += 4.9
    assert (await cache.decide(INPUT, not_after=clock.now + 0.1)).cache_hit
    clock.now += 0.2
    assert not (await cache.decide(INPUT, not_after=clock.now + 100)).cache_hit
    assert inner.calls == 2


async def test_expired_token_is_not_cached() -> None:
    inner = ScriptedDecider()
    clock = Clock()
    cache = DecisionCache(inner, max_entries=10, clock=clock)
    await cache.decide(INPUT, not_after=clock.now - 1)
    assert len(cache) == 0


async def test_ttl_bounds_entries_without_expiry() -> None:
    inner = ScriptedDecider()
    clock = Clock()
    cache = DecisionCache(inner, max_entries=10, ttl_seconds=2, clock=clock)
    await cache.decide(INPUT, not_after=None)
    clock.now += 2.5
    assert not (await cache.decide(INPUT, not_after=None)).cache_hit


async def test_refusals_are_never_cached() -> None:
    inner = ScriptedDecider()
    inner.next = Decision.refuse("OPA unreachable")
    cache = DecisionCache(inner, max_entries=10)
    cache.revision_seen("r1")
    await cache.decide(INPUT, not_after=None)
    await cache.decide(INPUT, not_after=None)
    assert (inner.calls, len(cache)) == (2, 0)


async def test_policy_deny_is_cached() -> None:
    inner = ScriptedDecider()
    inner.next = Decision(action="deny", reasons=("no",), bundle_revision="r1")
    cache = DecisionCache(inner, max_entries=10)
    await cache.decide(INPUT, not_after=None)
    assert (await cache.decide(INPUT, not_after=None)).cache_hit


async def test_answers_without_revision_are_not_cached() -> None:
    inner = ScriptedDecider()
    inner.next = Decision(action="allow")
    cache = DecisionCache(inner, max_entries=10)
    await cache.decide(INPUT, not_after=None)
    assert len(cache) == 0


async def test_least_recently_used_goes_first() -> None:
    inner = ScriptedDecider()
    cache = DecisionCache(inner, max_entries=2)
    a, b, c = {"n": 1}, {"n": 2}, {"n": 3}
    await cache.decide(a, not_after=None)
    await cache.decide(b, not_after=None)
    await cache.decide(a, not_after=None)  # a is now the most recent
    await cache.decide(c, not_after=None)  # evicts b
    assert len(cache) == 2
    assert (await cache.decide(a, not_after=None)).cache_hit
    assert not (await cache.decide(b, not_after=None)).cache_hit


async def test_size_zero_disables_caching() -> None:
    inner = ScriptedDecider()
    cache = DecisionCache(inner, max_entries=0)
    await cache.decide(INPUT, not_after=None)
    await cache.decide(INPUT, not_after=None)
    assert inner.calls == 2


async def test_no_revision_is_in_force_while_opa_is_down() -> None:
    """What still_current reads: while OPA is down no earlier decision (a prepared
    statement's included) counts as made under the policy in force."""
    cache = DecisionCache(ScriptedDecider(), max_entries=10)
    await cache.decide(INPUT, not_after=None)
    assert cache.revision == "r1"
    cache.opa_down()
    assert cache.revision is None
    cache.revision_seen("r1")
    assert cache.revision == "r1"
    # Back on the same revision: what was cached for it is still its answer.
    assert (await cache.decide(INPUT, not_after=None)).cache_hit


async def test_an_unconfirmed_revision_expires_after_confirm_within() -> None:
    inner = ScriptedDecider()
    clock = Clock()
    cache = DecisionCache(inner, max_entries=10, confirm_within=1.0, clock=clock)
    cache.revision_seen("r1")
    await cache.decide(INPUT, not_after=None)
    clock.now += 0.9
    assert cache.revision == "r1"
    assert (await cache.decide(INPUT, not_after=None)).cache_hit
    clock.now += 0.2  # 1.1 s since OPA last confirmed r1
    assert cache.revision is None
    calls = inner.calls
    assert not (await cache.decide(INPUT, not_after=None)).cache_hit
    assert inner.calls == calls + 1
    # That live answer carried r1: confirmed again, so reuse resumes.
    assert cache.revision == "r1"
    assert (await cache.decide(INPUT, not_after=None)).cache_hit


def test_reads_literals_says_whether_texts_of_one_shape_may_share_a_decision() -> None:
    """Texts of one shape differ only in `statement.text` (and, extended, `params`): a
    policy reading either, or a path above them, or anything unknown, may tell them apart."""
    cache = DecisionCache(ScriptedDecider(), max_entries=10)
    assert cache.reads_literals("unknown")  # reads never reported: it may read anything
    cache.policy_reads("r1", None)
    assert cache.reads_literals("r1")
    blind = frozenset({("statement", "columns"), ("statement", "estimate", "plan_rows")})
    cases = {
        "r2": (blind, False),
        "r3": (blind | {("statement", "text")}, True),
        "r4": (blind | {("statement",)}, True),
        "r5": (blind | {("statement", "params", "0")}, True),
    }
    for revision, (reads, expected) in cases.items():
        cache.policy_reads(revision, reads)
        assert cache.reads_literals(revision) is expected, revision
    # A revision's reads reported again (rebuilt sources) are what counts.
    cache.policy_reads("r2", blind | {("statement", "text")})
    assert cache.reads_literals("r2")
