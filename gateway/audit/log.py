"""The audit log: one chain's sealed records appended to segment files, the point of durability.

A record is in the audit trail once its frame is in the log (written, and in `disk`
durability fdatasynced); the SQLite or PostgreSQL store is an index fed from the log. A frame,
little-endian:

    u32 payload length, u32 CRC-32 of the payload, u64 seq, payload = link (32 bytes) || body

`body` is the signed canonical envelope, `link` its HMAC chain link, exactly as a store keeps
them. The CRC only tells a torn or garbled frame (a crash in the middle of a write) from a
whole one; tampering is what the HMAC chain and `audit verify` catch. Segments are named by
the seq of their first record and rotated at a batch boundary once they pass a size.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.audit.chain import Anchor, SealedRecord
from gateway.audit.keys import _file_stem

log = logging.getLogger("pgwarden.audit")

_HEADER = struct.Struct("<IIQ")
_LINK = 32
# A frame longer than this is garbage (a record is capped far below it by the writer).
_MAX_PAYLOAD = 64 * 1024 * 1024
_SUFFIX = ".wal"


def frame(record: SealedRecord) -> bytes:
    payload = record.link + record.body
    return _HEADER.pack(len(payload), zlib.crc32(payload), record.seq) + payload


@dataclass(frozen=True, slots=True)
class LogEntry:
    """A whole frame read back: where it is and what it holds."""

    segment: Path
    offset: int
    seq: int
    link: bytes
    body: bytes

    def sealed(self) -> SealedRecord:
        """As the writer sealed it."""
        env = orjson.loads(self.body)
        return SealedRecord(
            env["chain"], self.seq, env["epoch"], env["kind"], env["time"], self.body, self.link,
            env["record"],
        )  # fmt: skip


def _frames(data: bytes | memoryview, segment: Path) -> Iterator[LogEntry | int]:
    """The whole frames of a segment's bytes, then (if the rest is not one) the offset where
    the torn or garbled rest starts."""
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < _HEADER.size:
            yield pos
            return
        length, crc, seq = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        if length <= _LINK or length > _MAX_PAYLOAD or end - start < length:
            yield pos
            return
        payload = bytes(data[start : start + length])
        if zlib.crc32(payload) != crc:
            yield pos
            return
        yield LogEntry(segment, pos, seq, payload[:_LINK], payload[_LINK:])
        pos = start + length


@dataclass(frozen=True, slots=True)
class PendingSync:
    """One sync's worth of the log (AuditLog.sync_begin): `files` to fdatasync in order (the
    rotated-out segments, `retired`, then the current one), then `directory` to fsync."""

    retired: list[int]
    files: list[int]
    directory: int | None


def log_directory(state_dir: Path, chain: str) -> Path:
    return state_dir / "audit-log" / _file_stem(chain)


class AuditLog:
    """One chain's segment files: appended by one writer, read by anyone.

    `write()` is called on the writer's event loop; `sync()` may run on another thread (one
    at a time): segments rotated out since the last sync are fdatasynced and closed by it,
    and the directory is fsynced when a segment was created, so a sync covers everything
    written before it started.
    """

    def __init__(self, directory: Path, *, segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self._fd: int | None = None
        self._size = 0
        self._segment: Path | None = None
        # Rotated-out segments not yet synced, and whether a new one's entry needs a sync.
        self._retired: list[int] = []
        self._dir_dirty = False
        self._lock = threading.Lock()
        # Segments rotated out and not yet closed (sync() or close_retired() closes them).
        self.rotated = 0

    # -- reading ------------------------------------------------------------------------------

    def segments(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("*" + _SUFFIX))

    @staticmethod
    def first_seq(segment: Path) -> int:
        return int(segment.name.removesuffix(_SUFFIX))

    def entries(self, after_seq: int = 0) -> Iterator[LogEntry]:
        """Whole frames with seq > after_seq, in log order (a torn tail is not read)."""
        segments = self.segments()
        for i, segment in enumerate(segments):
            if i + 1 < len(segments) and self.first_seq(segments[i + 1]) <= after_seq + 1:
                continue  # every record in it is at or before after_seq
            try:
                data = segment.read_bytes()
            except FileNotFoundError:
                continue  # pruned meanwhile
            for item in _frames(data, segment):
                if isinstance(item, int):
                    break
                if item.seq > after_seq:
                    yield item

    def last(self) -> LogEntry | None:
        """The last whole frame of the log."""
        for segment in reversed(self.segments()):
            found = None
            for item in _frames(segment.read_bytes(), segment):
                if isinstance(item, LogEntry):
                    found = item
            if found is not None:
                return found
        return None

    def follow(self, after_seq: int) -> LogFollower:
        return LogFollower(self, after_seq)

    # -- writing ------------------------------------------------------------------------------

    def open(self) -> LogEntry | None:
        """Open the last segment for appending, first cutting a torn final frame (a crash in
        the middle of a write) off it, with an error in the log and the cut bytes kept
        beside it; the last whole record (None: the log is empty)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        segments = self.segments()
        last: LogEntry | None = None
        if segments:
            segment = segments[-1]
            data = segment.read_bytes()
            good = 0
            for item in _frames(data, segment):
                if isinstance(item, int):
                    self._cut(segment, data, item)
                    break
                last = item
                good = item.offset + _HEADER.size + _LINK + len(item.body)
            self._open_segment(segment, good)
            if last is None and len(segments) > 1:
                last = self.last()
        return last

    def _cut(self, segment: Path, data: bytes, at: int) -> None:
        kept = segment.with_name(f"{segment.name}.torn-{at}")
        kept.write_bytes(data[at:])
        log.error(
            "audit log %s: %d bytes after offset %d are not a whole record (a write cut short "
            "by a crash); truncated, the bytes kept in %s",
            segment, len(data) - at, at, kept.name,
        )  # fmt: skip
        with open(segment, "r+b") as f:
            f.truncate(at)
            os.fsync(f.fileno())

    def _open_segment(self, segment: Path, size: int) -> None:
        fd = os.open(segment, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._fd, self._segment, self._size = fd, segment, size

    def write(self, data: bytes, first_seq: int) -> None:
        """Append frames whose first record is `first_seq`, all of them or OSError (then
        the log is cut back to where it was: no partial batch stays in it)."""
        if self._fd is None or self._size >= self.segment_bytes:
            self._rotate(first_seq)
        fd = self._fd
        assert fd is not None
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, view[done:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._size)
            raise
        self._size += done

    def _rotate(self, first_seq: int) -> None:
        segment = self.directory / f"{first_seq:020d}{_SUFFIX}"
        old = self._fd
        self._open_segment(segment, 0)
        with self._lock:
            if old is not None:
                self._retired.append(old)
                self.rotated += 1
            self._dir_dirty = True

    def close_retired(self) -> None:
        """Close rotated-out segments without syncing them (for a writer that never syncs)."""
        with self._lock:
            retired, self._retired = self._retired, []
        for fd in retired:
            os.close(fd)

    def sync(self) -> None:
        """Make everything written so far durable (may run on another thread)."""
        pending = self.sync_begin()
        try:
            for fd in pending.files:
                os.fdatasync(fd)
            if pending.directory is not None:
                os.fsync(pending.directory)
        except BaseException:
            self.sync_end(pending, ok=False)
            raise
        self.sync_end(pending, ok=True)

    def sync_begin(self) -> PendingSync:
        """What a sync of everything written so far must cover, for whoever performs it
        (this thread, another, or the sync process): rotated-out segments, the current
        one, and the directory (opened here) when a segment was created. sync_end() must
        follow, once it has succeeded or failed."""
        with self._lock:
            retired, self._retired = self._retired, []
            dir_dirty, self._dir_dirty = self._dir_dirty, False
            fd = self._fd
        directory = None
        if dir_dirty:
            try:
                directory = os.open(self.directory, os.O_RDONLY)
            except OSError:
                self._give_back(retired, dir_dirty=True)
                raise
        return PendingSync(retired, [*retired, *([fd] if fd is not None else [])], directory)

    def sync_end(self, pending: PendingSync, *, ok: bool) -> None:
        """After the sync of `pending`: the rotated-out segments are closed once synced; a
        sync that failed leaves them, and the directory, to the next one (a later success
        must not release records that only this one covered)."""
        if pending.directory is not None:
            os.close(pending.directory)
        if ok:
            for old in pending.retired:
                os.close(old)
            return
        self._give_back(pending.retired, dir_dirty=pending.directory is not None)

    def _give_back(self, retired: list[int], *, dir_dirty: bool) -> None:
        """What a sync that did not happen covered is the next one's to sync."""
        with self._lock:
            self._retired[:0] = retired
            self._dir_dirty = self._dir_dirty or dir_dirty

    def close(self) -> None:
        with self._lock:
            fds = [*self._retired, *([self._fd] if self._fd is not None else [])]
            self._retired, self._fd = [], None
        for fd in fds:
            os.close(fd)

    # -- retention ----------------------------------------------------------------------------

    def prune(self, anchor: Anchor) -> int:
        """Delete the segments that hold only records the anchor stands for (the anchor
        is kept beside them first, so the rest stays verifiable); how many were deleted."""
        anchor_path = self.directory / "anchor"
        tmp = anchor_path.with_suffix(".tmp")
        tmp.write_bytes(
            orjson.dumps(
                {
                    "chain": anchor.chain, "through_seq": anchor.through_seq,
                    "through_link": anchor.through_link.hex(), "next_epoch": anchor.next_epoch,
                    "signed_epoch": anchor.signed_epoch, "time": anchor.time,
                    "mac": anchor.mac.hex(),
                }
            )
        )  # fmt: skip
        os.replace(tmp, anchor_path)
        segments = self.segments()
        deleted = 0
        for segment, following in itertools.pairwise(segments):
            if self.first_seq(following) > anchor.through_seq + 1:
                break
            if segment == self._segment:
                break
            segment.unlink()
            deleted += 1
        return deleted

    def anchor(self) -> Anchor | None:
        path = self.directory / "anchor"
        if not path.exists():
            return None
        a = orjson.loads(path.read_bytes())
        return Anchor(
            a["chain"], a["through_seq"], bytes.fromhex(a["through_link"]), a["next_epoch"],
            a["signed_epoch"], a["time"], bytes.fromhex(a["mac"]),
        )  # fmt: skip


# How much of a segment a follower reads at a time: a reader far behind (an index process
# catching up) must not read the whole rest of a segment for each batch it takes from it.
_FOLLOW_CHUNK = 4 * 1024 * 1024


class LogFollower:
    """Reads a log as it grows, from after a seq: each `read()` parses only the bytes added
    since the last one (a reader beside the writer; a frame not yet whole is read later)."""

    def __init__(self, audit_log: AuditLog, after_seq: int) -> None:
        self.log = audit_log
        # The seq the next record read must have: a caller whose position moved (a commit
        # that failed after the read) starts a new follower.
        self.next_seq = after_seq + 1
        self._segment: Path | None = None
        self._offset = 0
        segments = audit_log.segments()
        for i, segment in enumerate(segments):
            if i + 1 < len(segments) and audit_log.first_seq(segments[i + 1]) <= after_seq + 1:
                continue
            self._segment = segment
            break

    def read(self, most: int) -> list[LogEntry]:
        out: list[LogEntry] = []
        while len(out) < most:
            if self._segment is None:
                segments = self.log.segments()
                if not segments:
                    return out
                self._segment = segments[0]
                self._offset = 0
            data = self._read_on(self._segment)
            got = 0
            for item in _frames(data, self._segment):
                if isinstance(item, int):
                    break
                got = item.offset + _HEADER.size + _LINK + len(item.body)
                if item.seq >= self.next_seq:
                    out.append(item)
                    self.next_seq = item.seq + 1
                    if len(out) >= most:
                        break
            self._offset += got
            if len(out) >= most:
                return out
            if got and len(data) >= _FOLLOW_CHUNK:
                continue  # the chunk ended before the segment's whole frames did
            # At the end of this segment's whole frames: on to the next one if there is one
            # (the writer has rotated: nothing more will be added to this one).
            later = [p for p in self.log.segments() if p.name > self._segment.name]
            if not later:
                return out
            self._segment, self._offset = later[0], 0
        return out

    def _read_on(self, segment: Path) -> bytes:
        """A chunk of the segment from where this follower is; at least one whole frame
        where one is there (a record larger than a chunk is read whole)."""
        try:
            with open(segment, "rb") as f:
                f.seek(self._offset)
                data = f.read(_FOLLOW_CHUNK)
                if len(data) >= _FOLLOW_CHUNK:
                    length = _HEADER.unpack_from(data)[0]
                    if _HEADER.size + length > len(data) and length <= _MAX_PAYLOAD:
                        data += f.read(_HEADER.size + length - len(data))
                return data
        except FileNotFoundError:
            return b""
