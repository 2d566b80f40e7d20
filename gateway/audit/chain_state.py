"""The audit trail's state as `pgwarden audit verify` and the console report it: every chain
of the store verified, this instance's audit log verified and compared with its index, how
far the index lags the log, the last record and each chain's head witness."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.audit.keys import AuditKeyring, HeadWitness
from gateway.audit.log import AuditLog
from gateway.audit.search import RecordSummary
from gateway.audit.store import AuditStore, RecordFilter, StoredRecord
from gateway.audit.verify import (
    ChainProblem,
    ChainReport,
    VerifyReport,
    compare_index,
    index_lag,
    verify,
    verify_log,
)


@dataclass(frozen=True, slots=True)
class LogCheck:
    """This instance's audit log: its own walk, the first index record that differs from
    it, and how many of its records the index does not hold yet."""

    log: ChainReport
    index: ChainProblem | None
    lag: int


@dataclass(frozen=True, slots=True)
class TrailState:
    store: VerifyReport
    log: LogCheck | None

    @property
    def problems(self) -> list[str]:
        found = [str(p) for p in self.store.problems]
        if self.log is not None:
            if self.log.log.problem is not None:
                found.append(f"audit log: {self.log.log.problem}")
            if self.log.index is not None:
                found.append(f"index: {self.log.index}")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def empty(self) -> bool:
        """No chain in the store and no log: nothing was verified."""
        return not self.store.chains and self.log is None

    def as_json(self) -> dict[str, Any]:
        """What `pgwarden audit verify --json` prints."""
        doc: dict[str, Any] = {
            "ok": self.ok,
            "chains": [chain_json(c) for c in self.store.chains],
        }
        if self.log is not None:
            doc["log"] = {
                **chain_json(self.log.log),
                "index_problem": None if self.log.index is None else str(self.log.index),
                "index_lag": self.log.lag,
            }
        return doc


def chain_json(c: ChainReport) -> dict[str, Any]:
    problem = c.problem
    return {
        "chain": c.chain,
        "records": c.records,
        "first_seq": c.first_seq,
        "last_seq": c.last_seq,
        "epoch": c.epoch,
        "head_checked": c.head_checked,
        "problem": None
        if problem is None
        else {"id": problem.id, "seq": problem.seq, "kind": problem.kind, "detail": problem.detail},
    }


async def trail_state(
    store: AuditStore,
    keyring: AuditKeyring,
    heads: HeadWitness,
    trail: AuditLog,
    instance: str,
    chains: Sequence[str] | None = None,
    *,
    require_head: bool = True,
) -> TrailState:
    """Verify the store's chains (or those named) and, when this instance's chain is among
    them and it has an audit log, the log and the index against it."""
    report = await verify(store, keyring, heads, chains, require_head=require_head)
    if not trail.segments() or (chains is not None and instance not in chains):
        return TrailState(report, None)
    checked = LogCheck(
        await verify_log(trail, instance, keyring, heads, store, require_head=require_head),
        await compare_index(store, trail, instance),
        await index_lag(store, trail, instance),
    )
    return TrailState(_lag_is_not_truncation(report, checked), checked)


def _lag_is_not_truncation(report: VerifyReport, checked: LogCheck) -> VerifyReport:
    """The head witness follows the log, which the index may lag (a gateway killed before
    indexing its last records): an index that ends before the witness while the verified
    log holds all it names is behind, not truncated (the lag is reported)."""
    log_report = checked.log
    chains = []
    for c in report.chains:
        p = c.problem
        if (
            c.chain == log_report.chain
            and p is not None
            and p.kind == "truncated"
            and log_report.problem is None
            and checked.index is None
            and checked.lag > 0
        ):
            c = dataclasses.replace(c, problem=None)
        chains.append(c)
    return VerifyReport(tuple(chains))


@dataclass(frozen=True, slots=True)
class HeadSeen:
    """A chain's head witness: the newest (seq, link) the writer recorded outside the store."""

    chain: str
    seq: int
    link: bytes


@dataclass(frozen=True, slots=True)
class ChainState:
    """What an auditor looks at first: the verify result, the newest record, the heads."""

    trail: TrailState
    last_record: StoredRecord | None
    heads: tuple[HeadSeen, ...]
    # When the walk began (unix seconds): what it reports is the trail as of then.
    checked_at: float

    @property
    def index_lag(self) -> int | None:
        return None if self.trail.log is None else self.trail.log.lag

    def as_json(self) -> dict[str, Any]:
        last = self.last_record
        return {
            "ok": self.trail.ok,
            "problems": self.trail.problems,
            "verify": self.trail.as_json(),
            "last_record": None
            if last is None
            else {**RecordSummary.of(last).as_json(), "link": last.link.hex()},
            "heads": [{"chain": h.chain, "seq": h.seq, "link": h.link.hex()} for h in self.heads],
            "index_lag": self.index_lag,
            "checked_at": self.checked_at,
        }


async def chain_state(
    store: AuditStore, keyring: AuditKeyring, heads: HeadWitness, trail: AuditLog, instance: str
) -> ChainState:
    """The whole trail verified, as `pgwarden audit verify` does, plus the newest record
    indexed and every head witness."""
    began = time.time()
    verified = await trail_state(store, keyring, heads, trail, instance)
    newest = await store.search(RecordFilter(), 1)
    seen = []
    for name in sorted(heads.chains()):
        head = heads.read(name)
        if head is not None:
            seen.append(HeadSeen(name, head[0], head[1]))
    return ChainState(verified, newest[0] if newest else None, tuple(seen), began)
