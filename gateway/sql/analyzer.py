"""A bounded cache of analyses in front of analyze(): by text, and by shape for texts that
differ only in literal values."""

from __future__ import annotations

from collections import OrderedDict

from pglast.parser import scan

from gateway.sql.analysis import analyze_shaped
from gateway.sql.facts import StatementFacts

__all__ = ["COMMENT_TOKENS", "Spans", "StatementAnalyzer", "statement_shape"]

# The scanner's literal tokens: their values are what texts of one shape differ in.
_LITERAL_TOKENS = frozenset({"SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST"})
_SEMICOLON = "ASCII_59"
# The scanner's comment tokens (a statement, a SQL PREPARE, may follow some).
COMMENT_TOKENS = frozenset({"C_COMMENT", "SQL_COMMENT"})


Spans = tuple[tuple[int, int], ...]


def statement_shape(text: str) -> tuple[str, Spans] | None:
    """The text's tokens with literal values left out (names, keywords, operators, comments
    and literal kinds kept, so that one shape parses to one tree but for those values), and
    the spans (start, end) of the text that a single statement's facts may quote: from the
    first token or the first after leading comments, to the last or the one before a final
    `;`. None where the scanner refuses the text.

    Shaped on the scanner, not on pglast's fingerprint: the fingerprint also leaves out
    prepared-statement and cursor names and more, which facts depend on.
    """
    if "\x00" in text:
        # The scanner stops at NUL: what follows would not be in the shape at all.
        return None
    try:
        tokens = scan(text)
    except Exception:
        return None
    if not tokens:
        return None
    # pglast gives character offsets, `end` inclusive.
    parts = [
        token.name if token.name in _LITERAL_TOKENS else text[token.start : token.end + 1]
        for token in tokens
    ]
    code = next((t for t in tokens if t.name not in COMMENT_TOKENS), tokens[0])
    last = tokens[-2] if len(tokens) > 1 and tokens[-1].name == _SEMICOLON else tokens[-1]
    spans = tuple(
        (start, end)
        for start in (tokens[0].start, code.start)
        for end in (tokens[-1].end + 1, last.end + 1)
    )
    return "\x00".join(parts), spans


class StatementAnalyzer:
    """analyze() with least-recently-used caches; facts are immutable, so sharing is safe.

    By text, and by shape (statement_shape): a text whose tokens match an analysed one but for
    literal values gets that one's facts with its own text, where analyze_shaped says the facts
    do not depend on those values. That skips the parse and the walk for `-M simple` clients,
    whose every text is new.
    """

    def __init__(self, max_entries: int = 4096, max_text_bytes: int = 64 * 1024) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        # Huge one-off texts (bulk INSERTs) would evict the hot statements for nothing.
        self._max_text_bytes = max_text_bytes
        self._entries: OrderedDict[str, tuple[StatementFacts, ...]] = OrderedDict()
        # Shape → the facts of one text of that shape, and which span its facts quoted.
        self._shapes: OrderedDict[str, tuple[StatementFacts, int]] = OrderedDict()
        self.hits = 0
        self.shape_hits = 0
        self.misses = 0

    def analyze(self, text: str) -> tuple[StatementFacts, ...]:
        found = self._entries.get(text)
        if found is not None:
            self._entries.move_to_end(text)
            self.hits += 1
            return found
        if len(text) > self._max_text_bytes:
            self.misses += 1
            return analyze_shaped(text)[0]
        shape = statement_shape(text)
        if shape is not None:
            key, spans = shape
            shared = self._shapes.get(key)
            if shared is not None:
                self._shapes.move_to_end(key)
                self.shape_hits += 1
                model, span = shared
                start, end = spans[span]
                facts: tuple[StatementFacts, ...] = (model.with_text(text[start:end]),)
                self._remember(text, facts)
                return facts
        self.misses += 1
        facts, shaped = analyze_shaped(text)
        self._remember(text, facts)
        if shaped and shape is not None:
            key, spans = shape
            quoted = facts[0].text
            # Which span the parser gave the statement: the same for every text of this shape.
            for span, (start, end) in enumerate(spans):
                if text[start:end] == quoted:
                    self._shapes[key] = (facts[0], span)
                    if len(self._shapes) > self._max_entries:
                        self._shapes.popitem(last=False)
                    break
        return facts

    def shape_of(self, text: str) -> tuple[str, Spans] | None:
        """statement_shape() of a text this analyzer would shape (not a huge one)."""
        if len(text) > self._max_text_bytes:
            return None
        return statement_shape(text)

    def shared_span(self, shape: str) -> int | None:
        """Where texts of this shape (statement_shape's key) share one statement's facts:
        the index of the span their facts quote; None when they do not (a literal's value
        matters to the facts, or the shape is not known here now)."""
        shared = self._shapes.get(shape)
        return shared[1] if shared is not None else None

    def _remember(self, text: str, facts: tuple[StatementFacts, ...]) -> None:
        self._entries[text] = facts
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._shapes.clear()
