"""The audit log's fdatasync, done by a process of its own (`disk` durability).

A sync on a thread of the gateway costs the event loop more than the sync itself: the
thread needs the GIL to wake, again when fdatasync returns, and a third time to tell the
loop, and it waits for each while the loop runs (up to the interpreter's switch interval,
5 ms). Measured under pgbench -S -c 8 on `disk`: a pass took 2.4-3.1 ms from request to
release, of which the fdatasync was the lesser part. This child holds no GIL of the
gateway's: the loop hands it the log's file descriptors over a socket pair (SCM_RIGHTS),
it fdatasyncs them in order and answers one datagram; the loop hears the answer as any
other readable socket.

Run as a script (`python -I syncer.py FD LOG_DIR`): only the standard library, nothing of
the gateway's imported; LOG_DIR is not read, it names in `ps` the log the child syncs. The
child runs in a process group of its own and ignores SIGINT: a Ctrl-C reaches the
terminal's foreground group, and the gateway still syncs what it writes while it stops.
It ends when the socket closes: when the gateway closes it or dies.

A pass the child does not answer within `stuck_after` seconds (a child stopped or hung)
fails, and the child is killed: the next pass starts a new one, whose fdatasync covers
everything written (a file's fdatasync flushes what any process wrote to it), records
written during the stall included. While a killed child has not exited (stuck in the
kernel on a hung disk), no other is started and passes fail at once.

Wire format, one SOCK_SEQPACKET datagram each way:

    request: b"s" + one byte per descriptor attached: b"f" fdatasync (a segment), b"d"
             fsync (the log's directory, after a segment was created)
    answer:  b"\\0" all done, or b"\\1" + errno + b":" + strerror of the first that failed
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("pgwarden.audit")

# Descriptors one request may carry (the kernel passes at most 253 in one message).
MAX_FDS = 250
# How long a child killed for not answering is waited for: one stopped or busy in user space
# ends at once; one that has not ended by then is stuck in the kernel (a hung disk).
_REAP_SECONDS = 0.05


def _serve(fd: int) -> None:
    """The child: answer each request until the socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    while True:
        try:
            message, fds, _flags, _address = socket.recv_fds(sock, 1 + MAX_FDS, MAX_FDS)
        except OSError:
            return
        if not message:
            return  # the gateway closed its end (or exited)
        answer = b"\0"
        try:
            for kind, target in zip(message[1:], fds, strict=True):
                if kind == ord("d"):
                    os.fsync(target)
                else:
                    os.fdatasync(target)
        except OSError as exc:
            answer = b"\1" + f"{exc.errno or 0}:{exc.strerror or exc}".encode()
        except ValueError:
            answer = b"\1" + f"{errno.EPROTO}:request names {len(fds)} descriptors".encode()
        finally:
            for target in fds:
                with contextlib.suppress(OSError):
                    os.close(target)
        try:
            sock.send(answer)
        except OSError:
            return


class SyncProcess:
    """The parent's side: `request(files, directory)` hands one pass to the child (one at a
    time: the caller asks again only after `done` was called), `done(error)` is called on
    the event loop once per pass, with an OSError when a sync failed, the child is gone or
    did not answer within `stuck_after` seconds (the pass's records are then not durable;
    a later pass starts a new child)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        done: Callable[[BaseException | None], None],
        directory: Path,
        stuck_after: float = 10.0,
    ) -> None:
        self._loop = loop
        self._done = done
        self._directory = directory
        self._stuck_after = stuck_after
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        # A child killed for not answering that has not exited yet (see _stuck).
        self._killed: subprocess.Popen[bytes] | None = None
        self._waiting = False
        # When the pass in flight was asked for (loop time), and the watchdog that looks at
        # it: one timer per stuck_after at most, not one per pass.
        self._asked_at = 0.0
        self._deadline: asyncio.TimerHandle | None = None
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        """Start the child (OSError when it cannot be: no fork, no executable)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        script, log_dir = str(Path(__file__).resolve()), str(self._directory.resolve())
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", script, str(child.fileno()), log_dir],
                pass_fds=(child.fileno(),),
                # A group of its own: a Ctrl-C to the gateway's (the terminal's foreground
                # group) does not reach it, not even while it starts.
                process_group=0,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        self._sock = parent
        self._loop.add_reader(parent.fileno(), self._answered)

    def request(self, files: list[int], directory: int | None) -> None:
        """fdatasync `files` in order, then fsync `directory` (MAX_FDS in all at most);
        `done` follows."""
        assert not self._waiting, "one pass at a time"
        assert len(files) + (directory is not None) <= MAX_FDS
        self._waiting = True
        kinds = b"f" * len(files) + (b"d" if directory is not None else b"")
        fds = [*files, *([directory] if directory is not None else [])]
        try:
            if self._sock is None:
                self._still_killed()
                self._start()
            assert self._sock is not None
            socket.send_fds(self._sock, [b"s" + kinds], fds)
            self._asked_at = self._loop.time()
            if self._deadline is None:
                self._deadline = self._loop.call_later(self._stuck_after, self._stuck)
        except (OSError, subprocess.SubprocessError) as exc:
            # The child is gone (EPIPE) or cannot be started: this pass fails, the next
            # starts a new one.
            self._lost()
            errno_ = exc.errno if isinstance(exc, OSError) else errno.ECHILD
            self._loop.call_soon(self._finish, OSError(errno_, f"audit sync process: {exc}"))

    def _answered(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            answer = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            answer = b""
        if not answer:
            self._lost()
            if self._waiting:
                self._finish(OSError(errno.EPIPE, "the audit sync process exited"))
            return
        if answer == b"\0":
            self._finish(None)
            return
        code, _, text = answer[1:].decode(errors="replace").partition(":")
        self._finish(OSError(int(code) if code.isdigit() else errno.EIO, text))

    def _finish(self, error: BaseException | None) -> None:
        if not self._waiting:
            return
        self._waiting = False
        self._done(error)

    def _stuck(self) -> None:
        """The pass in flight was not answered in time: the child is killed (waited for
        _REAP_SECONDS at most: one stuck in the kernel exits only when its fdatasync
        returns) and the pass fails; the next pass starts another child."""
        self._deadline = None
        if not self._waiting:
            return
        left = self._asked_at + self._stuck_after - self._loop.time()
        if left > 0:  # a later pass than the one the watchdog was set for
            self._deadline = self._loop.call_later(left, self._stuck)
            return
        self._drop_socket()
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            try:
                # Waited for briefly (on the loop, in this fault only), so that the pass for
                # the records written meanwhile, which follows at once, finds it gone.
                proc.wait(_REAP_SECONDS)
            except subprocess.TimeoutExpired:
                self._killed = proc
            log.error(
                "audit sync process %d did not answer within %gs: killed; a new one starts "
                "at the next pass",
                proc.pid,
                self._stuck_after,
            )
        self._finish(
            OSError(
                errno.ETIMEDOUT,
                f"the audit sync process did not answer within {self._stuck_after:g}s",
            )
        )

    def _still_killed(self) -> None:
        """Raise while a child killed for not answering has not exited (a hung disk): no
        second child joins it; reap it once it has."""
        killed = self._killed
        if killed is None:
            return
        if killed.poll() is None:
            raise OSError(
                errno.EBUSY,
                f"the audit sync process {killed.pid}, killed when stuck, has "
                "not exited (a hung disk?)",
            )
        self._killed = None

    def _lost(self) -> None:
        """The child is gone: forget it (reaped), so that the next pass starts another."""
        pid = self._close()
        if pid is not None:
            log.error("audit sync process %d ended; a new one starts at the next pass", pid)

    def stop(self) -> None:
        """After the last `done`: close the socket (the child exits) and reap it."""
        self._close()

    def _drop_socket(self) -> None:
        """Stop listening on the child's socket and close it (a child still running exits)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    def _close(self) -> int | None:
        """Close the socket (a child still running exits) and reap the child; its pid."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._drop_socket()
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return proc.pid


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
