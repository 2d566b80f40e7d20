"""Decisions from the real OPA binary, and fail-closed behaviour when OPA misbehaves."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.policy.cache import DecisionCache
from gateway.policy.opa import OpaDecider
from gateway.policy.sidecar import OpaSidecar
from gateway.policy.transport import OpaTransport

from .conftest import write_policy

pytestmark = pytest.mark.server


def statement_input(
    category: str, groups: list[str], columns: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    return {
        "version": 1,
        "principal": {
            "subject": "agent:t",
            "issuer": "i",
            "groups": groups,
            "token_id": "j",
            "claims": {},
        },
        "target": {"name": "app", "database": "appdb", "labels": {}},
        "session": {
            "id": "s",
            "client_addr": "127.0.0.1",
            "application_name": "t",
            "user": "u",
            "in_transaction": False,
        },
        "statement": {"text": "x", "category": category, "columns": columns or []},
    }


def decider_for(url: str, timeout: float = 1.0) -> OpaDecider:
    transport = OpaTransport(url, decision_path="pgwarden/decision", timeout_seconds=timeout)
    return OpaDecider(transport, timeout_seconds=timeout)


@pytest.fixture
async def decider(sidecar: OpaSidecar) -> AsyncIterator[OpaDecider]:
    decider = decider_for(sidecar.url)
    try:
        yield decider
    finally:
        await decider.transport.aclose()


async def test_allow_round_trip_with_masks(decider: OpaDecider, sidecar: OpaSidecar) -> None:
    columns = [{"schema": "public", "table": "customers", "column": "email", "usage": "output"}]
    decision = await decider.decide(statement_input("read", ["ai-agents"], columns), not_after=None)
    assert decision.action == "allow"
    assert decision.reasons == ("reads are allowed",)
    assert [(m.column, m.method) for m in decision.masks] == [("email", "email")]
    assert decision.bundle_revision == sidecar.revision
    assert decision.bundle_revision is not None and decision.bundle_revision.startswith("test-1+")
    assert decision.decision_id


async def test_approve_round_trip(decider: OpaDecider) -> None:
    decision = await decider.decide(statement_input("write", ["ai-agents"]), not_after=None)
    assert (decision.action, decision.approvers) == ("approve", ("admins",))


async def test_policy_deny_round_trip(decider: OpaDecider) -> None:
    decision = await decider.decide(statement_input("ddl", ["ai-agents"]), not_after=None)
    assert (decision.action, decision.reasons, decision.refused) == (
        "deny",
        ("no rule allows this",),
        False,
    )


async def test_decision_ids_are_distinct(decider: OpaDecider) -> None:
    a = await decider.decide(statement_input("read", []), not_after=None)
    b = await decider.decide(statement_input("read", []), not_after=None)
    assert a.decision_id != b.decision_id


async def test_undefined_decision_is_a_deny(opa_binary: Path, short_tmp: Path) -> None:
    rego_dir, bundle_dir = write_policy(short_tmp / "src", "package pgwarden\n\nother := true\n")
    async with OpaSidecar(
        opa_binary=opa_binary, rego_dir=rego_dir, bundle_dir=bundle_dir, work_dir=short_tmp / "opa"
    ) as opa:
        decider = decider_for(opa.url)
        decision = await decider.decide(statement_input("read", ["admins"]), not_after=None)
        await decider.transport.aclose()
    assert (decision.action, decision.reasons) == ("deny", ("policy decision is undefined",))


async def test_opa_stopped_is_a_deny(
    opa_binary: Path, short_tmp: Path, policy_dirs: tuple[Path, Path]
) -> None:
    rego_dir, bundle_dir = policy_dirs
    opa = OpaSidecar(
        opa_binary=opa_binary, rego_dir=rego_dir, bundle_dir=bundle_dir, work_dir=short_tmp / "opa"
    )
    await opa.start()
    decider = decider_for(opa.url)
    assert (await decider.decide(statement_input("read", []), not_after=None)).action == "allow"
    await opa.stop()
    decision = await decider.decide(statement_input("read", []), not_after=None)
    await decider.transport.aclose()
    assert decision.action == "deny"
    assert decision.refused
    # The reason reaches the client: it says what to do, not where OPA listens (the log has it).
    assert decision.reasons[0].startswith("OPA unreachable: the policy engine is not answering")
    assert "unix://" not in decision.reasons[0] and str(short_tmp) not in decision.reasons[0]


async def test_nothing_listening_on_tcp_is_a_deny() -> None:
    decider = decider_for("http://127.0.0.1:9")
    decision = await decider.decide(statement_input("read", []), not_after=None)
    await decider.transport.aclose()
    assert decision.action == "deny"
    assert decision.reasons[0].startswith("OPA unreachable: the policy engine is not answering")
    assert "127.0.0.1:9" not in decision.reasons[0]


FaultHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def fault_server(handler: FaultHandler) -> tuple[asyncio.Server, str]:
    """A tiny HTTP server that stands in for a misbehaving OPA."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)


def answer(status: str, body: bytes) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (answer("200 OK", b"not json at all"), "OPA answer is not valid JSON"),
        (
            answer("200 OK", b'{"result": {"action": "yes"}}'),
            "policy decision is malformed: unknown action 'yes'",
        ),
        (answer("200 OK", b"[]"), "OPA answer is not a JSON object"),
        (
            answer("500 Internal Server Error", b'{"code": "internal_error", "message": "boom"}'),
            "OPA error: HTTP 500: internal_error: boom",
        ),
        (b"garbage\r\n\r\n", None),
    ],
)
async def test_garbage_answers_are_a_deny(reply: bytes, reason: str | None) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server, url = await fault_server(handler)
    decider = decider_for(url)
    async with server:
        decision = await decider.decide(statement_input("read", ["admins"]), not_after=None)
    await decider.transport.aclose()
    assert decision.action == "deny"
    assert decision.refused
    if reason is not None:
        assert decision.reasons == (reason,)
    else:
        assert decision.reasons[0].startswith("OPA unreachable:")


async def test_slow_opa_is_a_deny_within_the_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        # Never answers: waits until the client gives up and hangs up.
        await reader.read()
        writer.close()

    server, url = await fault_server(handler)
    decider = decider_for(url, timeout=0.2)
    async with server:
        started = time.monotonic()
        decision = await decider.decide(statement_input("read", ["admins"]), not_after=None)
        elapsed = time.monotonic() - started
        await decider.transport.aclose()
        server.close()
    assert decision.action == "deny"
    assert decision.reasons[0].startswith("OPA did not answer")
    assert 0.15 < elapsed < 0.5


async def test_policy_change_takes_effect_without_restart_and_cache_serves_nothing_stale(
    sidecar: OpaSidecar, policy_dirs: tuple[Path, Path]
) -> None:
    rego_dir, _ = policy_dirs
    pid = sidecar.pid
    cache = DecisionCache(decider_for(sidecar.url), max_entries=100)
    sidecar.listen(cache)
    read = statement_input("read", ["ai-agents"])
    assert (await cache.decide(read, not_after=None)).action == "allow"
    assert (await cache.decide(read, not_after=None)).cache_hit
    old_revision = sidecar.revision

    (rego_dir / "decision.rego").write_text(
        'package pgwarden\n\ndecision := {"action": "deny", "reasons": ["locked down"]}\n'
    )
    deadline = time.monotonic() + 10
    seen: list[str] = []
    while time.monotonic() < deadline:
        decision = await cache.decide(read, not_after=None)
        seen.append(decision.action)
        if decision.action == "deny":
            break
        await asyncio.sleep(0.02)
    assert seen[-1] == "deny", "the new policy never took effect"
    # Once the new policy answered, no decision of the old one comes back, cached or not.
    for _ in range(20):
        decision = await cache.decide(read, not_after=None)
        assert (decision.action, decision.reasons) == ("deny", ("locked down",))
    assert decision.cache_hit
    assert decision.bundle_revision != old_revision
    assert sidecar.pid == pid
    assert isinstance(cache.inner, OpaDecider)
    await cache.inner.transport.aclose()


async def test_broken_policy_keeps_the_last_good_one(
    sidecar: OpaSidecar, decider: OpaDecider, policy_dirs: tuple[Path, Path]
) -> None:
    rego_dir, _ = policy_dirs
    revision = sidecar.revision
    (rego_dir / "decision.rego").write_text("package pgwarden\n\ndecision := {\n")
    deadline = time.monotonic() + 5
    # Polling: the sidecar's watcher exposes state, not events, to its observers.
    while sidecar.last_error is None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert sidecar.last_error is not None and "decision.rego" in sidecar.last_error
    decision = await decider.decide(statement_input("read", []), not_after=None)
    assert (decision.action, decision.bundle_revision) == ("allow", revision)


@pytest.mark.slow
async def test_sidecar_restarts_opa_after_kill_and_refuses_meanwhile(sidecar: OpaSidecar) -> None:
    cache = DecisionCache(decider_for(sidecar.url, timeout=0.5), max_entries=100)
    sidecar.listen(cache)
    read = statement_input("read", ["ai-agents"])
    await cache.decide(read, not_after=None)
    assert (await cache.decide(read, not_after=None)).cache_hit
    pid = sidecar.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # The supervisor learns of the death from the child watcher and suspends the cache (no
    # revision is in force; the entries stay for OPA's return on the same revision); from
    # then on nothing is allowed until OPA is back.
    deadline = time.monotonic() + 5
    while cache.revision is not None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    assert len(cache)

    refusals = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        decision = await cache.decide(read, not_after=None)
        if decision.action == "allow" and sidecar.pid != pid:
            break
        # While OPA is down nothing is allowed, not even from the cache.
        assert decision.action == "deny" and decision.refused and not decision.cache_hit
        refusals += 1
        await asyncio.sleep(0.01)
    assert sidecar.pid != pid
    assert sidecar.restarts >= 1
    assert refusals > 0
    assert decision.action == "allow"
    assert isinstance(cache.inner, OpaDecider)
    await cache.inner.transport.aclose()


async def test_no_decision_is_reused_once_opa_has_exited_even_before_the_sidecar_hears(
    sidecar: OpaSidecar,
) -> None:
    cache = DecisionCache(decider_for(sidecar.url), max_entries=10, opa_alive=sidecar.alive)
    sidecar.listen(cache)
    read = statement_input("read", ["ai-agents"])
    await cache.decide(read, not_after=None)
    assert (await cache.decide(read, not_after=None)).cache_hit
    assert sidecar.alive()
    pid = sidecar.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # Without yielding to the event loop: it has not collected the exit, nor told the cache.
    deadline = time.monotonic() + 10
    while True:
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            if os.waitid(os.P_PID, pid, flags) is not None:  # noqa: ASYNC222
                break
        except ChildProcessError:  # collected by a watcher thread already
            break
        assert time.monotonic() < deadline
        time.sleep(0.001)  # noqa: ASYNC251 - the loop must not run meanwhile
    assert not sidecar.alive() and cache.revision is None
    assert not (await cache.decide(read, not_after=None)).cache_hit
    assert isinstance(cache.inner, OpaDecider)
    await cache.inner.transport.aclose()
