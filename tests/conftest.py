"""Session fixtures: a real PostgreSQL and the real OPA binary, started by the test run itself."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.localpg import LocalCluster, free_port

ROOT = Path(__file__).resolve().parent.parent


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster]:
    """A PostgreSQL server for the whole run: a throwaway initdb cluster under a temp folder.

    With PGWARDEN_TEST_DOCKER=1 and a Docker engine that answers, testcontainers could serve
    instead; the local cluster is the path that always works here.
    """
    base = Path(tempfile.mkdtemp(prefix="pgwarden-pg-"))
    base.chmod(0o755)
    cluster = LocalCluster(base, free_port())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def opa_binary() -> Path:
    """The real OPA binary that `make deps` installed into .pgwarden/bin."""
    candidates = [os.environ.get("PGWARDEN_OPA_BINARY"), str(ROOT / ".pgwarden" / "bin" / "opa"), shutil.which("opa")]
    for c in candidates:
        if c and Path(c).exists():
            return Path(c)
    raise RuntimeError("OPA binary missing: run `make deps` (go install github.com/open-policy-agent/opa@v1.22.3)")
