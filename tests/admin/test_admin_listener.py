"""The admin listener of a real gateway: /healthz, /readyz as OPA and the audit writer go
down and come back, and /metrics scraped and parsed as Prometheus reads it while real
clients open sessions and run allowed, denied and masked statements."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli.localpg import LocalCluster
from gateway.admin import AdminConfigError
from gateway.audit import WriteAheadAudit
from gateway.control.targets import Target
from gateway.runtime import Gateway
from gateway.settings import load_settings
from tests.harness import RunningGateway, StoredTargets, start_gateway, stop_gateway
from tests.integration import REFUSED, connect, refusal_of, simple, token_for

pytestmark = [pytest.mark.server]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def admin_gw(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[RunningGateway]:
    state = Path(tempfile.mkdtemp(prefix="pgwarden-admin-"))
    gw = start_gateway(
        state, pg_cluster, opa_binary, admin={"host": "127.0.0.1", "port": free_port()}
    )
    try:
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)


def admin_url(gw: RunningGateway, path: str) -> str:
    assert gw.gateway.admin is not None and gw.gateway.admin.address is not None
    host, port = gw.gateway.admin.address
    return f"http://{host}:{port}{path}"


def scrape(gw: RunningGateway) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    response = httpx.get(admin_url(gw, "/metrics"), timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def readyz(gw: RunningGateway) -> httpx.Response:
    return httpx.get(admin_url(gw, "/readyz"), timeout=10)


# -- health -------------------------------------------------------------------------------


def test_healthz_and_readyz_answer_while_all_is_up(admin_gw: RunningGateway) -> None:
    health = httpx.get(admin_url(admin_gw, "/healthz"), timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = readyz(admin_gw)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"


def test_readyz_is_503_while_opa_is_down_and_200_once_the_supervisor_restarted_it(
    admin_gw: RunningGateway,
) -> None:
    sidecar = admin_gw.gateway.sidecar
    assert sidecar is not None and sidecar.pid is not None
    before = scrape(admin_gw)
    old_pid = sidecar.pid
    # Stopped first, so that "down" lasts until the test has seen it; then killed, and the
    # supervisor starts a new OPA.
    os.kill(old_pid, signal.SIGSTOP)
    try:
        wait_for(lambda: readyz(admin_gw).status_code == 503, "readyz 503 with OPA stopped")
        body = readyz(admin_gw).json()
        assert body["status"] == "not ready" and "opa" in body["not_ready"], body
        assert "audit" not in body["not_ready"] and "targets" not in body["not_ready"], body
        # The sidecar's next revision poll times out: the gauge follows.
        wait_for(lambda: value(scrape(admin_gw), "pgwarden_opa_up") == 0, "opa_up 0")
    finally:
        os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: readyz(admin_gw).status_code == 200, "readyz 200 after the restart")
    assert sidecar.pid != old_pid
    after = scrape(admin_gw)
    assert (
        value(after, "pgwarden_opa_restarts_total")
        >= value(before, "pgwarden_opa_restarts_total") + 1
    )
    wait_for(lambda: value(scrape(admin_gw), "pgwarden_opa_up") == 1, "opa_up back to 1")


@pytest.fixture(scope="module")
def store_gw(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[RunningGateway]:
    """A gateway whose point of durability is the store (audit.durability=store): its
    records are committed by the audit writer process."""
    state = Path(tempfile.mkdtemp(prefix="pgwarden-admin-store-"))
    gw = start_gateway(
        state,
        pg_cluster,
        opa_binary,
        admin={"host": "127.0.0.1", "port": free_port()},
        audit={"durability": "store"},
    )
    try:
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)


def test_readyz_is_503_while_the_audit_writer_process_is_down(store_gw: RunningGateway) -> None:
    audit = store_gw.gateway.audit
    pid = getattr(audit, "pid", None)
    assert pid is not None, "with durability=store the audit sink is the writer process"
    before = scrape(store_gw)
    os.kill(pid, signal.SIGKILL)
    # Between the child's death and its restart (at least the 0.5 s restart delay).
    wait_for(lambda: readyz(store_gw).status_code == 503, "readyz 503 with the writer dead")
    body = readyz(store_gw).json()
    assert "audit" in body["not_ready"], body
    wait_for(lambda: readyz(store_gw).status_code == 200, "readyz 200 after the writer restart")
    after = scrape(store_gw)
    assert value(after, "pgwarden_audit_writer_up") == 1
    assert (
        value(after, "pgwarden_audit_writer_restarts_total")
        == value(before, "pgwarden_audit_writer_restarts_total") + 1
    )
    # And statements are recorded again.
    with connect(store_gw.dsn(token_for(store_gw, "engineers"))) as conn:
        assert simple(conn, "SELECT 1") == [(1,)]


def test_readyz_is_503_while_the_audit_log_cannot_be_written(admin_gw: RunningGateway) -> None:
    # The default sink: the audit log, written in the gateway's process.
    audit = admin_gw.gateway.audit
    assert isinstance(audit, WriteAheadAudit)
    real_write = audit.log.write

    def full(data: bytes, first_seq: int) -> None:
        raise OSError(28, "No space left on device")

    with connect(admin_gw.dsn(token_for(admin_gw, "engineers"))) as conn:
        assert simple(conn, "SELECT 1") == [(1,)]
        audit.log.write = full  # type: ignore[method-assign]  # fault: the disk is full
        try:
            with pytest.raises(psycopg.Error) as refused:
                simple(conn, "SELECT 2")
            assert refusal_of(refused.value).sqlstate == "58000"
            wait_for(lambda: readyz(admin_gw).status_code == 503, "readyz 503, log not written")
            body = readyz(admin_gw).json()
            assert "audit" in body["not_ready"], body
            assert value(scrape(admin_gw), "pgwarden_audit_writer_up") == 0
        finally:
            audit.log.write = real_write  # type: ignore[method-assign]  # the fault ends
        # The records the failed write did not take are written again: the log is back.
        wait_for(lambda: readyz(admin_gw).status_code == 200, "readyz 200, log written again")
        assert simple(conn, "SELECT 3") == [(3,)]
    after = scrape(admin_gw)
    assert value(after, "pgwarden_audit_writer_up") == 1
    assert value(after, "pgwarden_audit_writer_restarts_total") == 0
    assert value(after, "pgwarden_audit_position") > 0


# -- metrics ------------------------------------------------------------------------------


def test_metrics_move_as_sessions_open_and_close(admin_gw: RunningGateway) -> None:
    before = scrape(admin_gw)
    token = token_for(admin_gw, "engineers", "pii-readers")
    group = "engineers,pii-readers"
    with connect(admin_gw.dsn(token)) as conn:
        assert simple(conn, "SELECT 1") == [(1,)]
        during = scrape(admin_gw)
        assert value(during, "pgwarden_sessions_open", target="app", group=group) == 1
        assert (
            value(during, "pgwarden_sessions_total", target="app", group=group)
            == value(before, "pgwarden_sessions_total", target="app", group=group) + 1
        )
        with connect(admin_gw.dsn(token)):
            assert value(scrape(admin_gw), "pgwarden_sessions_open", target="app", group=group) == 2
    wait_for(
        lambda: value(scrape(admin_gw), "pgwarden_sessions_open", target="app", group=group) == 0,
        "sessions_open back to 0 once both closed",
    )
    after = scrape(admin_gw)
    assert (
        value(after, "pgwarden_sessions_total", target="app", group=group)
        == value(before, "pgwarden_sessions_total", target="app", group=group) + 2
    )


def test_metrics_count_statements_by_action_decisions_audit_and_bytes(
    admin_gw: RunningGateway,
) -> None:
    before = scrape(admin_gw)
    engineers = admin_gw.dsn(token_for(admin_gw, "engineers"))
    for _ in range(3):
        # The same input, asked three times: OPA once, the cache twice. In three sessions:
        # within one, the second and third would run on the plan of their shape, asking
        # no decision at all.
        with connect(engineers) as conn:
            assert simple(conn, "SELECT count(*) FROM orders") == [(3,)]
    with connect(engineers) as conn:
        with pytest.raises(psycopg.Error) as denied:
            simple(conn, "SELECT pg_read_file('/etc/hostname')")
        assert refusal_of(denied.value).sqlstate == REFUSED
        with pytest.raises(psycopg.Error) as held:
            simple(conn, "UPDATE orders SET amount = amount")  # no WHERE: approval
        assert refusal_of(held.value).sqlstate == REFUSED
    with connect(admin_gw.dsn(token_for(admin_gw, "ai-agents"))) as conn:
        rows = simple(conn, "SELECT email FROM customers ORDER BY id")
        assert rows and all("***" in str(r[0]) for r in rows), rows
    after = scrape(admin_gw)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("pgwarden_statements_total", target="app", action="allow") == 4
    assert moved("pgwarden_statements_total", target="app", action="deny") == 1
    assert moved("pgwarden_statements_total", target="app", action="approve") == 1
    assert moved("pgwarden_statements_total", target="app", action="error") == 0
    assert moved("pgwarden_masked_statements_total", target="app") == 1
    assert moved("pgwarden_decision_seconds_count") == 6
    assert moved("pgwarden_decision_seconds_bucket", le="+Inf") == 6
    assert moved("pgwarden_decision_seconds_sum") > 0
    assert moved("pgwarden_decision_cache_total", result="hit") >= 2
    assert moved("pgwarden_decision_cache_total", result="miss") >= 1
    # Every statement's request record, plus outcomes and session records, is durable.
    assert moved("pgwarden_audit_position") >= 6
    assert moved("pgwarden_audit_commit_seconds_count") >= 1
    # The index follows the log in a process of its own, polling: it catches up, at once or
    # a poll later (statements never wait for it).
    wait_for(
        lambda: value(scrape(admin_gw), "pgwarden_audit_index_lag_records") == 0,
        "the audit index catches up with the log",
    )
    assert value(after, "pgwarden_audit_writer_up") == 1
    assert value(after, "pgwarden_opa_up") == 1
    # Three result sets of (3,), the masked rows and the errors went back; the queries out.
    assert (
        moved("pgwarden_bytes_relayed_total", direction="to_server")
        >= len("SELECT count(*) FROM orders") * 3
    )
    assert moved("pgwarden_bytes_relayed_total", direction="to_client") > 100


def test_metrics_count_upstream_connect_errors_by_target(admin_gw: RunningGateway) -> None:
    registry = StoredTargets(admin_gw.settings)
    if registry.get("unreachable") is None:
        registry.add(
            Target(
                name="unreachable",
                host="127.0.0.1",
                port=free_port(),  # nothing listens there
                dbname="appdb",
                user="nobody",
                sslmode="disable",
            )
        )
    before = scrape(admin_gw)
    with pytest.raises(psycopg.OperationalError):
        connect(admin_gw.dsn(token_for(admin_gw, "engineers"), target="unreachable"))
    after = scrape(admin_gw)
    assert (
        value(after, "pgwarden_upstream_connect_errors_total", target="unreachable")
        == value(before, "pgwarden_upstream_connect_errors_total", target="unreachable") + 1
    )
    assert value(after, "pgwarden_upstream_connect_errors_total", target="app") == value(
        before, "pgwarden_upstream_connect_errors_total", target="app"
    )


def test_each_gateway_has_its_own_registry(admin_gw: RunningGateway) -> None:
    """Two gateways in one process: neither's scrape shows the other's sessions."""
    state = Path(tempfile.mkdtemp(prefix="pgwarden-admin2-"))
    second = start_gateway(
        state,
        admin_gw.cluster,
        Path(str(admin_gw.settings.policy.opa_binary)),
        admin={"host": "127.0.0.1", "port": free_port()},
    )
    try:
        before = scrape(admin_gw)
        with connect(second.dsn(token_for(second, "admins"))) as conn:
            assert simple(conn, "SELECT 1") == [(1,)]
            assert value(scrape(second), "pgwarden_sessions_open", target="app", group="admins")
            assert value(
                scrape(admin_gw), "pgwarden_sessions_open", target="app", group="admins"
            ) == value(before, "pgwarden_sessions_open", target="app", group="admins")
    finally:
        stop_gateway(second)
        shutil.rmtree(state, ignore_errors=True)


# -- where it may listen ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("admin", "missing"),
    [
        ({"host": "0.0.0.0", "port": 6544}, "admin.tls_cert and admin.tls_key"),  # noqa: S104
        (
            {"host": "10.0.0.1", "port": 6544, "tls_cert": "c.pem", "tls_key": "k.pem",
             "token_groups": []},
            "admin.token_groups",
        ),
    ],
)  # fmt: skip
def test_a_non_loopback_admin_address_needs_tls_and_token_groups(
    tmp_path: Path, admin: dict[str, Any], missing: str
) -> None:
    """Refused before anything starts (no OPA, no audit writer, no listener)."""
    settings = load_settings(state_dir=tmp_path / "state", admin=admin)
    gateway = Gateway(settings, {})
    with pytest.raises(AdminConfigError, match=missing):
        asyncio.run(gateway.start())
    assert gateway.sidecar is None and gateway.audit is None


def test_an_admin_port_in_use_is_a_clear_error_and_nothing_is_left_running(
    tmp_path: Path, opa_binary: Path
) -> None:
    root = Path(__file__).resolve().parents[2]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(
            state_dir=tmp_path / "state",
            listener={"port": 0},
            admin={"port": port},
            policy={
                "opa_binary": opa_binary,
                "rego_dir": root / "rego",
                "bundle_dir": root / "bundles",
            },
        )
        gateway = Gateway(settings, {})
        with pytest.raises(OSError, match=f"admin listener cannot listen on 127.0.0.1:{port}"):
            asyncio.run(gateway.start())
    # start() stopped what it had started: OPA and the audit writer are gone.
    assert gateway.sidecar is not None and not gateway.sidecar.running
    assert getattr(gateway.audit, "pid", None) is None
