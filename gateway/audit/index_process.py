"""The audit index fed from the log in a process of its own, and the gateway's supervisor.

Inserting records into SQLite costs the gateway's process far more CPU than writing them to
the log (measured with bench/audit_throughput.py: about 25 µs a record more with `os`, more
with `disk`, where the index thread contends with the sync thread for the GIL). The child
follows the log file by itself (polling its size), so the gateway only starts it: no record
crosses a socket. It prints `indexed <seq>` after each batch (the gateway's `index_lag`),
exits once the gateway is gone (after indexing what the log holds) and is restarted by the
gateway if it dies. Statements never wait on it.

    python -m gateway.audit index STATE_DIR      (settings as JSON on stdin)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from gateway.audit.chain import ChainTail, SealedRecord
from gateway.audit.log import AuditLog, LogFollower
from gateway.audit.store import AuditStore, AuditStoreError
from gateway.logs import configure_logging
from gateway.settings import Settings

log = logging.getLogger("pgwarden.audit")

_POLL = 0.02


class _Follow:
    """The child's seal: the next records of the log after the store's tail."""

    def __init__(self, audit_log: AuditLog, most: int = 5000) -> None:
        self.log = audit_log
        self.most = most
        self._follower: LogFollower | None = None

    def __call__(
        self, tail: ChainTail, _stored: frozenset[bytes] = frozenset()
    ) -> tuple[list[SealedRecord], ChainTail]:
        follower = self._follower
        if follower is None or follower.next_seq != tail.seq + 1:
            follower = self._follower = self.log.follow(tail.seq)
        batch = [e.sealed() for e in follower.read(self.most)]
        if not batch:
            return batch, tail
        last = batch[-1]
        return batch, ChainTail.after(last.seq, last.link, last.epoch, last.kind)


async def _index_until_orphaned(settings: Settings) -> int:
    from gateway.audit import audit_log, audit_store

    parent = os.getppid()
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    store: AuditStore = audit_store(settings, inline=True, synchronous="normal")
    follow = _Follow(audit_log(settings))
    chain = settings.instance
    failing = False
    while True:
        # Gone (even by kill -9: re-parented) or asked to stop: one last pass, then exit.
        last_pass = stopping or os.getppid() != parent
        try:
            while True:
                batch = await store.append(chain, follow)
                if not batch:
                    break
                sys.stdout.write(f"indexed {batch[-1].seq}\n")
                sys.stdout.flush()
            if failing:
                log.warning(
                    "audit index: the store takes records again",
                    extra={"event": "audit_store_up"},
                )
            failing = False
        except AuditStoreError as exc:
            if not failing:
                log.warning(
                    "audit index: store failed (records wait in the log): %s",
                    exc,
                    extra={"event": "audit_store_down"},
                )
            failing = True
        except BrokenPipeError:
            last_pass = True
        if last_pass:
            await store.close()
            return 0
        await asyncio.sleep(0.5 if failing else _POLL)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Until the loop's handler is in place, a stop request must not kill the child
    # half-way through a batch (SQLite would roll it back, but the work is lost).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = Settings.model_validate_json(sys.stdin.buffer.read())
    # The gateway's format: its stderr is this process's.
    configure_logging(settings.log)
    sys.exit(asyncio.run(_index_until_orphaned(settings)))


class IndexProcess:
    """The gateway's side: keeps one index child running, and knows how far it got."""

    def __init__(self, settings: Settings, *, restart_delay: float = 0.5) -> None:
        self.settings = settings
        self.restart_delay = restart_delay
        self.logged_seq = 0
        self.indexed_seq = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._caught_up = asyncio.Event()

    @property
    def lag(self) -> int:
        return max(self.logged_seq - self.indexed_seq, 0)

    def add(self, sealed: list[SealedRecord]) -> None:
        self.logged_seq = sealed[-1].seq

    def start(self, logged_seq: int) -> None:
        self.logged_seq = logged_seq
        self._task = asyncio.create_task(self._supervise(), name="audit-index-process")

    async def _supervise(self) -> None:
        while not self._stopping:
            try:
                await self._run_child()
            except Exception as exc:  # the supervisor must outlive any one child
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("audit index process failed")
            if self._stopping:
                return
            log.error("audit index process exited; restarting in %.1fs", self.restart_delay)
            await asyncio.sleep(self.restart_delay)

    async def _run_child(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.audit", "index",
            # Not read by the child: names, in `ps`, the gateway it belongs to.
            str(self.settings.state_dir.resolve()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(self.settings.model_dump_json().encode())
            await proc.stdin.drain()
            proc.stdin.close()
            async for line in proc.stdout:
                if line.startswith(b"indexed "):
                    self.indexed_seq = max(self.indexed_seq, int(line.split()[1]))
                    if not self.lag:
                        self._caught_up.set()
            await proc.wait()
        finally:
            if proc.returncode is None and not self._stopping:
                proc.kill()
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()

    async def caught_up(self, within: float) -> bool:
        if self.lag:
            self._caught_up.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._caught_up.wait(), within)
        return not self.lag

    async def close(self, within: float) -> None:
        """Let the child index what the log holds (up to `within` seconds), then stop it."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), within + 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
