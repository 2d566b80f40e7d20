"""docker-compose.yml and docker/Dockerfile, read (no Docker engine runs here): from a fresh
clone the policy bundle OPA loads is built by a service of the file itself, every file the
image copies is in the repository, the settings it sets exist, and `docker compose stop`
reaches pgwarden itself with time to drain."""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from gateway.settings import Settings

from .contract import setting_names, setting_of_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services: dict[str, Any] = compose["services"]
    return services


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount path → volume name (or host path), read-only flags dropped."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        out[target] = source
    return out


def test_the_bundle_opa_loads_is_built_by_the_compose_file(services: dict[str, Any]) -> None:
    opa = services["opa"]
    args = opa["command"]
    bundle = PurePosixPath(args[args.index("--bundle") + 1])
    volume = _mounts(opa)[str(bundle.parent)]
    builders = [
        name for name, s in services.items()
        if "pgwarden policy build" in _command(s) and volume in _mounts(s).values()
    ]  # fmt: skip
    assert builders, "no service builds the bundle into the volume OPA reads"
    (builder,) = builders
    assert opa["depends_on"][builder]["condition"] == "service_completed_successfully"
    # It copies the built bundle to the very path OPA loads.
    where = {v: k for k, v in _mounts(services[builder]).items()}[volume]
    assert f"{where}/{bundle.name}" in _command(services[builder])
    # A fresh clone has no built bundle: the file is ignored, never committed.
    assert "bundles/*.tar.gz" in (ROOT / ".gitignore").read_text()


def test_every_build_input_is_in_the_repository(services: dict[str, Any]) -> None:
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        assert dockerfile.is_file(), name
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                for source in shlex.split(line)[1:-1]:
                    assert (ROOT / build["context"] / source).exists(), (name, source)


def test_pgwarden_settings_exist_and_stop_reaches_pgwarden(services: dict[str, Any]) -> None:
    known = setting_names()
    pgwarden = services["pgwarden"]
    for name in pgwarden["environment"]:
        if name.startswith("PGWARDEN_"):
            assert setting_of_env(name) in known, name
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    for name in re.findall(r"\b(PGWARDEN_\w+)=", dockerfile):
        assert setting_of_env(name) in known, name
    # Through a shell, only `exec` makes pgwarden the process that gets SIGTERM and drains.
    assert re.search(r"(^|&&|;)\s*exec pgwarden serve\b", _command(pgwarden)), _command(pgwarden)
    grace = int(str(pgwarden["stop_grace_period"]).removesuffix("s"))
    default_drain = Settings.model_construct().shutdown.drain_seconds
    drain = float(pgwarden["environment"].get("PGWARDEN_SHUTDOWN__DRAIN_SECONDS", default_drain))
    assert grace > drain
    # The state outlives the container, where the image puts it.
    state = re.search(r"PGWARDEN_STATE_DIR=(\S+)", dockerfile)
    assert state is not None and state.group(1) in _mounts(pgwarden)
