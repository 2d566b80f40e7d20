"""Helpers of the approvals tests: a statement run on its own thread while it is held, the
request id from the notice the client got, votes through the gateway's own desk."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from typer.testing import CliRunner

from cli.main import app
from gateway.control.models import ApprovalRequest
from gateway.control.rules import Judgement

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


def principal_of(gateway: Any, token: str) -> Any:
    return gateway.run(gateway.gateway.verifier.verify(token))


def vote(
    gateway: Any,
    request_id: str,
    token: str,
    verdict: str = "approve",
    note: str = "looks fine",
    window_seconds: float | None = None,
) -> Judgement:
    desk = gateway.gateway.approvals
    approver = principal_of(gateway, token)
    judged: Judgement = gateway.run(desk.vote(request_id, approver, verdict, note, window_seconds))
    return judged


def stored(gateway: Any, request_id: str) -> ApprovalRequest:
    request: ApprovalRequest | None = gateway.run(
        gateway.gateway.approvals.store.request(request_id)
    )
    assert request is not None, request_id
    return request


def wait_status(gateway: Any, request_id: str, status: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stored(gateway, request_id).status == status:
            return
        time.sleep(0.05)
    raise AssertionError(f"{request_id} is {stored(gateway, request_id).status}, not {status}")


def approval_events(gateway: Any, session_id: str, want: int, timeout: float = 15) -> list[str]:
    """The `approval` audit records of a session, oldest first, as their event names (the
    index is fed from the log shortly after a record is written: polled)."""
    deadline = time.monotonic() + timeout
    events: list[str] = []
    while time.monotonic() < deadline:
        result = CliRunner().invoke(
            app,
            ["audit", "search", "--kind", "approval", "--session", session_id, "--json"],
            env={"PGWARDEN_STATE_DIR": str(gateway.settings.state_dir)},
        )
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        events = [r["record"]["event"] for r in sorted(records, key=lambda r: r["seq"])]
        if len(events) >= want:
            return events
        time.sleep(0.1)
    return events
