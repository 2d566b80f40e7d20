"""One session's prepared statements, so EXECUTE and Bind are decided as what was prepared."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TypeVar

from gateway.sql.facts import Category, StatementFacts

__all__ = ["PreparedStatements", "merge_facts"]

# When two facts must be judged as one, the category policy treats most strictly wins.
_CATEGORY_RANK: dict[Category, int] = {
    "read": 0,
    "tcl": 1,
    "session": 2,
    "utility": 3,
    "write": 4,
    "ddl": 5,
    "dcl": 6,
    "unknown": 7,
}


T = TypeVar("T")


def _union(*groups: Iterable[T]) -> tuple[T, ...]:
    return tuple(dict.fromkeys(item for group in groups for item in group))


def merge_facts(a: StatementFacts, b: StatementFacts) -> StatementFacts:
    """Facts that cover both a and b: every table, column, function, operator and flag."""
    stronger = a if _CATEGORY_RANK[a.category] >= _CATEGORY_RANK[b.category] else b
    return replace(
        stronger,
        reads=_union(a.reads, b.reads),
        writes=_union(a.writes, b.writes),
        columns=_union(a.columns, b.columns),
        functions=_union(a.functions, b.functions),
        operators=_union(a.operators, b.operators),
        attributes=_union(a.attributes, b.attributes),
        types=_union(a.types, b.types),
        flags=_union(a.flags, b.flags),
        has_where=a.has_where and b.has_where,
        # Either may run: its rows' lineage is known only when both say the same.
        outputs=a.outputs if a.outputs == b.outputs else None,
    )


class PreparedStatements:
    """Names → facts of what they run, shared by SQL PREPARE and protocol Parse (one namespace).

    Adding is eager (in `resolve`/`register`), removing waits for the server's success
    (`completed`/`closed`): if the registry forgot a name the server still had, a later
    PREPARE of that name would fail upstream while the registry believed the new text, and
    EXECUTE would be judged on the wrong statement. For the same reason a PREPARE of a name
    already held merges the old and new facts: the server may have kept the old one.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, StatementFacts] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def lookup(self, name: str) -> StatementFacts | None:
        return self._by_name.get(name)

    def register(self, name: str, facts: StatementFacts) -> None:
        """A protocol-level Parse (or SQL PREPARE) of `name` with these facts."""
        prepared = replace(facts, flags=tuple(f for f in facts.flags if f != "multi_statement"))
        old = self._by_name.get(name)
        # The unnamed statement is always replaced: the server drops it at every Parse.
        if old is not None and name != "":
            prepared = merge_facts(old, prepared)
        self._by_name[name] = prepared

    def closed(self, name: str) -> None:
        """The server confirmed a Close (or DEALLOCATE) of `name`."""
        self._by_name.pop(name, None)

    def completed(self, facts: StatementFacts) -> None:
        """The server ran `facts` successfully: apply removals (DEALLOCATE, DISCARD ALL)."""
        if facts.command == "DEALLOCATE":
            if facts.prepared_name is None:
                self._by_name.clear()
            else:
                self._by_name.pop(facts.prepared_name, None)
        elif facts.command == "DISCARD" and "discard_all" in facts.flags:
            self._by_name.clear()

    def resolve(self, facts: tuple[StatementFacts, ...]) -> tuple[StatementFacts, ...]:
        """Facts for one message in order: PREPAREs recorded, EXECUTEs replaced by what they run."""
        out: list[StatementFacts] = []
        for f in facts:
            if "prepare" in f.flags and f.prepared_name is not None:
                self.register(f.prepared_name, replace(f, flags=_without(f.flags, "prepare")))
                out.append(f)
            elif "execute" in f.flags:
                out.append(self._execute(f))
            else:
                out.append(f)
        return tuple(out)

    def _execute(self, f: StatementFacts) -> StatementFacts:
        prepared = self._by_name.get(f.prepared_name) if f.prepared_name is not None else None
        if prepared is None:
            # Nothing we know of: the policy denies what it cannot see.
            return replace(f, category="unknown")
        own_flags = _without(f.flags, "execute")
        flags = _union(prepared.flags, own_flags, ("execute",))
        if f.command == "EXECUTE":
            return replace(
                prepared,
                text=f.text,
                fingerprint=f.fingerprint,
                functions=_union(prepared.functions, f.functions),
                operators=_union(prepared.operators, f.operators),
                attributes=_union(prepared.attributes, f.attributes),
                types=_union(prepared.types, f.types),
                flags=flags,
                prepared_name=f.prepared_name,
            )
        # EXECUTE wrapped in another statement (CREATE TABLE AS, EXPLAIN [ANALYZE]).
        merged = merge_facts(replace(f, flags=own_flags), prepared)
        category = f.category
        if f.command == "EXPLAIN":
            category = prepared.category if "explain_analyze" in f.flags else "read"
            writes = merged.writes if "explain_analyze" in f.flags else ()
            merged = replace(merged, writes=writes)
        return replace(
            merged,
            text=f.text,
            fingerprint=f.fingerprint,
            command=f.command,
            category=category,
            flags=flags,
            prepared_name=f.prepared_name,
        )


def _without(flags: tuple[str, ...], flag: str) -> tuple[str, ...]:
    return tuple(x for x in flags if x != flag)
