"""A caching Decider: reuses a policy decision for an identical input under the same policy.

The rule for every decision pgwarden reuses (this cache's entries and the Parse decisions of
prepared statements): it is served only while the revision it was made under is known to be
the one OPA serves now. The revision is known while OPA answers: the sidecar reports OPA's
exit and every failed revision poll (`opa_down`); for an OPA given by URL the revision is
also only trusted for `confirm_within` seconds after OPA last confirmed it (a poll or a live
decision). While OPA is down nothing is reused, even though the gateway may know which bundle
its sidecar would load: a reused allow would let a prepared statement run through an outage
that refuses the same statement sent as text, and that bundle is only in force once OPA has
loaded it. A reused decision says so in its record (`cache_hit`).

The key: where the parts of the input a revision's policy can read are known
(`policy_reads`, from its Rego sources), only those parts; otherwise the whole input. So with
the reference policy, statements that differ only in text or literals (and have the same
facts), in any session, share one decision; a policy that reads `statement.text`,
`statement.params` or `session.id` gets them in its key.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from gateway.policy.decision import Decision
from gateway.policy.reads import InputPath, projection
from gateway.proxy.ports import Decider

# Where texts of one shape (differing only in literals) have different input values. (A
# cost estimate differs too, where the session gives one: the caller shares no decision then.)
_LITERAL_PATHS: tuple[InputPath, ...] = (("statement", "text"), ("statement", "params"))

# Revisions seen before the current one; an answer made under one of them is never stored.
_RETIRED_KEEP = 16


@dataclass(frozen=True, slots=True)
class _Entry:
    # As served: marked a cache hit once, when stored, not copied at every hit.
    decision: Decision
    revision: str
    expires_at: float | None


def input_digest(policy_input: dict[str, Any]) -> bytes:
    """A stable digest of an input: canonical JSON (sorted keys), blake2b-128."""
    return hashlib.blake2b(
        orjson.dumps(policy_input, option=orjson.OPT_SORT_KEYS), digest_size=16
    ).digest()


def read_digest(policy_input: dict[str, Any], reads: tuple[InputPath, ...]) -> bytes:
    """A stable digest of the parts of an input a policy reading `reads` can see."""
    # `person` keeps these keys apart from whole-input digests: the two never meet.
    return hashlib.blake2b(
        orjson.dumps(projection(policy_input, reads), option=orjson.OPT_SORT_KEYS),
        digest_size=16,
        person=b"pgwarden-reads",
    ).digest()


class DecisionCache:
    """Wraps a Decider; an LRU of its decisions keyed by input digest and bundle revision.

    Only answers that carry a bundle revision are kept, because without one a policy change
    could not be noticed. Refusals (pgwarden's own denies) are never kept, and no entry
    outlives the token (`not_after`) it was decided for.
    """

    def __init__(
        self,
        inner: Decider,
        *,
        max_entries: int,
        ttl_seconds: float | None = None,
        confirm_within: float | None = None,
        clock: Callable[[], float] = time.time,
        opa_alive: Callable[[], bool] | None = None,
    ) -> None:
        self.inner = inner
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        # None: the revision stands until OPA is reported down or the policy changes.
        self.confirm_within = confirm_within
        self._clock = clock
        # The sidecar's check that its OPA has not exited (an exit is reported a moment later).
        self._opa_alive = opa_alive
        self._confirmed_at = 0.0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._revision: str | None = None
        self._retired: list[str] = []
        # Between "the policy is about to change" and "OPA reports the new revision".
        self._suspended = False
        self._pending_from: str | None = None
        # Revision → the input paths its policy can read, sorted (None: any), where known.
        self._reads: OrderedDict[str, tuple[InputPath, ...] | None] = OrderedDict()
        # Revision → reads_literals(), as worked out from its reads.
        self._reads_literals: dict[str, bool] = {}
        self.hits = 0
        self.misses = 0

    @property
    def revision(self) -> str | None:
        """The policy revision known to be in force now; None while OPA is down, a change
        loads, or (confirm_within) OPA has not confirmed it recently: nothing decided
        earlier may then be reused."""
        return self._revision if self._current(self._clock()) else None

    def _current(self, now: float) -> bool:
        if self._suspended or self._revision is None:
            return False
        if self._opa_alive is not None and not self._opa_alive():
            return False
        return self.confirm_within is None or now - self._confirmed_at <= self.confirm_within

    def __len__(self) -> int:
        return len(self._entries)

    def policy_reads(self, revision: str, reads: frozenset[InputPath] | None) -> None:
        """The policy of `revision` can read only `reads` of an input (None: any part)."""
        self._reads[revision] = None if reads is None else tuple(sorted(reads))
        self._reads_literals.pop(revision, None)
        self._reads.move_to_end(revision)
        while len(self._reads) > _RETIRED_KEEP + 1:
            self._reads_literals.pop(self._reads.popitem(last=False)[0], None)

    def reads_literals(self, revision: str) -> bool:
        """Whether the policy of `revision` may read a value that texts of one shape differ
        in: the statement's text or parameters, or anything at all (its reads unknown). A
        read of a path above one of those (the whole `statement`) reads it; one below it
        (an element of `params`) reads it too."""
        reads = self._reads.get(revision)
        if reads is None:
            return True
        known = self._reads_literals.get(revision)
        if known is None:
            # Asked per simple-protocol statement on its plan: answered once per revision.
            known = self._reads_literals[revision] = any(
                path[: len(literal)] == literal[: len(path)]
                for path in reads
                for literal in _LITERAL_PATHS
            )
        return known

    def _key(self, policy_input: dict[str, Any], revision: str | None) -> bytes:
        """The input's key for decisions of `revision`: what its policy reads where that is
        known, else the whole input."""
        reads = self._reads.get(revision) if revision is not None else None
        if reads is None:
            return input_digest(policy_input)
        return read_digest(policy_input, reads)

    async def decide(self, policy_input: dict[str, Any], *, not_after: float | None) -> Decision:
        now = self._clock()
        key, keyed_for = b"", None
        # Entries are shared by tokens now: none serves a caller whose own token has ended.
        if self.max_entries > 0 and self._current(now) and (not_after is None or now < not_after):
            key, keyed_for = self._key(policy_input, self._revision), self._revision
            entry = self._entries.get(key)
            if entry is not None:
                if entry.revision == self._revision and (
                    entry.expires_at is None or now < entry.expires_at
                ):
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry.decision
                del self._entries[key]
        self.misses += 1
        decision = await self.inner.decide(policy_input, not_after=not_after)
        if decision.bundle_revision is not None:
            self.revision_seen(decision.bundle_revision)
        if self.max_entries > 0 and decision.bundle_revision is not None:
            # Keyed by what the policy that answered reads (another may be in force by now:
            # _store keeps only answers of the one in force).
            if keyed_for != decision.bundle_revision:
                key = self._key(policy_input, decision.bundle_revision)
            self._store(key, decision, not_after, self._clock())
        return decision

    def revision_seen(self, revision: str | None) -> None:
        """OPA reports this revision; a new one flushes the cache (and ends a suspension).

        While a change is pending, only the revision being replaced is refused: any other is
        the new policy, even one seen before (a change reverted to earlier sources has the
        revision it had then). Otherwise a retired revision is a late answer: ignored.
        """
        if revision is None:
            return
        if self._pending_from is not None:
            if revision == self._pending_from:
                return
        elif revision in self._retired:
            return
        if revision in self._retired:
            self._retired.remove(revision)
        self._confirmed_at = self._clock()
        if revision != self._revision:
            if self._revision is not None:
                self._retire(self._revision)
            self._revision = revision
            self._entries.clear()
        self._suspended = False
        self._pending_from = None

    def policy_changing(self) -> None:
        """A new policy is about to load: serve nothing until OPA reports another revision.

        The current revision is retired, so late answers made under it are not kept either.
        """
        self._entries.clear()
        self._suspended = True
        if self._revision is not None:
            self._retire(self._revision)
            self._pending_from = self._revision
            self._revision = None

    def policy_unchanged(self) -> None:
        """A pending change did not happen (OPA kept the old policy): the old revision stands."""
        if self._pending_from is not None and self._revision is None:
            self._retired.remove(self._pending_from)
            self._revision = self._pending_from
        self._pending_from = None
        self._suspended = False

    def opa_down(self) -> None:
        """OPA is not answering: serve nothing from memory until it reports a revision again.

        The entries are kept: if OPA comes back on the same revision they are still that
        policy's answers (a slow poll under load must not also empty the cache); another
        revision clears them."""
        self._suspended = True

    def clear(self) -> None:
        self._entries.clear()

    def _store(self, key: bytes, decision: Decision, not_after: float | None, now: float) -> None:
        if decision.refused or self._suspended:
            return
        if decision.bundle_revision is None or decision.bundle_revision != self._revision:
            return
        expires_at = not_after
        if self.ttl_seconds is not None:
            ttl_end = now + self.ttl_seconds
            expires_at = ttl_end if expires_at is None else min(expires_at, ttl_end)
        if expires_at is not None and expires_at <= now:
            return
        self._entries[key] = _Entry(
            replace(decision, cache_hit=True), decision.bundle_revision, expires_at
        )
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _retire(self, revision: str) -> None:
        self._retired.append(revision)
        del self._retired[:-_RETIRED_KEEP]
