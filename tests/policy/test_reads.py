"""The input paths a policy reads, and decisions keyed by them: statements that differ only
in what the policy never reads share a decision; anything it reads keeps them apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.policy.cache import DecisionCache
from gateway.policy.decision import Decision
from gateway.policy.reads import policy_reads

REGO_DIR = Path(__file__).resolve().parents[2] / "rego" / "pgwarden"


def test_the_reference_policy_reads_no_text_literal_session_or_params() -> None:
    sources = [p.read_text() for p in REGO_DIR.glob("*.rego") if not p.name.endswith("_test.rego")]
    reads = policy_reads(sources)
    assert reads is not None
    assert ("principal", "groups") in reads and ("target", "database") in reads
    assert ("statement", "columns") in reads
    read_roots = {path[:2] for path in reads}
    for unread in [("statement", "text"), ("statement", "params"), ("session",)]:
        assert unread[:2] not in read_roots and (unread[0],) not in reads


@pytest.mark.parametrize(
    "source",
    [
        "x := input",
        'x := input["statement"]["text"]',
        "f(input)",
        'allow if { some k, _ in input; k == "session" }',
        'x := object.get(input, ["statement", k], "")',
        'x := object.get(input, ["statement", "te\\u0078t"], "")',
        "deny if input[_]",
    ],
)
def test_a_use_of_input_that_is_no_fixed_path_means_the_policy_may_read_anything(
    source: str,
) -> None:
    assert policy_reads(["package p\n", source]) is None


def test_paths_comments_and_strings() -> None:
    reads = policy_reads(
        [
            '# input[x] in a comment is no read\nx := "#"; y := input.statement . text\n',
            'z := object.get(input, ["target", "labels"], {})\nimport input.session as s\n',
        ]
    )
    assert reads == frozenset({("statement", "text"), ("target", "labels"), ("session",)})


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    async def decide(self, policy_input: dict[str, Any], *, not_after: float | None) -> Decision:
        self.calls += 1
        return Decision(action="allow", reasons=(str(self.calls),), bundle_revision="r1")


def statement(text: str, session: str, params: list[str]) -> dict[str, Any]:
    return {
        "principal": {"groups": ["admins"]},
        "session": {"id": session},
        "statement": {"text": text, "command": "SELECT", "params": params},
    }


async def test_the_key_is_what_the_policy_reads() -> None:
    inner = Counting()
    cache = DecisionCache(inner, max_entries=10)
    cache.policy_reads("r1", frozenset({("principal", "groups"), ("statement", "command")}))
    cache.revision_seen("r1")
    await cache.decide(statement("SELECT 1", "s1", []), not_after=None)
    shared = await cache.decide(statement("SELECT 2", "s2", ["x"]), not_after=None)
    assert shared.cache_hit and inner.calls == 1
    other = {**statement("SELECT 1", "s1", []), "principal": {"groups": ["ai-agents"]}}
    assert not (await cache.decide(other, not_after=None)).cache_hit


@pytest.mark.parametrize(
    ("reads", "vary"),
    [
        (frozenset({("statement", "text")}), "text"),
        (frozenset({("statement", "params")}), "params"),
        (frozenset({("session", "id")}), "session"),
        (frozenset({("statement",)}), "text"),
        (None, "session"),
    ],
)
async def test_a_statement_whose_read_parts_differ_is_never_served_anothers_decision(
    reads: frozenset[tuple[str, ...]] | None, vary: str
) -> None:
    inner = Counting()
    cache = DecisionCache(inner, max_entries=10)
    cache.policy_reads("r1", reads)
    cache.revision_seen("r1")
    first = statement("SELECT 1", "s1", ["1"])
    second = {
        "text": statement("SELECT 2", "s1", ["1"]),
        "params": statement("SELECT 1", "s1", ["2"]),
        "session": statement("SELECT 1", "s2", ["1"]),
    }[vary]
    await cache.decide(first, not_after=None)
    assert not (await cache.decide(second, not_after=None)).cache_hit
    assert inner.calls == 2


async def test_reads_are_per_revision_and_unknown_reads_key_the_whole_input() -> None:
    inner = Counting()
    cache = DecisionCache(inner, max_entries=10)
    cache.policy_reads("r1", frozenset({("statement", "command")}))
    # r1 answers, but r2 is in force (its reads unknown): no sharing across texts.
    cache.revision_seen("r1")
    cache.revision_seen("r2")
    inner_r2 = Decision(action="allow", reasons=("r2",), bundle_revision="r2")

    async def r2(policy_input: dict[str, Any], *, not_after: float | None) -> Decision:
        inner.calls += 1
        return inner_r2

    inner.decide = r2  # type: ignore[method-assign]  # a scripted answer
    await cache.decide(statement("SELECT 1", "s1", []), not_after=None)
    assert not (await cache.decide(statement("SELECT 2", "s1", []), not_after=None)).cache_hit
    assert (await cache.decide(statement("SELECT 2", "s1", []), not_after=None)).cache_hit


async def test_a_shared_entry_never_serves_a_caller_whose_token_has_ended() -> None:
    inner = Counting()
    cache = DecisionCache(inner, max_entries=10)
    cache.policy_reads("r1", frozenset({("statement", "command")}))
    cache.revision_seen("r1")
    far = 4102444800.0  # 2100
    await cache.decide(statement("SELECT 1", "s1", []), not_after=far)
    assert (await cache.decide(statement("SELECT 1", "s2", []), not_after=far)).cache_hit
    ended = await cache.decide(statement("SELECT 1", "s3", []), not_after=1.0)
    assert not ended.cache_hit and inner.calls == 2
