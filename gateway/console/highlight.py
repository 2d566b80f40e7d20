"""Splits SQL text into classed spans for the console (keywords, strings, numbers, comments,
parameters) with PostgreSQL's own scanner, through pglast: what is highlighted as a string
is what the server reads as one. The spans are rendered as escaped text in <span class>
elements; no style is inline (the CSP forbids it)."""

from __future__ import annotations

from dataclasses import dataclass

from pglast.parser import scan

# Scanner token names → CSS class (console.css, .sql .kw etc.).
_BY_NAME = {
    "SCONST": "str",
    "USCONST": "str",
    "BCONST": "str",
    "XCONST": "str",
    "ICONST": "num",
    "FCONST": "num",
    "PARAM": "param",
    "SQL_COMMENT": "com",
    "C_COMMENT": "com",
    "IDENT": "ident",
    "UIDENT": "ident",
}


@dataclass(frozen=True, slots=True)
class Span:
    css: str  # "" for plain text (spacing, operators, punctuation)
    text: str


def highlight(sql: str) -> list[Span]:
    """The text as spans that join back to exactly `sql`; one plain span where the scanner
    refuses it (an unterminated string), so nothing is ever dropped from the display."""
    try:
        tokens = scan(sql)
    except Exception:
        return [Span("", sql)]
    spans: list[Span] = []
    at = 0
    for token in tokens:
        # Offsets are characters of the text (pglast maps the server's byte offsets
        # back); `end` is inclusive.
        start, end = token.start, token.end + 1
        if start < at or end > len(sql):
            return [Span("", sql)]
        if start > at:
            spans.append(Span("", sql[at:start]))
        css = "kw" if token.kind != "NO_KEYWORD" else _BY_NAME.get(token.name, "")
        spans.append(Span(css, sql[start:end]))
        at = end
    if at < len(sql):
        spans.append(Span("", sql[at:]))
    return spans
