"""`pgwarden serve` as a process of its own, as an operator runs it: for the tests of what
only a real process shows (kill -9, signals, the folder it starts from)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cli.localpg import SUPERUSER_PASSWORD
from tests.harness import PATIENCE

from .test_audit_support import wait_for

ROOT = Path(__file__).resolve().parents[2]
PGWARDEN = Path(sys.executable).with_name("pgwarden")


def pids_mentioning(needle: str) -> list[int]:
    """Processes whose command line mentions `needle` (the gateway's state dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if needle.encode() in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def kill_leftovers(state: Path) -> None:
    """Whatever still runs from this state dir (gateway, OPA) goes with it."""
    for pid in pids_mentioning(str(state)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["rm", "-rf", str(state)], check=False)


class GatewayProcess:
    """`pgwarden serve` in its own process group, with its OPA sidecar under it."""

    def __init__(
        self, env: dict[str, str], log: Path, *, args: Sequence[str] = (), cwd: Path | None = None
    ) -> None:
        self.env = env
        self.port = int(env["PGWARDEN_LISTENER__PORT"])
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [str(PGWARDEN), *args, "serve"], env=env, stdout=self._log, stderr=self._log,
            start_new_session=True, cwd=cwd,
        )  # fmt: skip
        self.pgid = self.proc.pid

    def wait_listening(self, timeout: float = PATIENCE) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"pgwarden serve exited with {self.proc.returncode}")
            with socket.socket() as s:
                s.settimeout(0.5)
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(up, timeout=timeout, interval=0.2)

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()


def serve_env(state: Path, opa: Path, port: int, instance: str = "gw-crash") -> dict[str, str]:
    """The environment of a gateway on `state`, the project's policy and the real OPA."""
    return {
        **os.environ,
        "PGWARDEN_STATE_DIR": str(state),
        "PGWARDEN_INSTANCE": instance,
        "PGWARDEN_LISTENER__HOST": "127.0.0.1",
        "PGWARDEN_LISTENER__PORT": str(port),
        # No admin listener: other test runs on this machine may hold its default port.
        "PGWARDEN_ADMIN__PORT": "0",
        "PGWARDEN_POLICY__OPA_BINARY": str(opa),
        "PGWARDEN_POLICY__REGO_DIR": str(ROOT / "rego"),
        "PGWARDEN_POLICY__BUNDLE_DIR": str(ROOT / "bundles"),
        "PGWARDEN_CRASH_UPSTREAM_PW": SUPERUSER_PASSWORD,
    }


def cli(env: dict[str, str], *args: str) -> str:
    """`pgwarden <args>` as a process; its stdout (it must succeed)."""
    out = subprocess.run([str(PGWARDEN), *args], env=env, capture_output=True, text=True,
                         timeout=PATIENCE)  # fmt: skip
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout.strip()
