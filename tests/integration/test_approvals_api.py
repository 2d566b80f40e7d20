# ruff: noqa: S608  (tests build SQL around table names of their own)
"""The approver's surfaces on a real gateway: the admin API (token-authenticated, its
OpenAPI document as committed), `pgwarden approvals` through it, and the webhook, signed,
received by a real local HTTP server that checks the signature."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from cli.localpg import LocalCluster, free_port
from cli.main import app
from gateway.admin.openapi import DOCUMENT, openapi_document, render
from gateway.enforce.webhook import EVENT_HEADER, SIGNATURE_HEADER, verify_signature

from . import REFUSED, original_rows, refusal_of, simple, table_rows
from .approvals import Held, agent, gateway_for_approvals, own_table, stored

pytestmark = pytest.mark.server

WEBHOOK_KEY = "webhook-test-key"


class Receiver:
    """A webhook receiver on 127.0.0.1: keeps each delivery whose signature checks out,
    counts the others; answers 503 to the first `fail_first` deliveries."""

    def __init__(self, fail_first: int = 0) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.bad_signatures = 0
        self.refused = 0
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.refused < outer.fail_first:
                    outer.refused += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                signature = self.headers.get(SIGNATURE_HEADER, "")
                if verify_signature(WEBHOOK_KEY.encode(), signature, body):
                    outer.events.append((self.headers[EVENT_HEADER], json.loads(body)))
                    self.send_response(204)
                else:
                    outer.bad_signatures += 1
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, event: str, request_id: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, body in self.events:
                if name == event and body["request"]["id"] == request_id:
                    return body
            time.sleep(0.05)
        raise AssertionError(f"no {event} for {request_id}: {self.events!r}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    yield r
    r.close()


@pytest.fixture(scope="module")
def api_gw(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path, receiver: Receiver
) -> Iterator[Any]:
    yield from gateway_for_approvals(
        pg_cluster,
        opa_binary,
        {"PGWARDEN_WEBHOOK_SECRET": WEBHOOK_KEY},
        admin={"port": free_port()},
        approval={"wait_seconds": 60, "webhook_url": receiver.url},
    )


def admin_url(gw: Any) -> str:
    host, port = gw.gateway.admin.address
    return f"http://{host}:{port}"


def pgwarden(gw: Any, token: str, *args: str) -> Any:
    result = CliRunner().invoke(
        app,
        ["approvals", *args],
        env={
            "PGWARDEN_STATE_DIR": str(gw.settings.state_dir),
            "PGWARDEN_TOKEN": token,
            "PGWARDEN_ADMIN_URL": admin_url(gw),
        },
    )
    return result


@pytest.fixture
def table(api_gw: Any) -> Iterator[str]:
    yield from own_table(api_gw)


def test_the_openapi_document_in_the_repo_is_the_running_apis(api_gw: Any) -> None:
    served = httpx.get(admin_url(api_gw) + "/openapi.json").json()
    assert render(served) == DOCUMENT.read_text(), (
        "run `python -m gateway.admin.openapi` to write it again"
    )
    assert render(openapi_document()) == DOCUMENT.read_text()
    assert {"/approvals", "/approvals/{request_id}/approve", "/approvals/grants"} <= set(
        served["paths"]
    )


def test_approved_from_the_cli_while_held(api_gw: Any, table: str, receiver: Receiver) -> None:
    held = Held(
        api_gw.dsn(agent(api_gw)),
        lambda c: simple(c, f'DELETE FROM "{table}" WHERE id = 1 RETURNING id, v'),
    )
    try:
        rid = held.request_id()
        approver = api_gw.token("user:ann", groups=("engineers",))
        listed = pgwarden(api_gw, approver, "list", "--status", "pending", "--json")
        assert listed.exit_code == 0, listed.output
        assert rid in [json.loads(line)["id"] for line in listed.stdout.splitlines()]
        shown = pgwarden(api_gw, approver, "show", rid)
        assert shown.exit_code == 0, shown.output
        assert "DELETE FROM" in shown.stdout and "agent:bot" in shown.stdout
        done = pgwarden(api_gw, approver, "approve", rid, "--note", "ok for cleanup")
        assert done.exit_code == 0, done.output
        assert f"{rid}: approved" in done.stdout
        assert held.done() and held.error is None, held.error
        assert held.result == [(1, "v1")]
        # The webhook heard of the request and of its approval, signed (the first delivery
        # was answered 503 and retried).
        asked = receiver.wait_for("requested", rid)
        assert asked["request"]["text"].startswith("DELETE FROM")
        decided = receiver.wait_for("approved", rid)
        assert decided["request"]["votes"][0]["note"] == "ok for cleanup"
        assert receiver.refused == 1 and receiver.bad_signatures == 0
    finally:
        held.close()


def test_denied_from_the_cli(api_gw: Any, table: str) -> None:
    held = Held(api_gw.dsn(agent(api_gw)), lambda c: simple(c, f'DELETE FROM "{table}"'))
    try:
        rid = held.request_id()
        approver = api_gw.token("user:root", groups=("admins",))
        done = pgwarden(api_gw, approver, "deny", rid, "--note", "use a migration")
        assert done.exit_code == 0, done.output
        assert held.done()
        r = refusal_of(held.error or AssertionError("not refused"))
        assert r.sqlstate == REFUSED and "use a migration" in r.message
        assert table_rows(api_gw, table) == original_rows()
    finally:
        held.close()


def test_the_api_refuses_whoever_may_not_decide(api_gw: Any, table: str) -> None:
    held = Held(api_gw.dsn(agent(api_gw)), lambda c: simple(c, f'DELETE FROM "{table}"'))
    try:
        rid = held.request_id()
        url = f"{admin_url(api_gw)}/approvals/{rid}/approve"
        assert httpx.post(url, json={}).status_code == 401
        bad = httpx.post(url, json={}, headers={"Authorization": "Bearer not-a-token"})
        assert bad.status_code == 401
        # The requester, even with an approver's group: refused.
        own = api_gw.token("agent:bot", groups=("ai-agents", "engineers"))
        refused = pgwarden(api_gw, own, "approve", rid, "--note", "mine")
        assert refused.exit_code == 1 and "its own request" in refused.output
        # Outside the approvers' groups: refused (403), and the request is not shown.
        outsider = api_gw.token("user:eve", groups=("pii-readers",))
        refused = pgwarden(api_gw, outsider, "approve", rid)
        assert refused.exit_code == 1, refused.output
        assert "only members of engineers or admins" in refused.output
        assert "HTTP 403" in refused.output
        assert pgwarden(api_gw, outsider, "list", "--json").stdout.strip() == ""
        hidden = pgwarden(api_gw, outsider, "show", rid)
        assert hidden.exit_code == 1 and "no approval request" in hidden.output
        unknown = pgwarden(api_gw, outsider, "approve", "apr-0000000000")
        assert unknown.exit_code == 1 and "HTTP 404" in unknown.output
        assert held.running and stored(api_gw, rid).status == "pending"
        missing = pgwarden(api_gw, "", "list")
        assert missing.exit_code == 1 and "PGWARDEN_TOKEN" in missing.output
        pgwarden(api_gw, api_gw.token("user:ann", groups=("engineers",)), "deny", rid)
        assert held.done()
    finally:
        held.close()


def test_watch_prints_a_request_as_it_comes(api_gw: Any, table: str) -> None:
    approver = api_gw.token("user:ann", groups=("engineers",))
    watched: list[Any] = []
    watcher = threading.Thread(
        target=lambda: watched.append(
            pgwarden(
                api_gw,
                approver,
                "list",
                "--status",
                "pending",
                "--watch",
                "--watch-for",
                "4",
                "--json",
            )
        )
    )
    watcher.start()
    time.sleep(1.0)
    held = Held(api_gw.dsn(agent(api_gw)), lambda c: simple(c, f'DELETE FROM "{table}"'))
    try:
        rid = held.request_id()
        watcher.join(20)
        assert watched and watched[0].exit_code == 0, watched
        assert rid in watched[0].stdout
    finally:
        pgwarden(api_gw, approver, "deny", rid)
        held.done()
        held.close()


def test_a_window_grant_from_the_cli_is_listed(api_gw: Any) -> None:
    approver = api_gw.token("user:root", groups=("admins",))
    held = Held(api_gw.dsn(agent(api_gw)), lambda c: simple(c, "DELETE FROM orders WHERE id = -1"))
    try:
        rid = held.request_id()
        done = pgwarden(api_gw, approver, "approve", rid, "--window", "10m")
        assert done.exit_code == 0, done.output
        assert "any statement of its shape" in done.stdout
        assert held.done() and held.error is None, held.error
        listed = pgwarden(api_gw, approver, "grants", "--json")
        grants = [json.loads(line) for line in listed.stdout.splitlines()]
        assert any(g["request_id"] == rid and g["kind"] == "window" for g in grants)
        bad = pgwarden(api_gw, approver, "approve", rid, "--window", "soon")
        assert bad.exit_code == 1 and "--window" in bad.output
    finally:
        held.close()
