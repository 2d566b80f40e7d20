"""The audit writer in a process of its own, and the gateway's sink that feeds it.

Sealing a record onto the chain and inserting it into the store cost more CPU than relaying
the statement does. On the gateway's event loop (or a thread of it, which contends for the
GIL) that work serialises with the relay; in a child process it runs on another core. The
gateway encodes each record (the canonical bytes that are signed), sends it over a Unix
socket pair and, for a request record, waits for the child to say it is committed.

The child runs the same AuditWriter and store as everything else. Frames, little-endian:

    gateway -> child   u32 body length, u8 record kind, f64 time, body (canonical record)
    child -> gateway   u8 status, u32 count, u64 first seq   (status 0: committed, 2: ready)
                       status 1 adds u16 length + UTF-8 message: the count were not stored

Records are committed in the order they were sent, so an acknowledgement is about the
oldest unacknowledged records. The child exits once the gateway closes its end (or dies),
after committing what it received. If the child dies, waiting requests fail (the statements
do not run) and it is restarted; statements are refused meanwhile: fail closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import socket
import struct
import sys
from typing import Any, cast

import orjson

from gateway.audit.chain import PendingRecord
from gateway.audit.events import SessionEvent, StatementOutcome, StatementRequest
from gateway.audit.records import (
    RECORD_KINDS,
    canonical,
    outcome_record,
    request_record,
    session_record,
)
from gateway.audit.store import CommitResult
from gateway.audit.writer import (
    BatchClock,
    Waiter,
    durable_or_fail_open,
    expire_waiters,
    fail_waiters,
)
from gateway.logs import configure_logging
from gateway.metrics import Latencies
from gateway.proxy.ports import AuditUnavailable
from gateway.settings import Settings

log = logging.getLogger("pgwarden.audit")

_RECORD = struct.Struct("<IBd")
_ACK = struct.Struct("<BIQ")
_MESSAGE = struct.Struct("<H")
_COMMITTED, _FAILED, _READY = 0, 1, 2
_KIND_CODE: dict[str, int] = {kind: code for code, kind in enumerate(RECORD_KINDS)}
_URGENT = frozenset({"request", "key_rotation"})
# A frame larger than this from the gateway is a bug, not a record: the child stops.
_MAX_RECORD = 64 * 1024 * 1024


# -- the child ------------------------------------------------------------------------------


class _ChildProtocol(asyncio.Protocol):
    """Child side: records in, acknowledgements out."""

    def __init__(self, append: Any, closed: asyncio.Future[None]) -> None:
        self._append = append
        self._closed = closed
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.records = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        header = _RECORD.size
        while end - pos >= header:
            length, code, when = _RECORD.unpack_from(buf, pos)
            if length > _MAX_RECORD or code >= len(RECORD_KINDS):
                self._stop("malformed frame")
                return
            if end - pos - header < length:
                break
            body = bytes(buf[pos + header : pos + header + length])
            pos += header + length
            kind = RECORD_KINDS[code]
            try:
                record = orjson.loads(body)
            except orjson.JSONDecodeError:
                self._stop("a record that is not JSON")
                return
            # Every record sent is acknowledged, in order; one that cannot be queued would
            # break that order, so the stream stops instead (the gateway fails what it sent).
            if not self._append(PendingRecord(kind, when, record, body), urgent=kind in _URGENT):
                self._stop("the writer is closed")
                return
            self.records += 1
        del buf[:pos]

    def _stop(self, why: str) -> None:
        log.error("audit process: %s from the gateway; stopping", why)
        self._buf.clear()
        if self.transport is not None:
            self.transport.close()

    def committed(self, count: int, result: CommitResult) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if isinstance(result, BaseException):
            message = str(result).encode()[:4000]
            frame = _ACK.pack(_FAILED, count, 0) + _MESSAGE.pack(len(message)) + message
        else:
            frame = _ACK.pack(_COMMITTED, count, result[0].seq)
        self.transport.write(frame)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


async def _serve(settings: Settings, fd: int) -> None:
    from gateway.audit import audit_store, audit_writer

    # This process has nothing to do while a commit runs: the store works inline.
    writer = audit_writer(settings, audit_store(settings, inline=True))
    await writer.start()
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()
    sock = socket.socket(fileno=fd)
    transport, protocol = await loop.connect_accepted_socket(
        lambda: _ChildProtocol(writer.append, closed), sock
    )
    writer.on_commit = protocol.committed
    transport.write(_ACK.pack(_READY, 0, 0))
    await closed
    # The gateway is gone (closed or killed): commit what it sent, then exit.
    await writer.close()
    log.info(
        "audit process: %d records in %d commits",
        protocol.records,
        writer.store.commits,
        extra={"event": "audit_writer_stopped"},
    )


def main() -> None:
    """`python -m gateway.audit FD STATE_DIR`, settings as JSON on stdin (started by
    AuditProcess, never by hand)."""
    # The child ends when the gateway closes its end of the socket (or dies), after
    # committing what it was sent: a Ctrl-C or SIGTERM to the process group must not cut
    # it short while the gateway still writes its sessions' last records.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = Settings.model_validate_json(sys.stdin.buffer.read())
    # The gateway's format: its stderr is this process's.
    configure_logging(settings.log)
    fd = int(sys.argv[1])
    try:
        import uvloop

        uvloop.run(_serve(settings, fd))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve(settings, fd))


# -- the gateway's side ----------------------------------------------------------------------


class _GatewayProtocol(asyncio.Protocol):
    def __init__(self, owner: AuditProcess) -> None:
        self._owner = owner
        self._buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        owner = self._owner
        while end - pos >= _ACK.size:
            status, count, seq = _ACK.unpack_from(buf, pos)
            if status == _FAILED:
                if end - pos < _ACK.size + _MESSAGE.size:
                    break
                (length,) = _MESSAGE.unpack_from(buf, pos + _ACK.size)
                start = pos + _ACK.size + _MESSAGE.size
                if end - start < length:
                    break
                if count > owner.unacknowledged:
                    log.error("audit process answered out of step; restarting it")
                    self._buf.clear()
                    owner.abandon()
                    return
                owner.failed(count, bytes(buf[start : start + length]).decode("utf-8", "replace"))
                pos = start + length
                continue
            pos += _ACK.size
            if status == _READY:
                owner.ready()
            elif status == _COMMITTED and count <= owner.unacknowledged:
                owner.committed(count, seq)
            else:
                # Out of step with what was sent: nothing it says can be trusted any more.
                log.error("audit process answered out of step; restarting it")
                self._buf.clear()
                owner.abandon()
                return
        del buf[:pos]

    def connection_lost(self, exc: BaseException | None) -> None:
        self._owner.lost(self)


class AuditProcess:
    """The gateway's AuditSink: records go to the audit writer's own process.

    `request()` returns the record's id once the child has committed it and raises
    AuditUnavailable if the child fails to, dies, or does not answer within the audit
    timeout. Everything queued in one pass of the event loop leaves in one write.
    """

    def __init__(self, settings: Settings, *, restart_delay: float = 0.5) -> None:
        self.settings = settings
        self.chain = settings.instance
        self.timeout = settings.audit.timeout_seconds
        self.fail_open = settings.audit.fail_open
        self.rows_limit = settings.audit.record_rows_limit
        self.bytes_limit = settings.audit.record_bytes_limit
        self.restart_delay = restart_delay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._transport: asyncio.Transport | None = None
        self._up: asyncio.Future[None] | None = None
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._out: list[bytes] = []
        self._clock = BatchClock(self._flush)
        # Sent, not yet acknowledged, oldest first.
        self._unacked: collections.deque[Waiter] = collections.deque()
        self._sent = 0
        self._acked = 0
        # (records sent through, timer that fails the waiters of one write)
        self._timers: collections.deque[tuple[int, asyncio.TimerHandle]] = collections.deque()
        self._batch: list[Waiter] = []
        self._drained: asyncio.Event | None = None
        self._protocol: _GatewayProtocol | None = None
        # For the admin listener: the last committed record's seq, the child's restarts,
        # and the time from a write to the child until its commit is acknowledged.
        self.position: int | None = None
        self.restarts = 0
        self.commit_seconds = Latencies()
        # Records are indexed as they are committed (the store is the log).
        self.index_lag = 0
        # (records sent through, loop time of the write), oldest first.
        self._writes: collections.deque[tuple[int, float]] = collections.deque()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="audit-process")

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.audit",
                str(theirs.fileno()),
                # Not read by the child: names, in `ps`, the gateway it belongs to.
                str(self.settings.state_dir.resolve()),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        assert self._proc.stdin is not None
        self._proc.stdin.write(self.settings.model_dump_json().encode())
        self._proc.stdin.close()
        self._up = loop.create_future()
        transport, protocol = await loop.create_connection(
            lambda: _GatewayProtocol(self), sock=mine
        )
        self._transport = transport
        self._protocol = protocol
        try:
            await asyncio.wait_for(asyncio.shield(self._up), 60)
        except TimeoutError:
            log.error("audit process did not start within 60s")

    async def _supervise(self) -> None:
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                return
            log.error(
                "audit writer down: process exited with %s; restarting it",
                code,
                extra={"event": "audit_writer_down", "restarts": self.restarts},
            )
            self.lost(self._protocol)
            await asyncio.sleep(self.restart_delay)
            if self._stopping:
                return
            self.restarts += 1
            try:
                await self._spawn()
            except OSError as exc:
                log.error("audit process could not be started: %s", exc)
                continue
            if self.accepting:
                log.info(
                    "audit writer up (restart %d)",
                    self.restarts,
                    extra={"event": "audit_writer_up", "restarts": self.restarts},
                )

    async def close(self) -> None:
        """Send what is queued, wait for it to be committed, and stop the child."""
        self._stopping = True
        self._flush()
        if self._drained is not None and self._unacked:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.timeout + 1)
        if self._transport is not None:
            self._transport.close()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), self.timeout + 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self.lost(self._protocol)

    @property
    def pid(self) -> int | None:
        """The writer process's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def accepting(self) -> bool:
        """The child is up and takes records (what request() checks first)."""
        return self._transport is not None and self._up is not None and self._up.done()

    # -- AuditSink --------------------------------------------------------------------------

    async def request(self, record: StatementRequest) -> str:
        return await durable_or_fail_open(
            self._committed_request(record), fail_open=self.fail_open, text=record.text
        )

    async def _committed_request(self, record: StatementRequest) -> str:
        if self._transport is None or self._up is None or not self._up.done():
            raise AuditUnavailable("audit writer process is not running")
        assert self._loop is not None
        waiter: asyncio.Future[str] = self._loop.create_future()
        self._send("request", record.time, canonical(request_record(record)), waiter)
        return await waiter

    async def outcome(self, record: StatementOutcome) -> None:
        self.outcome_nowait(record)

    def outcome_nowait(self, record: StatementOutcome) -> None:
        body = outcome_record(record, self.rows_limit, self.bytes_limit)
        self._send_logged("outcome", record.time, canonical(body))

    async def session(self, event: SessionEvent) -> None:
        self._send_logged(event.kind, event.time, canonical(session_record(event)))

    # -- sending ------------------------------------------------------------------------------

    def _send_logged(self, kind: str, when: float, body: bytes) -> None:
        if self._transport is None or self._up is None or not self._up.done():
            log.error("audit %s record lost: audit writer process is not running", kind)
            return
        self._send(kind, when, body, None)

    def _send(self, kind: str, when: float, body: bytes, waiter: Waiter) -> None:
        self._out.append(_RECORD.pack(len(body), _KIND_CODE[kind], when))
        self._out.append(body)
        self._unacked.append(waiter)
        self._batch.append(waiter)
        assert self._loop is not None
        if waiter is not None:
            # A statement waits: everything queued in this pass of the loop leaves now.
            self._clock.soon(self._loop)
        else:
            # Nobody waits on an outcome or session record: it rides with the next request
            # (one write, one commit) or leaves after the clock's linger.
            self._clock.later(self._loop)

    def _flush(self) -> None:
        self._clock.fired()
        if not self._out:
            return
        assert self._transport is not None and self._loop is not None
        self._transport.write(b"".join(self._out))
        self._out.clear()
        self._sent += len(self._batch)
        self._writes.append((self._sent, self._loop.time()))
        if any(w is not None for w in self._batch):
            timer = self._loop.call_later(self.timeout, expire_waiters, self._batch, self.timeout)
            self._timers.append((self._sent, timer))
        self._batch = []

    # -- acknowledgements ---------------------------------------------------------------

    @property
    def unacknowledged(self) -> int:
        return len(self._unacked)

    def abandon(self) -> None:
        """Give up on the current child: its records fail, it is killed and restarted."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
        if self._transport is not None:
            self._transport.close()
        self.lost(self._protocol)

    def ready(self) -> None:
        if self._up is not None and not self._up.done():
            self._up.set_result(None)

    def committed(self, count: int, first_seq: int) -> None:
        unacked = self._unacked
        chain = self.chain
        for i in range(count):
            w = unacked.popleft()
            if w is not None and not w.done():
                w.set_result(f"{chain}:{first_seq + i}")
        if count:
            self.position = first_seq + count - 1
        self._advance(count)

    def failed(self, count: int, message: str) -> None:
        failed = [self._unacked.popleft() for _ in range(count)]
        fail_waiters(failed, AuditUnavailable(f"audit store failed: {message}"), message)
        self._advance(count)

    def _advance(self, count: int) -> None:
        self._acked += count
        writes = self._writes
        if writes and writes[0][0] <= self._acked:
            assert self._loop is not None
            now = self._loop.time()
            while writes and writes[0][0] <= self._acked:
                self.commit_seconds.observe(now - writes.popleft()[1])
        timers = self._timers
        while timers and timers[0][0] <= self._acked:
            timers.popleft()[1].cancel()
        if not self._unacked and self._drained is not None:
            self._drained.set()

    def lost(self, protocol: _GatewayProtocol | None) -> None:
        """The child is gone: what it had not acknowledged fails; nothing more is sent."""
        if protocol is not self._protocol:
            return  # an earlier child's connection, already accounted for
        self._protocol = None
        self._transport = None
        self._out.clear()
        self._batch = []
        if self._up is not None and not self._up.done():
            self._up.set_result(None)
        self._up = None
        unacked, self._unacked = self._unacked, collections.deque()
        why = "audit writer process exited"
        fail_waiters(unacked, AuditUnavailable(why), why)
        for _, timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._writes.clear()
        self._sent = self._acked = 0
        if self._drained is not None:
            self._drained.set()
