"""The audit writer in a process of its own, and the gateway's sink that feeds it.

Sealing a record onto the chain and inserting it into the store cost more CPU than relaying
the statement does. On the gateway's event loop (or a thread of it, which contends for the
GIL) that work serialises with the relay; in a child process it runs on another core. The
gateway encodes each record (the canonical bytes that are signed), sends it over a Unix
socket pair and, for a request record, waits for the child to say it is committed.

The child runs the same AuditWriter and store as everything else. Frames, little-endian:

    gateway -> child   u32 body length, u8 record kind, f64 time, body (canonical record)
                       (kind | 0x80: sent before, its commit unacknowledged)
    child -> gateway   u8 status, u32 count, u64 first seq   (status 0: committed, 2: ready,
                       4: sent again and already stored, not stored twice)
                       status 1 adds u16 length + UTF-8 message: the count were not stored
                       status 3 (instead of ready) adds the same: the store is refused

Records are committed in the order they were sent, so an acknowledgement is about the
oldest unacknowledged records. The child exits once the gateway closes its end (or dies),
after committing what it received. If the child dies, waiting requests fail (the statements
do not run) and it is restarted; statements are refused meanwhile: fail closed. Outcome and
session records it had not acknowledged are kept by the gateway and sent to the next child,
marked: it may have died between their commit and its acknowledgement, and the store
leaves out what it already holds.
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
from collections.abc import Iterable
from functools import partial
from typing import Any, cast

import orjson

from gateway.audit.chain import PendingRecord
from gateway.audit.events import (
    ApprovalEvent,
    SessionEvent,
    StatementOutcome,
    StatementRequest,
)
from gateway.audit.records import (
    RECORD_KINDS,
    approval_record,
    canonical,
    outcome_record,
    request_bytes,
    session_record,
)
from gateway.audit.writer import (
    BatchClock,
    ChainGap,
    Placed,
    Spool,
    Waiter,
    durable_or_fail_open,
    expire_waiters,
    resendable,
)
from gateway.logs import configure_logging
from gateway.metrics import Latencies
from gateway.proxy.ports import AuditUnavailable
from gateway.settings import Settings

log = logging.getLogger("pgwarden.audit")

_RECORD = struct.Struct("<IBd")
_ACK = struct.Struct("<BIQ")
_MESSAGE = struct.Struct("<H")
_COMMITTED, _FAILED, _READY, _REFUSED, _STORED = 0, 1, 2, 3, 4
# Set in a record's kind byte when the gateway sends it again (see the module's doc).
_RESENT = 0x80
_KIND_CODE: dict[str, int] = {kind: code for code, kind in enumerate(RECORD_KINDS)}
_URGENT = frozenset({"request", "key_rotation"})
# A child that served this long before it failed was healthy: backing off starts again.
_HEALTHY_FOR = 5.0
# How long, once a child has exited, the gateway reads what its socket still holds.
_LAST_WORDS = 0.5
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
            resent = bool(code & _RESENT)
            code &= ~_RESENT
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
            pending = PendingRecord(kind, when, record, body)
            urgent = kind in _URGENT
            if not urgent:  # nobody waits on it: the gateway may send it again
                pending = resendable(pending, resent)
            # Every record sent is acknowledged, in order; one that cannot be queued would
            # break that order, so the stream stops instead (the gateway fails what it sent).
            if not self._append(pending, urgent=urgent):
                self._stop("the writer is closed")
                return
            self.records += 1
        del buf[:pos]

    def _stop(self, why: str) -> None:
        log.error("audit process: %s from the gateway; stopping", why)
        self._buf.clear()
        if self.transport is not None:
            self.transport.close()

    def committed(self, count: int, result: Placed | BaseException) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if isinstance(result, BaseException):
            message = str(result).encode()[:4000]
            frame = _ACK.pack(_FAILED, count, 0) + _MESSAGE.pack(len(message)) + message
        else:
            frame = b"".join(_acknowledgements(result))
        self.transport.write(frame)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


def _acknowledgements(placed: Placed) -> list[bytes]:
    """One frame per run: records stored from a seq on (seqs follow each other within a
    commit), or records already stored (sent again)."""
    frames: list[bytes] = []
    i = 0
    while i < len(placed):
        first = placed[i]
        j = i + 1
        while j < len(placed) and (placed[j] is None) == (first is None):
            j += 1
        if first is None:
            frames.append(_ACK.pack(_STORED, j - i, 0))
        else:
            frames.append(_ACK.pack(_COMMITTED, j - i, first.seq))
        i = j
    return frames


async def _serve(settings: Settings, fd: int) -> int:
    from gateway.audit import audit_store, audit_writer

    # This process has nothing to do while a commit runs: the store works inline.
    writer = audit_writer(settings, audit_store(settings, inline=True))
    try:
        await writer.start()
    except ChainGap as exc:
        # Told to the gateway in place of "ready": it must not run on this store.
        log.error("audit process: %s", exc)
        message = str(exc).encode()[:4000]
        with socket.socket(fileno=fd) as sock:
            sock.sendall(_ACK.pack(_REFUSED, 0, 0) + _MESSAGE.pack(len(message)) + message)
        await writer.store.close()
        return 3
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
    return 0


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

        code = uvloop.run(_serve(settings, fd))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        code = asyncio.run(_serve(settings, fd))
    sys.exit(code)


# -- the gateway's side ----------------------------------------------------------------------


class AuditStartRefused(RuntimeError):
    """The audit writer will not start on this store (it is behind its head witness): the
    gateway must not start either. The message says why and what the operator can do."""


class _ChildGone(Exception):
    """One child failed before or while serving (spawn, settings, handshake, exit)."""


class _GatewayProtocol(asyncio.Protocol):
    def __init__(self, owner: AuditProcess) -> None:
        self._owner = owner
        self._buf = bytearray()
        # Set once its child is accounted for as gone: what is still read from its socket
        # (acknowledgements written just before it exited) must not be credited to the
        # records of the child that replaces it.
        self.retired = False
        # Done when the socket has ended (everything the child wrote has been read).
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if self.retired:
            return
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        owner = self._owner
        while end - pos >= _ACK.size:
            status, count, seq = _ACK.unpack_from(buf, pos)
            if status in (_FAILED, _REFUSED):
                if end - pos < _ACK.size + _MESSAGE.size:
                    break
                (length,) = _MESSAGE.unpack_from(buf, pos + _ACK.size)
                start = pos + _ACK.size + _MESSAGE.size
                if end - start < length:
                    break
                message = bytes(buf[start : start + length]).decode("utf-8", "replace")
                pos = start + length
                if status == _REFUSED:
                    owner.refused(message)
                    continue
                if count > owner.unacknowledged:
                    log.error("audit process answered out of step; restarting it")
                    self._buf.clear()
                    owner.abandon()
                    return
                owner.failed(count, message)
                continue
            pos += _ACK.size
            if status == _READY:
                owner.child_ready()
            elif status == _COMMITTED and count <= owner.unacknowledged:
                owner.committed(count, seq)
            elif status == _STORED and count <= owner.unacknowledged:
                owner.stored_before(count)
            else:
                # Out of step with what was sent: nothing it says can be trusted any more.
                log.error("audit process answered out of step; restarting it")
                self._buf.clear()
                owner.abandon()
                return
        del buf[:pos]

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)
        self._owner.lost(self)


# One record sent and not yet acknowledged: who waits on it (None: nobody, an outcome or a
# session event) and its frame header and body, kept so that such a record can be spooled.
_Sent = tuple[Waiter, bytes, bytes]


class AuditProcess:
    """The gateway's AuditSink: records go to the audit writer's own process.

    `request()` returns the record's id once the child has committed it and raises
    AuditUnavailable if the child fails to, dies, or does not answer within the audit
    timeout. Everything queued in one pass of the event loop leaves in one write.

    A supervisor task keeps one child running: whatever fails (spawn, settings, handshake,
    the child's exit at any moment) it logs, backs off (`restart_delay` doubling up to
    `max_restart_delay`) and starts another, until close(). Outcome and session records
    nobody waits on are never dropped for a failing store or a dead child: they wait in a
    spool (in this process, so it outlives any child) and are sent again until a commit
    takes them; only what overflows `spool_limit` is lost, and counted in `records_lost`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        restart_delay: float = 0.1,
        max_restart_delay: float = 2.0,
        start_timeout: float = 60.0,
        spool_limit: int = 100_000,
        spool_retry: float = 0.5,
    ) -> None:
        self.settings = settings
        self.chain = settings.instance
        self.timeout = settings.audit.timeout_seconds
        self.fail_open = settings.audit.fail_open
        self.rows_limit = settings.audit.record_rows_limit
        self.bytes_limit = settings.audit.record_bytes_limit
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.start_timeout = start_timeout
        self.spool_retry = spool_retry
        # What the supervisor is doing: starting, ready, restarting, refused, stopped.
        self.state = "starting"
        self.restarts = 0
        self.last_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._transport: asyncio.Transport | None = None
        self._protocol: _GatewayProtocol | None = None
        # The current child's handshake: done when it is ready, failed when it refused.
        self._up: asyncio.Future[None] | None = None
        self._ready = False
        self._first: asyncio.Future[None] | None = None
        # When the current child answered its handshake (loop time), if it did.
        self._ready_at: float | None = None
        # What children are started with: the operator's consent to bridge a gap in the
        # chain (audit.accept_chain_gap) holds until a first commit, then no longer.
        self._child_settings = settings
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._out: list[bytes] = []
        self._clock = BatchClock(self._flush)
        # Sent, not yet acknowledged, oldest first.
        self._unacked: collections.deque[_Sent] = collections.deque()
        self._sent = 0
        self._acked = 0
        # (records sent through, timer that fails the waiters of one write)
        self._timers: collections.deque[tuple[int, asyncio.TimerHandle]] = collections.deque()
        self._batch: list[Waiter] = []
        self._drained: asyncio.Event | None = None
        # (frame header, body) of records nobody waits on that no child has committed.
        self.spool: Spool[tuple[bytes, bytes]] = Spool(spool_limit)
        self._spool_timer: asyncio.TimerHandle | None = None
        # For the admin listener: the last committed record's seq and the time from a write
        # to the child until its commit is acknowledged (`restarts` is the supervisor's).
        self.position: int | None = None
        self.commit_seconds = Latencies()
        # Records are indexed as they are committed (the store is the log).
        self.index_lag = 0
        # (records sent through, loop time of the write), oldest first.
        self._writes: collections.deque[tuple[int, float]] = collections.deque()

    # -- state ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether a child is up and takes records (readiness of the audit path)."""
        return self._ready

    @property
    def accepting(self) -> bool:
        """The admin listener's name for `ready` (readiness, pgwarden_audit_writer_up)."""
        return self._ready

    @property
    def pid(self) -> int | None:
        """The writer process's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def spooled(self) -> int:
        """Outcome and session records waiting for the store."""
        return len(self.spool)

    @property
    def records_lost(self) -> int:
        """Outcome and session records that could not be kept (spool full, shutdown)."""
        return self.spool.lost

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the supervisor and wait for its first child: ready, or failed (the
        supervisor goes on trying; statements are refused meanwhile). A child that refuses
        the store (AuditStartRefused) stops the start: the gateway must not run on it."""
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._first = self._loop.create_future()
        self._supervisor = asyncio.create_task(self._supervise(), name="audit-process")
        try:
            await asyncio.shield(self._first)
        except AuditStartRefused:
            await self.close()
            raise

    async def _supervise(self) -> None:
        delay = self.restart_delay
        while not self._stopping:
            self._ready_at = None
            try:
                await self._run_child(self._child_settings)
            except AuditStartRefused as exc:
                self.last_error = str(exc)
                log.error("audit process refused the store: %s", exc)
                if self.restarts == 0:
                    # At start: the gateway does not start (start() raises it).
                    self.state = "refused"
                    self._first_done(exc)
                    return
                # While running (the store was wiped under it): refused, and tried again.
            except _ChildGone as exc:
                self.last_error = str(exc)
                self._first_done(None)
                if not self._stopping:
                    log.error("audit process: %s", exc)
            except Exception as exc:  # the supervisor must outlive any one child
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._first_done(None)
                log.exception("audit process failed")
            if self._stopping:
                return
            if self._ready_at is not None:
                assert self._loop is not None
                if self._loop.time() - self._ready_at > _HEALTHY_FOR:
                    # It served a while: this failure starts a new series of attempts.
                    delay = self.restart_delay
            self.state = "restarting"
            self.restarts += 1
            log.error(
                "audit process: restart %d in %.1fs (statements are refused meanwhile)",
                self.restarts,
                delay,
                extra={
                    "event": "audit_writer_down",
                    "restarts": self.restarts,
                    "error": self.last_error,
                },
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_restart_delay)

    def _first_done(self, failure: BaseException | None) -> None:
        first = self._first
        if first is not None and not first.done():
            if failure is None:
                first.set_result(None)
            else:
                first.set_exception(failure)

    async def _run_child(self, settings: Settings) -> None:
        """Start one child, hand it its settings, wait for its handshake and serve until it
        exits (`_ready_at` says when it became ready); raises why it failed or ended."""
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
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
        except BaseException as exc:
            mine.close()
            if isinstance(exc, OSError):
                raise _ChildGone(f"could not be started: {exc}") from exc
            raise
        self._proc = proc
        protocol: _GatewayProtocol | None = None
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(settings.model_dump_json().encode())
                await proc.stdin.drain()
                proc.stdin.close()
            except (ConnectionError, OSError, RuntimeError) as exc:
                # RuntimeError: uvloop's pipe is already closed (the child is gone).
                mine.close()
                raise _ChildGone(f"exited before reading its settings: {exc}") from exc
            self._up = up = loop.create_future()
            transport, protocol = await loop.create_connection(
                lambda: _GatewayProtocol(self), sock=mine
            )
            self._transport, self._protocol = transport, protocol
            exited = asyncio.ensure_future(proc.wait())
            try:
                await asyncio.wait(
                    (up, exited), timeout=self.start_timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not up.done():
                    if exited.done():
                        raise _ChildGone(f"exited with {proc.returncode} before it was ready")
                    raise _ChildGone(f"did not start within {self.start_timeout:g}s")
                up.result()  # AuditStartRefused
                self._ready_at = loop.time()
                self._first_done(None)
                if self.restarts:
                    log.info(
                        "audit writer up (restart %d)",
                        self.restarts,
                        extra={"event": "audit_writer_up", "restarts": self.restarts},
                    )
                code = await exited
                # Its exit may be seen before the acknowledgements it wrote just before: read
                # the socket to its end first, so that what it committed is not taken for
                # lost (a request refused, an outcome sent again).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(protocol.ended), _LAST_WORDS)
            finally:
                exited.cancel()
            if not self._stopping:
                raise _ChildGone(f"exited with {code}")
        finally:
            self.lost(protocol)
            if proc.returncode is None and not self._stopping:
                proc.kill()
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()

    async def close(self) -> None:
        """Send what is queued (and spooled), wait for it to be committed, stop the child."""
        self._stopping = True
        if self._ready:
            self._resend_spool(None)  # one last try for all of it
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
            self._supervisor = None
        self.lost(self._protocol)
        if self._spool_timer is not None:
            self._spool_timer.cancel()
            self._spool_timer = None
        if self.spool:
            self.spool.drop(len(self.spool.take()), "the store did not take them by shutdown")
        self._first_done(None)
        self.state = "stopped"

    # -- AuditSink --------------------------------------------------------------------------

    async def request(self, record: StatementRequest) -> str:
        return await self.request_soon(record)

    def request_soon(self, record: StatementRequest) -> asyncio.Future[str]:
        return durable_or_fail_open(
            partial(self._committed_request, record), fail_open=self.fail_open, text=record.text
        )

    def _committed_request(self, record: StatementRequest) -> asyncio.Future[str]:
        if not self._ready:
            raise AuditUnavailable("audit writer process is not running")
        assert self._loop is not None
        waiter: asyncio.Future[str] = self._loop.create_future()
        body = request_bytes(record)
        self._send(_RECORD.pack(len(body), _KIND_CODE["request"], record.time), body, waiter)
        return waiter

    async def outcome(self, record: StatementOutcome) -> None:
        self.outcome_nowait(record)

    def outcome_nowait(self, record: StatementOutcome) -> None:
        body = outcome_record(record, self.rows_limit, self.bytes_limit)
        self._send_kept("outcome", record.time, canonical(body))

    async def session(self, event: SessionEvent) -> None:
        self._send_kept(event.kind, event.time, canonical(session_record(event)))

    async def approval(self, event: ApprovalEvent) -> None:
        self._send_kept("approval", event.time, canonical(approval_record(event)))

    # -- sending ------------------------------------------------------------------------------

    def _send_kept(self, kind: str, when: float, body: bytes) -> None:
        """A record nobody waits on: sent now, or spooled until a child can take it."""
        header = _RECORD.pack(len(body), _KIND_CODE[kind], when)
        if self._ready:
            self._send(header, body, None)
        else:
            self._keep([(header, body)])

    def _send(self, header: bytes, body: bytes, waiter: Waiter) -> None:
        self._out.append(header)
        self._out.append(body)
        self._unacked.append((waiter, header, body))
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
        transport = self._transport
        if transport is None or transport.is_closing() or self._loop is None:
            return  # the child is going: lost() settles what was queued
        transport.write(b"".join(self._out))
        self._out.clear()
        self._sent += len(self._batch)
        self._writes.append((self._sent, self._loop.time()))
        if any(w is not None for w in self._batch):
            timer = self._loop.call_later(self.timeout, expire_waiters, self._batch, self.timeout)
            self._timers.append((self._sent, timer))
        self._batch = []

    # -- the spool ----------------------------------------------------------------------------

    def _keep(self, frames: list[tuple[bytes, bytes]]) -> None:
        self.spool.keep(frames)
        if self.spool and self._ready:
            self._retry_later()

    def _retry_later(self) -> None:
        if self._spool_timer is None and self._loop is not None and not self._stopping:
            self._spool_timer = self._loop.call_later(self.spool_retry, self._resend_spool)

    def _resend_spool(self, most: int | None = Spool.chunk) -> None:
        """Send the spooled records again, oldest first (the store may take them now)."""
        self._spool_timer = None
        if not self._ready:
            return
        for header, body in self.spool.take(most):
            # Sent before and not acknowledged, or never sent: it may be stored already.
            marked = bytearray(header)
            marked[4] |= _RESENT
            self._send(bytes(marked), body, None)

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

    def child_ready(self) -> None:
        up = self._up
        if up is not None and not up.done():
            up.set_result(None)
            self._ready = True
            self.state = "ready"
            if self.spool:
                self._resend_spool()

    def refused(self, message: str) -> None:
        up = self._up
        if up is not None and not up.done():
            up.set_exception(AuditStartRefused(message))

    def committed(self, count: int, first_seq: int) -> None:
        if self._child_settings.audit.accept_chain_gap:
            self._child_settings = _without_gap_consent(self._child_settings)
        unacked = self._unacked
        chain = self.chain
        for i in range(count):
            w = unacked.popleft()[0]
            if w is not None and not w.done():
                w.set_result(f"{chain}:{first_seq + i}")
        if count:
            self.position = first_seq + count - 1
        self._advance(count)
        if self.spool and self._spool_timer is None:
            self._resend_spool()  # the store takes records again: the next chunk

    def stored_before(self, count: int) -> None:
        """Records sent again that the store already held: done, not stored twice."""
        stored = [self._unacked.popleft() for _ in range(count)]
        # Never a request: a record someone waits on is not sent again.
        self._settle_failed(
            ((w, h, b) for w, h, b in stored if w is not None),
            AuditUnavailable("audit record was already stored"),
        )
        self._advance(count)
        if self.spool and self._spool_timer is None:
            self._resend_spool()

    def failed(self, count: int, message: str) -> None:
        failed = [self._unacked.popleft() for _ in range(count)]
        self._settle_failed(failed, AuditUnavailable(f"audit store failed: {message}"))
        self._advance(count)

    def _settle_failed(self, failed: Iterable[_Sent], failure: AuditUnavailable) -> None:
        """Requests fail (their statements do not run); the rest go to the spool."""
        kept: list[tuple[bytes, bytes]] = []
        for waiter, header, body in failed:
            if waiter is None:
                kept.append((header, body))
            elif not waiter.done():
                waiter.set_exception(failure)
        if kept:
            self._keep(kept)

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
        """The child is gone: its unacknowledged requests fail, its other records are
        spooled for the next child; nothing more is sent to it."""
        if protocol is None or protocol is not self._protocol:
            return  # an earlier child's connection, already accounted for
        protocol.retired = True
        if self._transport is not None:
            self._transport.close()  # what it still holds is not read: settled below
        self._protocol = None
        self._transport = None
        self._ready = False
        if self.state == "ready":
            self.state = "restarting"
        self._out.clear()
        self._batch = []
        up = self._up
        if up is not None and not up.done():
            up.set_exception(_ChildGone("closed its socket before it was ready"))
            up.exception()  # retrieved: nobody may be waiting on it any more
        self._up = None
        unacked, self._unacked = self._unacked, collections.deque()
        self._settle_failed(unacked, AuditUnavailable("audit writer process exited"))
        for _, timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._writes.clear()
        self._sent = self._acked = 0
        if self._drained is not None:
            self._drained.set()


def _without_gap_consent(settings: Settings) -> Settings:
    if not settings.audit.accept_chain_gap:
        return settings
    return settings.model_copy(
        update={"audit": settings.audit.model_copy(update={"accept_chain_gap": False})}
    )
