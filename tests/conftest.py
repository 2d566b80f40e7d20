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


# -- the real gateway, for integration tests ---------------------------------------------

import asyncio  # noqa: E402
import threading  # noqa: E402
from collections.abc import Coroutine  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

from cli.certs import CertFiles, ensure_server_cert  # noqa: E402
from cli.localpg import APP_DB, MD5_PASSWORD, MD5_USER, SUPERUSER, SUPERUSER_PASSWORD, TRUST_USER  # noqa: E402
from gateway.identity.local import LocalTokenIssuer  # noqa: E402
from gateway.proxy.targets import Target, TargetRegistry  # noqa: E402
from gateway.runtime import Gateway  # noqa: E402
from gateway.settings import Settings, load_settings  # noqa: E402

T = TypeVar("T")


@dataclass
class RunningGateway:
    """A real gateway on its own uvloop thread; tests talk to it over real sockets."""

    settings: Settings
    gateway: Gateway
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    host: str
    port: int
    cluster: LocalCluster
    certs: CertFiles
    environ: dict[str, str] = field(default_factory=dict)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def token(self, subject: str = "agent:test", groups: tuple[str, ...] = ("admins",), ttl: float = 3600) -> str:
        issuer = LocalTokenIssuer.from_settings(self.settings)
        try:
            return issuer.issue(subject, list(groups), ttl).token
        finally:
            issuer.close()

    def dsn(self, token: str, target: str = "app", **extra: str) -> str:
        params = {"host": self.host, "port": str(self.port), "dbname": target, "user": "tester",
                  "password": token, "sslmode": "disable", **extra}
        return " ".join(f"{k}='{v}'" for k, v in params.items())

    def url(self, token: str, target: str = "app") -> str:
        return f"postgresql://tester:{token}@{self.host}:{self.port}/{target}?sslmode=disable"

    def direct_dsn(self, dbname: str = APP_DB) -> str:
        return self.cluster.dsn(dbname=dbname)


def start_gateway(state_dir: Path, cluster: LocalCluster, opa: Path, **overrides: Any) -> RunningGateway:
    import uvloop

    certs = ensure_server_cert(state_dir / "tls")
    (state_dir / "upstream.pw").write_text(SUPERUSER_PASSWORD)
    environ = {"PGWARDEN_TEST_UPSTREAM_PW": SUPERUSER_PASSWORD, "PGWARDEN_TEST_MD5_PW": MD5_PASSWORD}
    registry = TargetRegistry(state_dir / "targets.json")
    targets = [
        Target(name="app", host="127.0.0.1", port=cluster.port, dbname=APP_DB, user=SUPERUSER,
               password_env="PGWARDEN_TEST_UPSTREAM_PW", sslmode="disable", labels={"env": "test"}),
        Target(name="app_tls", host="localhost", port=cluster.port, dbname=APP_DB, user=SUPERUSER,
               password_file=str(state_dir / "upstream.pw"), sslmode="verify-full",
               sslrootcert=str(cluster.ca_cert)),
        Target(name="app_md5", host="127.0.0.1", port=cluster.port, dbname=APP_DB, user=MD5_USER,
               password_env="PGWARDEN_TEST_MD5_PW", sslmode="disable"),
        Target(name="app_trust", host="127.0.0.1", port=cluster.port, dbname=APP_DB, user=TRUST_USER,
               sslmode="disable"),
        Target(name="app_recorded", host="127.0.0.1", port=cluster.port, dbname=APP_DB, user=SUPERUSER,
               password_env="PGWARDEN_TEST_UPSTREAM_PW", sslmode="disable",
               labels={"pgwarden.record": "rows"}),
    ]
    for t in targets:
        if registry.get(t.name) is None:
            registry.add(t)
    settings_kw: dict[str, Any] = {
        "state_dir": state_dir,
        "listener": {"host": "127.0.0.1", "port": 0, "tls_cert": certs.cert, "tls_key": certs.key},
        "policy": {"opa_binary": opa, "rego_dir": ROOT / "rego", "bundle_dir": ROOT / "bundles"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(settings_kw.get(key), dict):
            settings_kw[key] = {**settings_kw[key], **value}
        else:
            settings_kw[key] = value
    settings = load_settings(**settings_kw)
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="pgwarden-gateway", daemon=True)
    thread.start()
    gateway = Gateway(settings, environ)
    host, port = asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(120)
    return RunningGateway(settings, gateway, loop, thread, host, port, cluster, certs, environ)


def stop_gateway(gw: RunningGateway) -> None:
    try:
        gw.run(gw.gateway.stop(), timeout=30)
    finally:
        gw.loop.call_soon_threadsafe(gw.loop.stop)
        gw.thread.join(10)


@pytest.fixture(scope="session")
def app_database(pg_cluster: LocalCluster) -> str:
    return pg_cluster.create_app_database()


@pytest.fixture(scope="session")
def gateway(pg_cluster: LocalCluster, app_database: str, opa_binary: Path) -> Iterator[RunningGateway]:
    """The real gateway with the reference policy (real OPA) and the SQLite audit store."""
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-"))
    gw = start_gateway(state, pg_cluster, opa_binary)
    try:
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)


# -- audit integration: a second gateway whose audit store is PostgreSQL ---------------------


def create_scratch_database(cluster: LocalCluster, prefix: str) -> tuple[str, str]:
    """A fresh, empty database on the test cluster: (name, superuser DSN)."""
    import uuid

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    cluster.psql(f"CREATE DATABASE {name}")
    return name, cluster.dsn(dbname=name)


def drop_scratch_database(cluster: LocalCluster, name: str) -> None:
    cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


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
