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


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster]:
    """A PostgreSQL server for the whole run: a throwaway initdb cluster under a temp folder."""
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
    candidates = [
        os.environ.get("PGWARDEN_OPA_BINARY"),
        str(ROOT / ".pgwarden" / "bin" / "opa"),
        shutil.which("opa"),
    ]
    for c in candidates:
        if c and Path(c).exists():
            return Path(c)
    raise RuntimeError(
        "OPA binary missing: run `make deps` (go install github.com/open-policy-agent/opa@v1.22.3)"
    )


# -- the real gateway, for integration tests ---------------------------------------------

from tests.harness import (  # noqa: E402
    RunningGateway,
    create_scratch_database,
    drop_scratch_database,
    start_gateway,
    stop_gateway,
)

__all__ = [
    "RunningGateway",
    "create_scratch_database",
    "drop_scratch_database",
    "start_gateway",
    "stop_gateway",
]


@pytest.fixture(scope="session")
def app_database(pg_cluster: LocalCluster) -> str:
    return pg_cluster.create_app_database()


@pytest.fixture(scope="session")
def gateway(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[RunningGateway]:
    """The real gateway with the reference policy (real OPA) and the SQLite audit store."""
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-"))
    gw = start_gateway(state, pg_cluster, opa_binary)
    try:
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)


# -- audit integration: a second gateway whose audit store is PostgreSQL ---------------------


@pytest.fixture(scope="session")
def audit_pg_gateway(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[RunningGateway]:
    """The real gateway (reference policy, real OPA), audit.store=postgres on its own database."""
    name, dsn = create_scratch_database(pg_cluster, "pgwarden_audit")
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-pgaudit-"))
    audit = {"store": "postgres", "postgres_dsn": dsn}
    gw = start_gateway(state, pg_cluster, opa_binary, audit=audit)
    try:
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)
        drop_scratch_database(pg_cluster, name)
