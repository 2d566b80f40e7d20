"""A bounded LRU cache of analyses by statement text, in front of analyze()."""

from __future__ import annotations

from collections import OrderedDict

from gateway.sql.analysis import analyze
from gateway.sql.facts import StatementFacts

__all__ = ["StatementAnalyzer"]


class StatementAnalyzer:
    """analyze() with a least-recently-used cache; facts are immutable, so sharing is safe."""

    def __init__(self, max_entries: int = 4096, max_text_bytes: int = 64 * 1024) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        # Huge one-off texts (bulk INSERTs) would evict the hot statements for nothing.
        self._max_text_bytes = max_text_bytes
        self._entries: OrderedDict[str, tuple[StatementFacts, ...]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def analyze(self, text: str) -> tuple[StatementFacts, ...]:
        found = self._entries.get(text)
        if found is not None:
            self._entries.move_to_end(text)
            self.hits += 1
            return found
        self.misses += 1
        facts = analyze(text)
        if len(text) <= self._max_text_bytes:
            self._entries[text] = facts
            if len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return facts

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
