"""The real gateway on its own uvloop thread, for integration tests, benches and repros."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import jwt
from typer.testing import CliRunner

from cli.certs import CertFiles, ensure_server_cert
from cli.localpg import (
    APP_DB,
    MD5_PASSWORD,
    MD5_USER,
    SUPERUSER,
    SUPERUSER_PASSWORD,
    TRUST_USER,
    LocalCluster,
)
from cli.main import app as cli_app
from gateway.control.client import ControlClient, open_control_store
from gateway.control.mirror import ControlMirror
from gateway.control.targets import Target
from gateway.identity.local import LocalTokenIssuer
from gateway.identity.verifier import IdentityVerifier
from gateway.runtime import Gateway
from gateway.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# How long a test may wait for a process to start, answer or end (a gateway, its audit
# child, a `pgwarden` command). Generous: on the shared 2-core machine, starved of CPU, a
# Python process took from seconds to more than a minute to start; no test may assert
# wall-clock times, and a wait ends as soon as its condition holds.
PATIENCE = 300.0


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

    def token(
        self, subject: str = "agent:test", groups: tuple[str, ...] = ("admins",), ttl: float = 3600
    ) -> str:
        issuer = LocalTokenIssuer.from_settings(self.settings)
        try:
            return issuer.issue(subject, list(groups), ttl).token
        finally:
            issuer.close()

    def revoke(self, token: str) -> None:
        """`pgwarden tokens revoke` of the token's jti, as an operator runs it."""
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        result = CliRunner().invoke(
            cli_app,
            ["tokens", "revoke", jti],
            env={"PGWARDEN_STATE_DIR": str(self.settings.state_dir)},
        )
        assert result.exit_code == 0, result.output

    def dsn(self, token: str, target: str = "app", **extra: str) -> str:
        params = {
            "host": self.host,
            "port": str(self.port),
            "dbname": target,
            "user": "tester",
            "password": token,
            "sslmode": "disable",
            **extra,
        }
        return " ".join(f"{k}='{v}'" for k, v in params.items())

    def url(self, token: str, target: str = "app") -> str:
        return f"postgresql://tester:{token}@{self.host}:{self.port}/{target}?sslmode=disable"

    def direct_dsn(self, dbname: str = APP_DB) -> str:
        return self.cluster.dsn(dbname=dbname)


def start_gateway(
    state_dir: Path,
    cluster: LocalCluster,
    opa: Path,
    extra_environ: dict[str, str] | None = None,
    **overrides: Any,
) -> RunningGateway:
    import uvloop

    certs = ensure_server_cert(state_dir / "tls")
    (state_dir / "upstream.pw").write_text(SUPERUSER_PASSWORD)
    environ = {
        "PGWARDEN_TEST_UPSTREAM_PW": SUPERUSER_PASSWORD,
        "PGWARDEN_TEST_MD5_PW": MD5_PASSWORD,
        **(extra_environ or {}),
    }
    targets = [
        Target(
            name="app",
            host="127.0.0.1",
            port=cluster.port,
            dbname=APP_DB,
            user=SUPERUSER,
            password_env="PGWARDEN_TEST_UPSTREAM_PW",
            sslmode="disable",
            labels={"env": "test"},
        ),
        Target(
            name="app_tls",
            host="localhost",
            port=cluster.port,
            dbname=APP_DB,
            user=SUPERUSER,
            password_file=str(state_dir / "upstream.pw"),
            sslmode="verify-full",
            sslrootcert=str(cluster.ca_cert),
        ),
        Target(
            name="app_md5",
            host="127.0.0.1",
            port=cluster.port,
            dbname=APP_DB,
            user=MD5_USER,
            password_env="PGWARDEN_TEST_MD5_PW",
            sslmode="disable",
        ),
        Target(
            name="app_trust",
            host="127.0.0.1",
            port=cluster.port,
            dbname=APP_DB,
            user=TRUST_USER,
            sslmode="disable",
        ),
        Target(
            name="app_recorded",
            host="127.0.0.1",
            port=cluster.port,
            dbname=APP_DB,
            user=SUPERUSER,
            password_env="PGWARDEN_TEST_UPSTREAM_PW",
            sslmode="disable",
            labels={"pgwarden.record": "rows"},
        ),
    ]
    settings_kw: dict[str, Any] = {
        "state_dir": state_dir,
        "listener": {"host": "127.0.0.1", "port": 0, "tls_cert": certs.cert, "tls_key": certs.key},
        # Off unless a test asks: several gateways run at once, the default port is fixed.
        "admin": {"port": 0},
        "policy": {"opa_binary": opa, "rego_dir": ROOT / "rego", "bundle_dir": ROOT / "bundles"},
        # A statement the policy holds for approval is asked about and refused at once unless
        # a test asks for a wait: most tests check what is held, not the wait.
        "approval": {"wait_seconds": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(settings_kw.get(key), dict):
            settings_kw[key] = {**settings_kw[key], **value}
        else:
            settings_kw[key] = value
    settings = load_settings(**settings_kw)
    with ControlClient(settings) as control:
        known = control.targets()
        for t in targets:
            if t.name not in known:
                control.add_target(t)
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="pgwarden-gateway", daemon=True)
    thread.start()
    gateway = Gateway(settings, environ)
    host, port = asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(120)
    return RunningGateway(settings, gateway, loop, thread, host, port, cluster, certs, environ)


class TcpRelay:
    """A TCP relay on 127.0.0.1 in front of the test cluster, a thread per connection, for
    tests that must watch or break what passes between the gateway and PostgreSQL.
    `relay(client, upstream)` handles one connection; by default it pipes both ways."""

    def __init__(self, upstream_port: int, port: int = 0) -> None:
        """`port`: listen there (a relay closed earlier, back again), else any free port."""
        self.upstream_port = upstream_port
        self._server = socket.create_server(("127.0.0.1", port))
        self.port: int = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._server.accept()
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        try:
            self.relay(client, upstream)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        back.start()
        pipe(client, upstream)
        back.join(10)

    def close(self) -> None:
        # shutdown() first: a close() alone leaves the accept() blocked in the other thread
        # listening, and it would still let one more connection through.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()


def pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy until `src` ends, then end `dst`'s sending side."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def target_through(gw: RunningGateway, name: str, port: int) -> Iterator[str]:
    """Target `name` for as long as the block runs: the app database as the superuser, but
    reached through 127.0.0.1:`port` (a test's TCP relay in front of the cluster)."""
    with ControlClient(gw.settings) as control:
        control.add_target(
            Target(
                name=name,
                host="127.0.0.1",
                port=port,
                dbname=APP_DB,
                user=SUPERUSER,
                password_env="PGWARDEN_TEST_UPSTREAM_PW",
                sslmode="disable",
            )
        )
    try:
        yield name
    finally:
        with ControlClient(gw.settings) as control:
            control.remove_target(name)


def stop_gateway(gw: RunningGateway) -> None:
    try:
        gw.run(gw.gateway.stop(), timeout=30)
    finally:
        gw.loop.call_soon_threadsafe(gw.loop.stop)
        gw.thread.join(10)


def create_scratch_database(cluster: LocalCluster, prefix: str) -> tuple[str, str]:
    """A fresh, empty database on the test cluster: (name, superuser DSN)."""
    import uuid

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    cluster.psql(f"CREATE DATABASE {name}")
    return name, cluster.dsn(dbname=name)


def drop_scratch_database(cluster: LocalCluster, name: str) -> None:
    cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def stored_target(settings: Settings | Path, name: str) -> Target | None:
    """The target of that name in the control store of `settings` (or of a state directory
    with default settings), as the CLI or a gateway would read it."""
    if isinstance(settings, Path):
        settings = load_settings(state_dir=settings)
    with ControlClient(settings) as control:
        return control.target(name)


class StoredTargets:
    """The targets in the control store of `settings`, added and removed as `pgwarden
    targets add|remove` does (each call opens the store and closes it again)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def get(self, name: str) -> Target | None:
        return stored_target(self.settings, name)

    def add(self, target: Target, *, replace: bool = False) -> None:
        with ControlClient(self.settings) as control:
            control.add_target(target, replace=replace)

    def remove(self, name: str) -> None:
        with ControlClient(self.settings) as control:
            control.remove_target(name)


@contextlib.asynccontextmanager
async def control_mirror(settings: Settings) -> AsyncIterator[ControlMirror]:
    """The control store of `settings` started (its old files imported) and mirrored as a
    gateway mirrors it, on the running event loop."""
    store = await open_control_store(settings)
    mirror = ControlMirror(store, poll_seconds=settings.identity.revocation_poll_seconds)
    try:
        await mirror.start()
        yield mirror
    finally:
        await mirror.close()
        await store.close()


@contextlib.asynccontextmanager
async def identity_verifier(settings: Settings) -> AsyncIterator[IdentityVerifier]:
    """The gateway's token verifier, reading the control store of `settings`."""
    async with control_mirror(settings) as mirror:
        verifier = IdentityVerifier.from_settings(settings, mirror)
        try:
            yield verifier
        finally:
            await verifier.aclose()


@contextlib.contextmanager
def gateways_sharing_control(
    cluster: LocalCluster,
    opa: Path,
    control: dict[str, Any] | None = None,
    one: dict[str, Any] | None = None,
    two: dict[str, Any] | None = None,
) -> Iterator[tuple[RunningGateway, RunningGateway]]:
    """Two gateways, each with a state directory of its own, sharing one PostgreSQL control
    store (a scratch database; `control` adds settings) and the first one's signing key, so
    that a token issued for either is verified by both. `one`, `two`: their own settings."""
    import shutil
    import tempfile

    from gateway.identity.signing_key import SIGNING_KEY_FILE

    name, dsn = create_scratch_database(cluster, "pgwarden_control")
    shared = {"store": "postgres", "postgres_dsn": dsn, **(control or {})}
    states = [Path(tempfile.mkdtemp(prefix=f"pgwarden-gw-{n}-")) for n in ("one", "two")]
    started: list[RunningGateway] = []
    try:
        started.append(start_gateway(states[0], cluster, opa, control=shared, **(one or {})))
        shutil.copy(states[0] / SIGNING_KEY_FILE, states[1] / SIGNING_KEY_FILE)
        started.append(start_gateway(states[1], cluster, opa, control=shared, **(two or {})))
        yield started[0], started[1]
    finally:
        for gw in started:
            stop_gateway(gw)
        for state in states:
            shutil.rmtree(state, ignore_errors=True)
        drop_scratch_database(cluster, name)
