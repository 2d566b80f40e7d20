"""Run and supervise a local `opa run --server` on the project's policy, reloading on change."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import shutil
import signal
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol

from gateway.install import tool_candidates
from gateway.policy.bundle import (
    BundleError,
    build_bundle,
    read_manifest,
    source_digest,
    source_stamp,
)
from gateway.policy.transport import OpaTransport, OpaUnreachable
from gateway.settings import Settings

log = logging.getLogger(__name__)

# Unix socket paths longer than this do not fit in sockaddr_un (108 bytes on Linux).
_MAX_SOCKET_PATH = 100


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM OPA when the gateway dies, even by -9."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RevisionListener(Protocol):
    """Who must know when the policy OPA serves changes (the decision cache)."""

    def revision_seen(self, revision: str | None) -> None: ...

    def policy_changing(self) -> None: ...

    def policy_unchanged(self) -> None: ...

    def opa_down(self) -> None: ...


class SidecarError(Exception):
    """OPA could not be started on the policy; the message says why."""


class OpaSidecar:
    """Builds the policy bundle, runs OPA on it, restarts OPA when it dies.

    A watcher rebuilds the bundle when a source file changes (OPA's --watch then reloads
    it) and reports OPA's bundle revision to the listeners about every `poll_seconds`.
    """

    def __init__(
        self,
        *,
        opa_binary: Path,
        rego_dir: Path,
        bundle_dir: Path,
        work_dir: Path,
        poll_seconds: float = 1.0,
        start_timeout: float = 15.0,
        max_backoff: float = 5.0,
        decision_logs: bool = False,
    ) -> None:
        self.opa_binary = opa_binary
        self.rego_dir = rego_dir
        self.bundle_dir = bundle_dir
        self.work_dir = work_dir.resolve()
        self.poll_seconds = poll_seconds
        self.start_timeout = start_timeout
        self.max_backoff = max_backoff
        self.decision_logs = decision_logs
        self.bundle_path = self.work_dir / "policy.tar.gz"
        self.log_path = self.work_dir / "opa.log"
        socket_path = self.work_dir / "opa.sock"
        self._socket_path: Path | None = None
        if len(str(socket_path)) <= _MAX_SOCKET_PATH:
            self._socket_path = socket_path
            self.url = f"unix://{socket_path}"
            self._addr = self.url
        else:
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            self._addr = f"127.0.0.1:{port}"
        self.revision: str | None = None
        self.restarts = 0
        # OPA answered its last health check or revision poll (pgwarden_opa_up).
        self.up = False
        self.last_error: str | None = None
        self._listeners: list[RevisionListener] = []
        self._process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stamp: tuple[tuple[str, int, int], ...] = ()
        self._digest = ""
        self._control = OpaTransport(self.url, decision_path="", timeout_seconds=2.0)
        # The watcher and a reload must not build the bundle at the same time.
        self._reloading = asyncio.Lock()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, poll_seconds: float = 1.0, decision_logs: bool = False
    ) -> OpaSidecar:
        """A sidecar on the settings' rego and bundle dirs, working under the state dir."""
        return cls(
            opa_binary=opa_binary_of(settings),
            rego_dir=settings.policy.rego_dir,
            bundle_dir=settings.policy.bundle_dir,
            work_dir=settings.state_path(Path("opa")),
            poll_seconds=poll_seconds,
            decision_logs=decision_logs,
        )

    def listen(self, listener: RevisionListener) -> None:
        self._listeners.append(listener)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Build the bundle, start OPA and return once it serves the policy."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        try:
            await self._build()
        except BundleError as exc:
            raise SidecarError(f"policy does not build: {exc}") from exc
        await self._spawn()
        if not await self._wait_healthy():
            await self.stop()
            raise SidecarError(f"OPA did not become healthy; see {self.log_path}")
        self._set_up(True)
        await self._poll_revision()
        self._tasks = [
            asyncio.create_task(self._supervise(), name="opa-supervisor"),
            asyncio.create_task(self._watch(), name="opa-policy-watch"),
        ]

    async def stop(self) -> None:
        """Stop watching and supervising, then stop OPA."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._terminate()
        await self._control.aclose()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> OpaSidecar:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _build(self) -> None:
        stamp = source_stamp(self.rego_dir, self.bundle_dir)
        digest = await asyncio.to_thread(source_digest, self.rego_dir, self.bundle_dir)
        base = read_manifest(self.bundle_dir).get("revision")
        # The digest makes an edit visible (and flushes caches) even when nobody bumped the
        # manifest's revision.
        revision = f"{base if isinstance(base, str) and base else 'local'}+{digest[:12]}"
        await asyncio.to_thread(
            build_bundle,
            self.opa_binary,
            self.rego_dir,
            self.bundle_dir,
            self.bundle_path,
            revision=revision,
        )
        self._stamp, self._digest = stamp, digest
        self.last_error = None

    async def _spawn(self) -> None:
        if self._socket_path is not None:
            # A killed OPA leaves its socket file behind, and a new one cannot bind over it.
            self._socket_path.unlink(missing_ok=True)
        if self._log is None:
            self._log = self.log_path.open("ab")
        command = [
            str(self.opa_binary),
            "run",
            "--server",
            "--addr",
            self._addr,
            "--log-level",
            "error",
            "--skip-version-check",
            "--bundle",
            "--watch",
            str(self.bundle_path),
        ]
        if self.decision_logs:
            # OPA then returns a decision_id that matches its own decision log.
            command += ["--set", "decision_logs.console=true"]
        self._process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=_die_with_parent,
            # Out of the terminal's process group: a Ctrl-C meant for `pgwarden serve` would
            # otherwise stop OPA first and the supervisor would restart it during shutdown.
            # It still dies with the gateway (PR_SET_PDEATHSIG) and is stopped by stop().
            start_new_session=True,
        )

    async def _wait_healthy(self) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while loop.time() < deadline:
            if not self.running:
                return False
            if await self._control.healthy(bundles=True):
                return True
            await asyncio.sleep(0.02)
        return False

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=5.0)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def _supervise(self) -> None:
        backoff = 0.1
        while not self._stopping:
            process = self._process
            if process is not None:
                await process.wait()
            if self._stopping:
                return
            self._set_up(
                False,
                f"OPA exited (code {process and process.returncode}); restarting in {backoff:.1f}s",
            )
            self._notify("opa_down")
            await asyncio.sleep(backoff)
            self.restarts += 1
            await self._spawn()
            if await self._wait_healthy():
                backoff = 0.1
                self._set_up(True)
                await self._poll_revision()
            else:
                await self._terminate_quietly()
                backoff = min(backoff * 2, self.max_backoff)

    async def _terminate_quietly(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            await self._terminate()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                async with self._reloading:
                    await self._reload_if_changed()
                await self._poll_revision()
            except Exception:  # the watcher must outlive any one bad poll
                log.exception("policy watch failed")

    async def reload_now(self) -> str:
        """Rebuild the bundle now if its sources changed (a reload asks; the watcher would
        within `poll_seconds`); says what became of the policy."""
        before = self.revision
        async with self._reloading:
            await self._reload_if_changed()
        if self.revision != before:
            return f"revision {before} -> {self.revision}"
        if self.last_error is not None:
            return f"still revision {self.revision}; the sources do not build: {self.last_error}"
        return f"unchanged (revision {self.revision})"

    async def _reload_if_changed(self) -> None:
        stamp = source_stamp(self.rego_dir, self.bundle_dir)
        if stamp == self._stamp:
            return
        digest = await asyncio.to_thread(source_digest, self.rego_dir, self.bundle_dir)
        if digest == self._digest:
            self._stamp = stamp
            return
        self._notify("policy_changing")
        old_revision = self.revision
        try:
            await self._build()
        except BundleError as exc:
            # OPA keeps serving the last good policy; say why the new one was not taken.
            self._stamp = stamp
            self.last_error = str(exc)
            log.error("policy change not loaded: %s", exc, extra={"event": "policy_not_loaded"})
            self._notify("policy_unchanged")
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while loop.time() < deadline:
            await self._poll_revision()
            if self.revision != old_revision:
                return
            await asyncio.sleep(0.02)
        log.error(
            "OPA did not load the rebuilt policy bundle; see %s",
            self.log_path,
            extra={"event": "policy_not_loaded"},
        )
        self._notify("policy_unchanged")

    async def _poll_revision(self) -> None:
        try:
            revision = await self._control.revision()
        except OpaUnreachable as exc:
            self._set_up(False, str(exc))
            # Alive but not answering (hung, overloaded): no decision is reused meanwhile.
            if self._listeners and self.running:
                self._notify("opa_down")
            return
        self._set_up(True)
        self.revision = revision
        for listener in self._listeners:
            listener.revision_seen(revision)

    def _set_up(self, up: bool, why: str = "") -> None:
        """Note whether OPA answers; each change is one log line."""
        if up == self.up:
            return
        self.up = up
        fields = {"event": "opa_up" if up else "opa_down", "restarts": self.restarts}
        if up:
            log.info("OPA up (pid %s)", self.pid, extra=fields)
        else:
            log.error("OPA down: %s", why, extra=fields)

    def _notify(self, event: str) -> None:
        for listener in self._listeners:
            getattr(listener, event)()


def opa_binary_of(settings: Settings) -> Path:
    """The OPA binary: the configured one; else the state directory's bin/opa, PATH, or the
    one next to the installation (never looked up in the current directory)."""
    configured = settings.policy.opa_binary
    if configured is not None:
        if not configured.is_file():
            raise SidecarError(
                f"OPA binary not found: policy.opa_binary {configured} does not exist"
            )
        return configured.resolve()
    in_state = settings.state_path(Path("bin") / "opa")
    if in_state.is_file():
        return in_state.resolve()
    found = shutil.which("opa")
    if found is not None:
        return Path(found)
    for candidate in tool_candidates("opa"):
        if candidate.is_file():
            return candidate.resolve()
    raise SidecarError(
        f"OPA binary not found: set policy.opa_binary (PGWARDEN_POLICY__OPA_BINARY), put opa"
        f" on PATH or in {in_state}"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
