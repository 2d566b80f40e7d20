"""Helpers of the approvals tests: a statement run on its own thread while it is held, the
request id from the notice the client got, votes through the gateway's own desk."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from typer.testing import CliRunner

from cli.localpg import LocalCluster
from cli.main import app
from gateway.control.models import ApprovalRequest
from gateway.control.rules import Judgement
from tests.harness import RunningGateway, start_gateway, stop_gateway

from . import direct, fresh_table

REQUEST_ID = re.compile(r"\b(apr-[0-9a-f]{10})\b")


@dataclass(frozen=True)
class Notice:
    message: str
    detail: str
    hint: str


class Held:
    """`work(conn)` on a fresh psycopg connection of `dsn`, on a thread of its own; the
    notices the connection got, its result or its error."""

    def __init__(
        self, dsn: str, work: Callable[[psycopg.Connection[Any]], Any], autocommit: bool = True
    ) -> None:
        self.notices: list[Notice] = []
        self.result: Any = None
        self.error: BaseException | None = None
        self.conn = psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10)
        # A Diagnostic is valid only inside the handler: its text is kept.
        self.conn.add_notice_handler(
            lambda d: self.notices.append(
                Notice(d.message_primary or "", d.message_detail or "", d.message_hint or "")
            )
        )
        self._work = work
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._work(self.conn)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def request_id(self, timeout: float = 15) -> str:
        """The id in the notice the gateway sent when it held the statement."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in self.notices:
                found = REQUEST_ID.search(n.message)
                if found:
                    return found.group(1)
            if not self._thread.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no approval notice: {self.notices!r} {self.error!r}")

    def done(self, timeout: float = 30) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self.conn.close()


def principal_of(gateway: RunningGateway, token: str) -> Any:
    verifier = gateway.gateway.verifier
    assert verifier is not None
    return gateway.run(verifier.verify(token))


def vote(
    gateway: RunningGateway,
    request_id: str,
    token: str,
    verdict: str = "approve",
    note: str = "looks fine",
    window_seconds: float | None = None,
) -> Judgement:
    desk = gateway.gateway.approvals
    assert desk is not None
    approver = principal_of(gateway, token)
    judged: Judgement = gateway.run(desk.vote(request_id, approver, verdict, note, window_seconds))
    return judged


def stored(gateway: RunningGateway, request_id: str) -> ApprovalRequest:
    desk = gateway.gateway.approvals
    assert desk is not None
    request: ApprovalRequest | None = gateway.run(desk.store.request(request_id))
    assert request is not None, request_id
    return request


def wait_status(gateway: RunningGateway, request_id: str, status: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stored(gateway, request_id).status == status:
            return
        time.sleep(0.05)
    raise AssertionError(f"{request_id} is {stored(gateway, request_id).status}, not {status}")


def approval_records(
    gateway: RunningGateway, *args: str, want: int, timeout: float = 15
) -> list[dict[str, Any]]:
    """`approval` audit records found by `pgwarden audit search --kind approval *args`, oldest
    first (the index is fed from the log shortly after a record is written: polled until
    `want` are found)."""
    deadline = time.monotonic() + timeout
    records: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = CliRunner().invoke(
            app,
            ["audit", "search", "--kind", "approval", *args, "--json"],
            env={"PGWARDEN_STATE_DIR": str(gateway.settings.state_dir)},
        )
        assert result.exit_code == 0, result.output
        found = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        records = [r["record"] for r in sorted(found, key=lambda r: r["seq"])]
        if len(records) >= want:
            return records
        time.sleep(0.1)
    return records


def statement_record(
    gateway: RunningGateway, request_id: str, until: str = "", timeout: float = 15
) -> str:
    """`pgwarden audit show --json` of the held statement's own record (with the records
    linked to it), polled until it holds `until`."""
    record = stored(gateway, request_id).audit_record
    assert record is not None
    deadline = time.monotonic() + timeout
    shown = ""
    while time.monotonic() < deadline:
        result = CliRunner().invoke(
            app,
            ["audit", "show", record, "--json"],
            env={"PGWARDEN_STATE_DIR": str(gateway.settings.state_dir)},
        )
        shown = result.stdout
        if result.exit_code == 0 and until in shown:
            break
        time.sleep(0.1)
    return shown


def approval_events(gateway: RunningGateway, session_id: str, want: int) -> list[str]:
    """The events of a session's `approval` records, oldest first."""
    return [r["event"] for r in approval_records(gateway, "--session", session_id, want=want)]


def gateway_for_approvals(
    cluster: LocalCluster, opa: Path, extra_environ: dict[str, str] | None = None, **settings: Any
) -> Iterator[RunningGateway]:
    """A gateway of a module's own (settings as for start_gateway), on a fresh state dir."""
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-approvals-"))
    gw = start_gateway(state, cluster, opa, extra_environ, **settings)
    try:
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)


def own_table(gw: Any) -> Iterator[str]:
    """A fresh table (id, v; 3 rows) for one test, dropped after it."""
    name = fresh_table(gw)
    yield name
    direct(gw, f'DROP TABLE IF EXISTS "{name}"')


def agent(gw: Any) -> str:
    """The requester of the approvals tests: an AI agent."""
    return str(gw.token("agent:bot", groups=("ai-agents",)))
