"""Structured logs of a real gateway: JSON lines for a session with a refused login, a denied
statement and its end, with the decision id; never the token, a parameter or the text."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any, Literal

import psycopg
import pytest

from gateway.logs import configure_logging, redact
from gateway.settings import LogSettings
from tests.harness import RunningGateway
from tests.integration import DECISION_ID, REFUSED, connect, refusal_of, simple

pytestmark = [pytest.mark.server]

PARAMETER = "param-never-logged-7f3a"
LITERAL = "literal-never-logged-91c2"


@contextlib.contextmanager
def captured(fmt: Literal["json", "human"]) -> Iterator[io.StringIO]:
    """The process's logs (the test gateway runs on a thread of this process) in `fmt`;
    the logging setup is restored afterwards."""
    names = ("", "httpx", "httpcore", "uvicorn.access")
    saved = {n: logging.getLogger(n).level for n in names}
    stream = io.StringIO()
    handler = configure_logging(LogSettings(format=fmt, level="INFO"), stream)
    try:
        yield stream
    finally:
        logging.getLogger().removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    with captured("json") as stream:
        yield stream


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    out = []
    for line in stream.getvalue().splitlines():
        entry = json.loads(line)  # every line is one JSON object
        assert isinstance(entry, dict), line
        for key in ("ts", "level", "event", "msg"):
            assert key in entry, (key, line)
        out.append(entry)
    return out


def wait_for_line(stream: io.StringIO, event: str, session_id: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(e["event"] == event and e.get("session_id") == session_id for e in lines_of(stream)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no {event} line for session {session_id}")


def test_a_session_logs_json_lines_with_the_decision_id_and_no_secret(
    gateway: RunningGateway, json_log: io.StringIO
) -> None:
    token = gateway.token("agent:logged", groups=("engineers",))
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[:-6]}AAAAAA"

    with pytest.raises(psycopg.OperationalError):
        connect(gateway.dsn(forged))

    with connect(gateway.dsn(token)) as conn:
        assert simple(conn, "SELECT 1") == [(1,)]
        with pytest.raises(psycopg.Error) as denied:
            simple(conn, f"SELECT pg_read_file('/{LITERAL}')")
        with pytest.raises(psycopg.Error) as denied_with_param:
            conn.execute("SELECT pg_read_file(%s)", [PARAMETER], prepare=True)
    ids = []
    for exc in (denied.value, denied_with_param.value):
        refusal = refusal_of(exc)
        assert refusal.sqlstate == REFUSED
        found = DECISION_ID.search(refusal.detail or "")
        assert found is not None, refusal
        ids.append(found.group(0).removeprefix("decision id: "))

    entries = lines_of(json_log)
    refused = [e for e in entries if e["event"] == "statement_refused"]
    assert {e["decision_id"] for e in refused} >= set(ids), refused
    ours = next(e for e in refused if e["decision_id"] == ids[0])
    session_id = ours["session_id"]
    assert ours["subject"] == "agent:logged"
    assert ours["target"] == "app" and ours["action"] == "deny"
    assert ours["reasons"] and ours["commands"] == ["SELECT"]
    assert ours["level"] == "info" and ours["logger"] == "pgwarden.gate"
    wait_for_line(json_log, "session_end", session_id)
    # A second of OPA revision polls and decisions over httpx has passed: none logged.
    time.sleep(1.2)

    entries = lines_of(json_log)
    mine = [e for e in entries if e.get("session_id") == session_id]
    events = [e["event"] for e in mine]
    assert events[0] == "session_start" and events[-1] == "session_end", events
    assert events.count("statement_refused") == 2, events
    start = mine[0]
    assert start["subject"] == "agent:logged" and start["groups"] == ["engineers"]
    assert start["target"] == "app" and start["client_addr"] == "127.0.0.1"
    assert mine[-1]["reason"] == "client quit"
    refused_login = [e for e in entries if e["event"] == "auth_failure"]
    assert refused_login and refused_login[-1]["level"] == "warning", entries
    assert "subject" not in refused_login[-1]

    text = json_log.getvalue()
    for secret in (token, forged, signature, f"{payload}.", PARAMETER, LITERAL):
        assert secret not in text, secret
    assert not [e for e in entries if e["logger"].startswith(("httpx", "httpcore"))], [
        e["msg"] for e in entries if e["logger"].startswith("httpx")
    ]


def test_human_format_is_one_line_per_event_with_its_fields() -> None:
    with captured("human") as stream:
        logging.getLogger("pgwarden.test").info(
            "session started", extra={"event": "session_start", "session_id": "s-1"}
        )
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert "INFO pgwarden.test: session started event=session_start session_id=s-1" in line


def test_a_token_in_a_message_is_cut_from_the_line() -> None:
    """The backstop for a token that reaches a message through an exception's text."""
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLWJ5dGVz"
    assert jwt not in redact(f"token rejected: {jwt} is bad")
    with captured("json") as stream:
        logging.getLogger("pgwarden.test").warning("saw %s", jwt, extra={"token": jwt})
    assert jwt not in stream.getvalue()
    assert json.loads(stream.getvalue())["msg"] == "saw <token>"
