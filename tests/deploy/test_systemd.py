"""deploy/pgwarden.service, read: it runs `serve` with an explicit config, reloads with
SIGHUP, and stops with SIGTERM to the gateway alone, with time to drain."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_unit_serves_reloads_and_drains() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # ConfigParser's hook: keep keys' case
    unit.read(ROOT / "deploy" / "pgwarden.service")
    service = unit["Service"]
    start = shlex.split(service["ExecStart"])
    assert start[0].endswith("/pgwarden") and start[-1] == "serve"
    assert start[start.index("--config") + 1].endswith(".toml")
    assert shlex.split(service["ExecReload"]) == ["/bin/kill", "-HUP", "$MAINPID"]
    # SIGTERM to pgwarden only: it stops its OPA and audit writer after the drain itself.
    assert service["KillMode"] == "mixed"
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > Settings.model_construct().shutdown.drain_seconds
    state = service["Environment"].removeprefix("PGWARDEN_STATE_DIR=")
    assert state == f"/var/lib/{service['StateDirectory']}"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
