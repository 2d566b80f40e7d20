"""Which parts of the policy input a Rego policy can read: what a reused decision is keyed by.

A decision depends only on the input values the policy reads. Two inputs equal on those parts
get the same answer from the same policy, whatever else differs (the statement's text and
literals, the session id): the decision cache keys by them. The scan is conservative: any use
of `input` it cannot read as a fixed path (`input[x]`, `f(input)`, `x := input`) means the
policy may read everything, and the whole input is the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# A path into the input document, e.g. ("statement", "columns"): that value and all below it.
InputPath = tuple[str, ...]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_STRING = r'"(?:[^"\\]|\\.)*"'
# `input.a.b` (stops at `[`, a call or anything else: the value there and below is read).
_DOTTED = re.compile(rf"\binput((?:\s*\.\s*{_IDENT})+)")
# `object.get(input, ["a", "b"], default)`: the reference policy's defensive reads.
_OBJECT_GET = re.compile(
    rf"\bobject\.get\(\s*input\s*,\s*\[\s*({_STRING}(?:\s*,\s*{_STRING})*)\s*\]"
)
_ANY = re.compile(r"\binput\b")
_STRINGS = re.compile(_STRING)
# Strings (kept: a path quoted in one only widens the key) and comments (dropped).
_STRING_OR_COMMENT = re.compile(rf"({_STRING}|`[^`]*`)|#[^\n]*")


def _without_comments(source: str) -> str:
    return _STRING_OR_COMMENT.sub(lambda m: m.group(1) or " ", source)


def policy_reads(sources: Iterable[str]) -> frozenset[InputPath] | None:
    """The input paths the Rego `sources` (test files left out) can read; None: any part."""
    paths: set[InputPath] = set()
    for raw in sources:
        source = _without_comments(raw)
        covered: set[int] = set()
        for match in _DOTTED.finditer(source):
            paths.add(tuple(part.strip() for part in match.group(1).split(".")[1:]))
            covered.add(match.start())
        for match in _OBJECT_GET.finditer(source):
            if "\\" in match.group(1):
                continue  # an escape would have to be read as Rego reads it: not covered
            paths.add(tuple(s[1:-1] for s in _STRINGS.findall(match.group(1))))
            covered.add(match.start() + match.group(0).index("input"))
        for match in _ANY.finditer(source):
            if match.start() not in covered:
                return None
    return frozenset(paths)


_MISSING = "\x00missing"


def projection(document: Mapping[str, Any], paths: Iterable[InputPath]) -> list[Any]:
    """The parts of `document` at `paths` (give them sorted: the order is the key's), as
    [path, value] pairs: equal for two inputs exactly when a policy that reads only those
    paths cannot tell them apart."""
    out: list[Any] = []
    for path in paths:
        value: Any = document
        for part in path:
            # (dict, not Mapping: an ABC check per step would cost more than the digest)
            if not isinstance(value, dict) or part not in value:
                value = _MISSING
                break
            value = value[part]
        out.append((path, value))
    return out
