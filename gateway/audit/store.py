"""What an audit store offers the writer, the verifier and the CLI, whatever its backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from gateway.audit.chain import Anchor, ChainTail, SealedRecord
from gateway.audit.records import record_id

# Seals a batch onto the chain's tail, leaving out the re-sent records whose keys the store
# found already stored (the second argument): the sealed records and the new tail.
Seal = Callable[[ChainTail, frozenset[bytes]], tuple[list[SealedRecord], ChainTail]]
SealPrune = Callable[[ChainTail, ChainTail], tuple[SealedRecord, Anchor]]
# What a store's commit callback receives: the sealed records, or why they were not stored.
CommitResult = list[SealedRecord] | BaseException


class AuditStoreError(Exception):
    """The store could not do what was asked (I/O, lock timeout, lost connection, ...)."""


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as read back: the signed body and link, plus the searchable projections."""

    pos: int
    chain: str
    seq: int
    epoch: int
    kind: str
    time: float
    body: bytes
    link: bytes
    session_id: str | None
    subject: str | None
    target: str | None
    action: str | None
    request_id: str | None
    text: str | None

    @property
    def id(self) -> str:
        return record_id(self.chain, self.seq)

    def envelope(self) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self.body)
        return value

    def record(self) -> dict[str, Any]:
        value: dict[str, Any] = self.envelope()["record"]
        return value


@dataclass(frozen=True, slots=True)
class SearchDialect:
    """How a backend spells the parts of a search that are not plain column tests."""

    # The i-th argument (1-based).
    placeholder: Callable[[int], str]
    # The statement text holds the argument {} as a literal substring (not LIKE: the
    # user's text has no wildcards).
    contains: str
    # The record's principal.groups (in the signed body) holds the argument {}.
    in_group: str
    # The record's decision masked at least one column (no argument).
    masked: str


@dataclass(frozen=True, slots=True)
class RecordFilter:
    chain: str | None = None
    subject: str | None = None
    target: str | None = None
    action: str | None = None
    kind: str | None = None
    session_id: str | None = None
    request_id: str | None = None
    since: float | None = None
    until: float | None = None
    # Substring of the statement text.
    text: str | None = None
    # One of the principal's groups (read from the body: groups are not a projected column).
    group: str | None = None
    # Only records whose decision masked columns (True), or masked none (False).
    masked: bool | None = None
    # Any of these request ids: the outcomes of a session's requests in one query.
    request_ids: tuple[str, ...] | None = None
    # Only records stored before this position: the next page of a newest-first search.
    before_pos: int | None = None

    def clauses(self, dialect: SearchDialect) -> tuple[str, list[Any]]:
        """A WHERE clause (or "") and its arguments."""
        parts: list[str] = []
        args: list[Any] = []

        def add(sql: str, value: Any) -> None:
            args.append(value)
            parts.append(sql.format(dialect.placeholder(len(args))))

        for column in ("chain", "subject", "target", "action", "kind", "session_id", "request_id"):
            value = getattr(self, column)
            if value is not None:
                add(f"{column} = {{}}", value)
        if self.since is not None:
            add("time >= {}", self.since)
        if self.until is not None:
            add("time < {}", self.until)
        if self.before_pos is not None:
            add("pos < {}", self.before_pos)
        if self.text is not None:
            add(dialect.contains, self.text)
        if self.group is not None:
            add(dialect.in_group, self.group)
        if self.masked is not None:
            parts.append(dialect.masked if self.masked else f"NOT ({dialect.masked})")
        if self.request_ids is not None:
            if not self.request_ids:
                parts.append("FALSE")
            else:
                marks = []
                for rid in self.request_ids:
                    args.append(rid)
                    marks.append(dialect.placeholder(len(args)))
                parts.append(f"request_id IN ({', '.join(marks)})")
        return (" WHERE " + " AND ".join(parts)) if parts else "", args


class AuditStore(Protocol):
    """A durable home for audit chains. Appends and prunes are one transaction each."""

    commits: int

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def append(self, chain: str, seal: Seal) -> list[SealedRecord]:
        """Read the chain's tail, seal the records onto it, insert, commit; durable on return.
        Where the seal gives re-sent records (`resent`), the store first looks for their keys
        under the chain's lock and seals again without those it holds: a record sent again
        after a lost acknowledgement is stored once."""
        ...

    async def prune(self, chain: str, cutoff: float, seal: SealPrune) -> Anchor | None:
        """Delete the chain's records older than `cutoff`, leaving a signed anchor."""
        ...

    async def chains(self) -> list[str]: ...

    def scan(
        self, chain: str, after_seq: int = 0, batch: int = 1000
    ) -> AsyncGenerator[StoredRecord, None]:
        """The chain's records in seq order, fetched `batch` at a time."""
        ...

    async def search(self, where: RecordFilter, limit: int) -> list[StoredRecord]:
        """Matching records, newest first."""
        ...

    async def after(self, pos: int, limit: int) -> list[StoredRecord]:
        """Records stored after position `pos` (in storage order), for following the trail."""
        ...

    async def get(self, chain: str, seq: int) -> StoredRecord | None: ...

    async def anchor(self, chain: str) -> Anchor | None: ...
