"""The keyed hash chain: each link is HMAC-SHA256(epoch key, previous link || record bytes)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from orjson import dumps, loads

from gateway.audit.records import RECORD_KINDS, RecordKind, canonical, envelope, projections

_hmac_digest: Callable[[bytes, bytes, str], bytes]
try:
    # OpenSSL's one-shot HMAC, which hmac.digest() calls after a check per call: sealing
    # makes one per record.
    from _hashlib import hmac_digest as _hmac_digest
except ImportError:  # a Python built without OpenSSL
    _hmac_digest = hmac.digest

ROTATE_LABEL = b"pgwarden-audit-rotate"
ANCHOR_LABEL = b"pgwarden-audit-anchor\0"
# The first record of a chain links to this; the chain name is inside every signed body.
GENESIS_LINK = bytes(32)
_KIND_BYTES = {kind: canonical(kind) for kind in RECORD_KINDS}


def link_of(key: bytes, previous: bytes, body: bytes) -> bytes:
    # OpenSSL's one-shot HMAC: same bytes as hmac.new(...).digest(), far cheaper.
    return _hmac_digest(key, previous + body, "sha256")


def next_key(key: bytes) -> bytes:
    """Hash a key forward; one-way, so a key stolen later cannot sign an earlier epoch."""
    return hmac.new(key, ROTATE_LABEL, hashlib.sha256).digest()


def key_for_epoch(genesis: bytes, epoch: int) -> bytes:
    key = genesis
    for _ in range(epoch):
        key = next_key(key)
    return key


@dataclass(frozen=True, slots=True)
class ChainTail:
    """Where a chain ends: the next record gets seq + 1, links to `link`, uses `epoch`."""

    seq: int
    link: bytes
    epoch: int

    @classmethod
    def after(cls, seq: int, link: bytes, epoch: int, kind: str) -> ChainTail:
        # A rotation record is the last one signed with the old key.
        return cls(seq, link, epoch + 1 if kind == "key_rotation" else epoch)


EMPTY_TAIL = ChainTail(0, GENESIS_LINK, 0)


def record_key(kind: RecordKind, encoded: bytes) -> bytes:
    """A record's identity apart from its place in the chain: its kind and canonical bytes.
    Two records nobody waits on never have the same (an outcome names its request; a
    session or approval event its session or request, and the time)."""
    return hashlib.sha256(_KIND_BYTES[kind] + encoded).digest()[:16]


class PendingRecord(NamedTuple):
    # A tuple, not a frozen dataclass: two are made per statement on the event loop.
    kind: RecordKind
    time: float
    # The record; None where only its canonical bytes were made (a request on its plan's
    # template): `encoded` is then given.
    record: dict[str, Any] | None
    # canonical(record), when the caller already made it (off the commit's critical path).
    encoded: bytes | None = None
    # A record nobody waits on (an outcome, a session or approval event) may be sent to the
    # store again when its commit went unacknowledged: `key` (record_key) is its identity,
    # stored with it, and `resent` says it may already be there (a store looks before it
    # seals, and leaves it out if so). None and False for the rest.
    key: bytes | None = None
    resent: bool = False


def envelope_bytes(
    chain: str, seq: int, epoch: int, kind: str, time: float, encoded_record: bytes
) -> bytes:
    """canonical(envelope(...)) from the record's canonical bytes, without re-encoding it.

    The envelope's keys in sorted order are chain, epoch, kind, record, seq, time; orjson's
    compact output is exactly these pieces joined, byte for byte."""
    return _ENVELOPE % (
        canonical(chain),
        epoch,
        canonical(kind),
        encoded_record,
        seq,
        canonical(time),
    )


_ENVELOPE = b'{"chain":%s,"epoch":%d,"kind":%s,"record":%s,"seq":%d,"time":%s}'


class SealedRecord(NamedTuple):
    # A tuple, not a frozen dataclass: one is made per record on the writer's hot path.
    chain: str
    seq: int
    epoch: int
    kind: RecordKind
    time: float
    body: bytes
    link: bytes
    # The signed record where the sealer had it as a value (None: read from `body`).
    record: dict[str, Any] | None = None
    # The pending record's key and resent (see PendingRecord).
    key: bytes | None = None
    resent: bool = False

    @property
    def columns(self) -> dict[str, Any]:
        """The store's searchable columns: derived where a store inserts the record, not
        while the statement waits for its seal (the gateway's index is another process)."""
        record = self.record if self.record is not None else loads(self.body)["record"]
        return projections(record)


@dataclass(frozen=True, slots=True)
class Anchor:
    """Signed stand-in for pruned records: the seq and link the remaining chain starts from."""

    chain: str
    through_seq: int
    through_link: bytes
    next_epoch: int
    signed_epoch: int
    time: float
    mac: bytes

    def signed_bytes(self) -> bytes:
        return ANCHOR_LABEL + canonical(
            {
                "chain": self.chain,
                "through_seq": self.through_seq,
                "through_link": self.through_link.hex(),
                "next_epoch": self.next_epoch,
                "signed_epoch": self.signed_epoch,
                "time": self.time,
            }
        )

    def valid_under(self, key: bytes) -> bool:
        expected = hmac.new(key, self.signed_bytes(), hashlib.sha256).digest()
        return hmac.compare_digest(expected, self.mac)


class AuditChain:
    """One chain's signer: seals pending records onto a tail with the right epoch key.

    It holds only the current key. A tail in a later epoch than the key (a rotation record
    committed just before a crash, before the key file was replaced) is caught up by hashing
    the key forward; a tail in an earlier epoch cannot be signed and is refused.
    """

    def __init__(self, name: str, epoch: int, key: bytes) -> None:
        self.name = name
        self.epoch = epoch
        self._key = key

    def key_for(self, epoch: int) -> bytes:
        if epoch < self.epoch:
            raise ValueError(
                f"chain {self.name} ends in key epoch {epoch} but the key is at epoch "
                f"{self.epoch}; earlier keys are destroyed"
            )
        return key_for_epoch(self._key, epoch - self.epoch)

    def advance(self, epoch: int) -> bytes:
        """Move the held key forward to `epoch` (after a commit); the new key."""
        self._key = self.key_for(epoch)
        self.epoch = epoch
        return self._key

    def seal(
        self, tail: ChainTail, pending: Sequence[PendingRecord]
    ) -> tuple[list[SealedRecord], ChainTail]:
        out: list[SealedRecord] = []
        seq, link, epoch = tail.seq, tail.link, tail.epoch
        key = self.key_for(epoch)
        # envelope_bytes, with what is the same for every record encoded once.
        name = canonical(self.name)
        for p in pending:
            seq += 1
            record = p.record
            if p.kind == "key_rotation":
                record = {**(record or {}), "from_epoch": epoch, "to_epoch": epoch + 1}
                body = canonical(envelope(self.name, seq, epoch, p.kind, p.time, record))
            else:
                encoded = p.encoded if p.encoded is not None else canonical(record)
                body = _ENVELOPE % (name, epoch, _KIND_BYTES[p.kind], encoded, seq, dumps(p.time))
            link = _hmac_digest(key, link + body, "sha256")
            out.append(
                SealedRecord(
                    self.name, seq, epoch, p.kind, p.time, body, link, record, p.key, p.resent
                )
            )
            if p.kind == "key_rotation":
                epoch += 1
                key = next_key(key)
        return out, ChainTail(seq, link, epoch)

    def seal_prune(
        self, tail: ChainTail, through: ChainTail, cutoff: float, now: float
    ) -> tuple[SealedRecord, Anchor]:
        """The prune record appended to the chain and the anchor the pruned prefix leaves."""
        record = {
            "time": now,
            "cutoff": cutoff,
            "through_seq": through.seq,
            "through_link": through.link.hex(),
            "next_epoch": through.epoch,
        }
        (sealed,), _ = self.seal(tail, [PendingRecord("prune", now, record)])
        key = self.key_for(tail.epoch)
        unsigned = Anchor(self.name, through.seq, through.link, through.epoch, tail.epoch, now, b"")
        mac = hmac.new(key, unsigned.signed_bytes(), hashlib.sha256).digest()
        anchor = Anchor(self.name, through.seq, through.link, through.epoch, tail.epoch, now, mac)
        return sealed, anchor
