"""Walking audit chains to find the first record that was changed, lost, moved or forged."""

from __future__ import annotations

import hmac
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from gateway.audit.chain import GENESIS_LINK, Anchor, ChainTail, key_for_epoch, link_of
from gateway.audit.keys import AuditKeyring, HeadWitness
from gateway.audit.log import AuditLog, LogEntry
from gateway.audit.records import PROJECTED_COLUMNS, projections, record_id
from gateway.audit.store import AuditStore, StoredRecord

ProblemKind = Literal["changed", "missing", "reordered", "inserted", "truncated", "unverifiable"]


@dataclass(frozen=True, slots=True)
class ChainProblem:
    chain: str
    seq: int
    kind: ProblemKind
    detail: str

    @property
    def id(self) -> str:
        return record_id(self.chain, self.seq)

    def __str__(self) -> str:
        return f"{self.kind} at {self.id}: {self.detail}"


@dataclass(frozen=True, slots=True)
class ChainReport:
    chain: str
    records: int
    first_seq: int | None
    last_seq: int | None
    epoch: int
    # Whether a head witness was found and compared (truncation is only detectable then).
    head_checked: bool
    problem: ChainProblem | None


@dataclass(frozen=True, slots=True)
class VerifyReport:
    chains: tuple[ChainReport, ...]

    @property
    def ok(self) -> bool:
        return all(c.problem is None for c in self.chains)

    @property
    def problems(self) -> list[ChainProblem]:
        return [c.problem for c in self.chains if c.problem is not None]


class _ChainSource(Protocol):
    """What a walk reads: a store, or the audit log seen as one."""

    def scan(
        self, chain: str, after_seq: int = 0, batch: int = 1000
    ) -> AsyncGenerator[StoredRecord, None]: ...

    async def anchor(self, chain: str) -> Anchor | None: ...


class _LogSource:
    def __init__(self, audit_log: AuditLog) -> None:
        self.log = audit_log

    async def scan(
        self, chain: str, after_seq: int = 0, batch: int = 1000
    ) -> AsyncGenerator[StoredRecord, None]:
        anchor = self.log.anchor()
        # Pruning deletes whole segments: what is left of one before the anchor is skipped.
        after = max(after_seq, anchor.through_seq if anchor is not None else 0)
        for entry in self.log.entries(after):
            yield _stored(entry, chain)

    async def anchor(self, chain: str) -> Anchor | None:
        return self.log.anchor()


def _stored(entry: LogEntry, chain: str) -> StoredRecord:
    """A log frame as a stored record; a body that is not a signed record still reaches the
    walk (which reports it), with empty columns."""
    try:
        env = orjson.loads(entry.body)
        record = env["record"]
        columns = projections(record)
        epoch, kind, when = env["epoch"], env["kind"], env["time"]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        columns = dict.fromkeys(PROJECTED_COLUMNS)
        epoch, kind, when = -1, "", 0.0
    return StoredRecord(
        entry.offset, chain, entry.seq, epoch, kind, when, entry.body, entry.link, **columns
    )


async def verify_log(
    audit_log: AuditLog,
    chain: str,
    keys: AuditKeyring,
    heads: HeadWitness | None,
    index: AuditStore | None = None,
    *,
    require_head: bool = True,
) -> ChainReport:
    """Verify a chain's audit log. A log that starts after seq 1 without a prune anchor (it
    was started on a trail the store held before) continues from the index's record there.
    With `heads`, a log holding records but no head witness is a problem unless
    `require_head` is off (as for `verify`)."""
    source = _LogSource(audit_log)
    start = None
    first = next(audit_log.entries(), None)
    if first is not None and first.seq > 1 and audit_log.anchor() is None and index is not None:
        before = await index.get(chain, first.seq - 1)
        if before is not None:
            start = ChainTail.after(before.seq, before.link, before.epoch, before.kind)
    return await _verify_chain(source, keys, heads, chain, require_head, start)


async def compare_index(store: AuditStore, audit_log: AuditLog, chain: str) -> ChainProblem | None:
    """The first index record that is not the log's record of the same seq (the index may
    end before the log: that is lag, see `index_lag`)."""
    anchor = audit_log.anchor()
    pruned_through = anchor.through_seq if anchor is not None else 0
    entries = audit_log.entries()
    entry = next(entries, None)
    async for r in store.scan(chain):
        while entry is not None and entry.seq < r.seq:
            entry = next(entries, None)
        if entry is None:
            if r.seq > pruned_through:
                return ChainProblem(chain, r.seq, "inserted", "in the index but not in the log")
            continue
        if entry.seq != r.seq:
            continue  # pruned from the log only
        if entry.body != r.body or not hmac.compare_digest(entry.link, r.link):
            return ChainProblem(chain, r.seq, "changed", "the index differs from the audit log")
    return None


async def index_lag(store: AuditStore, audit_log: AuditLog, chain: str) -> int:
    """Records the log holds after the index's last one."""
    last = audit_log.last()
    if last is None:
        return 0
    indexed = 0
    anchor = await store.anchor(chain)
    if anchor is not None:
        indexed = anchor.through_seq
    async for r in store.scan(chain, after_seq=max(indexed, last.seq - 100_000), batch=5000):
        indexed = r.seq
    return max(last.seq - indexed, 0)


async def verify(
    store: AuditStore,
    keys: AuditKeyring,
    heads: HeadWitness | None = None,
    chains: Sequence[str] | None = None,
    *,
    require_head: bool = True,
) -> VerifyReport:
    """Verify every chain in the store (or those named), each up to its first problem.

    With `heads`, a chain holding records but no head witness is a problem unless
    `require_head` is off: deleting the witness must not turn a cut tail into a pass."""
    names = list(chains) if chains is not None else await store.chains()
    if chains is None and heads is not None:
        # A chain whose records were all deleted is known only from its head witness.
        names = sorted(set(names) | set(heads.chains()))
    reports = [await _verify_chain(store, keys, heads, name, require_head) for name in names]
    return VerifyReport(tuple(reports))


class _Walk:
    def __init__(self, chain: str, genesis: bytes) -> None:
        self.chain = chain
        self.genesis = genesis
        self._keys: dict[int, bytes] = {}
        self.expected = 1
        self.prev = GENESIS_LINK
        self.epoch = 0
        self.records = 0
        self.first: int | None = None
        self.prunes: set[tuple[int, str]] = set()
        # The link at the head witness's seq, kept to compare once the walk is done.
        self.head_seq: int | None = None
        self.head_link: bytes | None = None

    def key(self, epoch: int) -> bytes:
        if epoch not in self._keys:
            self._keys[epoch] = key_for_epoch(self.genesis, epoch)
        return self._keys[epoch]

    def problem(self, seq: int, kind: ProblemKind, detail: str) -> ChainProblem:
        return ChainProblem(self.chain, seq, kind, detail)

    def check(
        self, cur: StoredRecord, nxt: StoredRecord | None, head_seq: int | None
    ) -> ChainProblem | None:
        if cur.seq < self.expected:
            return self.problem(
                cur.seq, "inserted", f"a second record holds seq {cur.seq} (pos {cur.pos})"
            )
        if cur.seq > self.expected:
            gone = (
                f"{self.expected}"
                if cur.seq == self.expected + 1
                else (f"{self.expected}..{cur.seq - 1}")
            )
            detail = f"record(s) {gone} are missing"
            if cur.kind == "chain_gap":
                # The gateway was started over the loss on purpose: say so, with when.
                detail += (
                    f"; the chain_gap record {record_id(self.chain, cur.seq)} says the store "
                    "was behind its head witness and the operator accepted the loss"
                )
            return self.problem(self.expected, "missing", detail)
        env = _envelope(cur)
        if env is None:
            return self.problem(cur.seq, "changed", "the stored body is not a signed record")
        if env["seq"] != cur.seq:
            return self._misplaced(cur, env["seq"], nxt)
        changed = _mismatch(cur, env, self.chain)
        if changed is not None:
            return self.problem(cur.seq, "changed", changed)
        if env["epoch"] != self.epoch:
            return self.problem(
                cur.seq,
                "changed",
                f"signed with key epoch {env['epoch']} where the chain is in epoch {self.epoch}",
            )
        expected_link = link_of(self.key(self.epoch), self.prev, cur.body)
        if not hmac.compare_digest(expected_link, cur.link):
            if nxt is not None and hmac.compare_digest(
                link_of(self.key(self.epoch), self.prev, nxt.body), nxt.link
            ):
                return self.problem(
                    cur.seq, "inserted", "forged record: the next record links past it"
                )
            if head_seq is not None and cur.seq > head_seq and nxt is None:
                return self.problem(
                    cur.seq, "inserted", "forged record appended after the head witness"
                )
            return self.problem(
                cur.seq, "changed", "HMAC link does not match: the record or its link was altered"
            )
        record = env["record"]
        if env["kind"] == "key_rotation":
            if record.get("to_epoch") != self.epoch + 1:
                return self.problem(cur.seq, "changed", "key rotation skips an epoch")
            self.epoch += 1
        elif env["kind"] == "prune":
            self.prunes.add((record["through_seq"], record["through_link"]))
        self.prev = cur.link
        if cur.seq == self.head_seq:
            self.head_link = cur.link
        self.expected += 1
        self.records += 1
        if self.first is None:
            self.first = cur.seq
        return None

    def _misplaced(
        self, cur: StoredRecord, signed_seq: int, nxt: StoredRecord | None
    ) -> ChainProblem:
        shift = signed_seq - cur.seq
        nxt_env = _envelope(nxt) if nxt is not None else None
        nxt_shift = None if nxt is None or nxt_env is None else nxt_env["seq"] - nxt.seq
        if nxt_shift is None or nxt_shift == shift:
            # Every later record is off by the same amount: renumbered after a removal or an
            # insertion, not moved.
            if shift > 0:
                return self.problem(
                    cur.seq, "missing",
                    f"{shift} record(s) removed before it and the rest renumbered "
                    f"(seq {cur.seq} holds the record signed as seq {signed_seq})",
                )  # fmt: skip
            return self.problem(
                cur.seq, "inserted",
                f"{-shift} record(s) inserted before it and the rest renumbered "
                f"(seq {cur.seq} holds the record signed as seq {signed_seq})",
            )  # fmt: skip
        return self.problem(
            cur.seq, "reordered", f"seq {cur.seq} holds the record signed as seq {signed_seq}"
        )


def _envelope(r: StoredRecord) -> dict[str, Any] | None:
    try:
        env = orjson.loads(r.body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(env, dict) or not isinstance(env.get("seq"), int):
        return None
    if not isinstance(env.get("record"), dict):
        return None
    return env


def _mismatch(r: StoredRecord, env: dict[str, Any], chain: str) -> str | None:
    """Which stored column disagrees with the signed body (search must not be lied to)."""
    if env.get("chain") != chain:
        return f"signed for chain {env.get('chain')!r}"
    for column in ("epoch", "kind", "time"):
        if env.get(column) != getattr(r, column):
            return f"column {column} does not match the signed record"
    derived = projections(env["record"])
    for column in PROJECTED_COLUMNS:
        if derived[column] != getattr(r, column):
            return f"column {column} does not match the signed record"
    return None


async def _verify_chain(
    store: _ChainSource,
    keys: AuditKeyring,
    heads: HeadWitness | None,
    chain: str,
    require_head: bool = True,
    start: ChainTail | None = None,
) -> ChainReport:
    head = heads.read(chain) if heads is not None else None
    genesis = keys.genesis_key(chain)

    def report(walk: _Walk | None, problem: ChainProblem | None) -> ChainReport:
        if walk is None:
            return ChainReport(chain, 0, None, None, 0, head is not None, problem)
        last = walk.expected - 1 if walk.records else None
        return ChainReport(
            chain, walk.records, walk.first, last, walk.epoch, head is not None, problem
        )

    if genesis is None:
        return report(
            None,
            ChainProblem(
                chain, 0, "unverifiable", f"no genesis key for chain {chain!r} in {keys.directory}"
            ),
        )
    walk = _Walk(chain, genesis)
    anchor = await store.anchor(chain)
    if anchor is not None:
        if anchor.chain != chain or not anchor.valid_under(walk.key(anchor.signed_epoch)):
            return report(
                walk, walk.problem(anchor.through_seq, "changed", "prune anchor signature invalid")
            )
        walk.expected = anchor.through_seq + 1
        walk.prev = anchor.through_link
        walk.epoch = anchor.next_epoch
    elif start is not None:
        walk.expected, walk.prev, walk.epoch = start.seq + 1, start.link, start.epoch
    head_seq = head[0] if head is not None else None
    walk.head_seq = head_seq

    rows = store.scan(chain)
    cur = await anext(rows, None)
    while cur is not None:
        nxt = await anext(rows, None)
        problem = walk.check(cur, nxt, head_seq)
        if problem is not None:
            await rows.aclose()
            return report(walk, problem)
        cur = nxt

    if anchor is not None and (anchor.through_seq, anchor.through_link.hex()) not in walk.prunes:
        return report(
            walk,
            walk.problem(
                anchor.through_seq, "changed", "prune anchor matches no prune record in the chain"
            ),
        )
    if head is None and heads is not None and require_head and walk.records:
        return report(
            walk,
            walk.problem(
                walk.expected,
                "unverifiable",
                f"no head witness for chain {chain!r} in {heads.directory}: records cut from"
                " the tail could not be detected (was it deleted? if the chain was written on"
                " another host, verify there or pass --no-head)",
            ),
        )
    if head is not None:
        last = walk.expected - 1
        if last < head[0]:
            n = head[0] - last
            return report(
                walk,
                walk.problem(
                    last + 1,
                    "truncated",
                    f"chain ends at seq {last} but the head witness says {head[0]}: "
                    f"{n} record(s) cut from the tail",
                ),
            )
        link = walk.head_link
        if link is not None and not hmac.compare_digest(link, head[1]):
            return report(
                walk,
                walk.problem(head[0], "changed", "link differs from the head witness: rewritten"),
            )
    return report(walk, None)
