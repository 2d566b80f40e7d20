"""The control store, both backends: votes judged atomically (self-approval, groups, four
eyes), holds settled once, one-time grants taken once by racing sessions, and changes told
to every store on the same database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.control import (
    ApprovalRequest,
    Ballot,
    ControlStore,
    UnknownRequest,
    VoteRefused,
)
from gateway.control.postgres_store import PostgresControlStore
from gateway.control.rules import new_id
from gateway.control.sqlite_store import SqliteControlStore

pytestmark = pytest.mark.server


def held(required: int = 1, wait: float = 60.0, key: str = "key-delete-1") -> ApprovalRequest:
    now = time.time()
    return ApprovalRequest(
        id=new_id("apr"),
        created=now,
        status="pending",
        principal={"subject": "agent:bot", "groups": ["ai-agents", "engineers"]},
        target="app",
        database="appdb",
        session_id="s-1",
        instance="gw-1",
        text="DELETE FROM orders WHERE id = 1",
        protocol="simple",
        params=(),
        facts=({"command": "DELETE"},),
        fingerprint="fp-delete",
        grant_key=key,
        reasons=("ai-agents may not write without approval",),
        approvers=("engineers", "admins"),
        approvers_required=required,
        justification="cleanup",
        decision_id="d-1",
        audit_record="gw-1:1",
        wait_until=now + wait,
    )


def ballot(
    subject: str, verdict: str = "approve", groups: tuple[str, ...] = ("engineers",)
) -> Ballot:
    return Ballot(subject, groups, verdict, f"note by {subject}")  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgres"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, control_dsn: str
) -> AsyncIterator[ControlStore]:
    s: ControlStore
    if request.param == "sqlite":
        s = SqliteControlStore(tmp_path / "control.sqlite3")
    else:
        s = PostgresControlStore(control_dsn)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def test_a_request_is_stored_and_listed(store: ControlStore) -> None:
    r = held()
    await store.create_request(r)
    got = await store.request(r.id)
    assert got == r
    assert r.id in [x.id for x in await store.requests("pending")]
    assert await store.request("apr-none") is None


async def test_who_may_vote(store: ControlStore) -> None:
    r = held()
    await store.create_request(r)
    now = time.time()
    with pytest.raises(VoteRefused, match="its own request"):
        # The requester is an engineer too: still not its own approver.
        await store.vote(r.id, ballot("agent:bot"), now, 900)
    with pytest.raises(VoteRefused, match="only members of engineers or admins"):
        await store.vote(r.id, ballot("user:eve", groups=("ai-agents",)), now, 900)
    with pytest.raises(UnknownRequest):
        await store.vote("apr-none", ballot("user:ann"), now, 900)
    judged = await store.vote(r.id, ballot("user:ann"), now, 900)
    assert judged.decided and judged.request.status == "approved" and judged.grant is None
    with pytest.raises(VoteRefused, match="is approved"):
        await store.vote(r.id, ballot("user:bob"), now, 900)
    stored = await store.request(r.id)
    assert stored is not None and [v.subject for v in stored.votes] == ["user:ann"]


async def test_four_eyes_needs_two_distinct_approvers(store: ControlStore) -> None:
    r = held(required=2)
    await store.create_request(r)
    now = time.time()
    first = await store.vote(r.id, ballot("user:ann"), now, 900)
    assert not first.decided and first.request.status == "pending"
    with pytest.raises(VoteRefused, match="already voted"):
        await store.vote(r.id, ballot("user:ann"), now, 900)
    second = await store.vote(r.id, ballot("user:bob", groups=("admins",)), now, 900)
    assert second.decided and second.request.status == "approved"


async def test_deny_decides_with_its_note(store: ControlStore) -> None:
    r = held(required=2)
    await store.create_request(r)
    judged = await store.vote(r.id, ballot("user:ann", "deny"), time.time(), 900)
    assert judged.request.status == "denied" and judged.request.note == "note by user:ann"


async def test_a_hold_settles_once_and_a_late_approval_is_a_grant(store: ControlStore) -> None:
    r = held()
    await store.create_request(r)
    now = time.time()
    after, moved = await store.settle(r.id, "timed_out", now)
    assert moved and after.status == "timed_out"
    _, again = await store.settle(r.id, "withdrawn", now)
    assert not again
    judged = await store.vote(r.id, ballot("user:ann"), now, 900)
    assert judged.request.status == "granted"
    grant = judged.grant
    assert grant is not None and grant.kind == "once" and grant.key == r.grant_key
    assert grant.expires == pytest.approx(now + 900)
    # Another principal, target or statement gets nothing from it.
    assert await store.use_grant("agent:other", "app", r.grant_key, "fp", now, "s") is None
    assert await store.use_grant("agent:bot", "other", r.grant_key, "fp", now, "s") is None
    assert await store.use_grant("agent:bot", "app", "key-other", "fp", now, "s") is None
    # Two sessions racing for it: one gets it.
    taken = await asyncio.gather(
        *(store.use_grant("agent:bot", "app", r.grant_key, "fp", now, f"s{i}") for i in range(4))
    )
    assert sum(g is not None for g in taken) == 1
    assert await store.use_grant("agent:bot", "app", r.grant_key, "fp", now, "s9") is None


async def test_an_expired_grant_is_not_used(store: ControlStore) -> None:
    r = held()
    await store.create_request(r)
    await store.settle(r.id, "timed_out", time.time())
    judged = await store.vote(r.id, ballot("user:ann"), time.time(), 0.05)
    assert judged.grant is not None
    later = time.time() + 1
    assert await store.use_grant("agent:bot", "app", r.grant_key, "fp", later, "s") is None


async def test_a_window_grant_covers_the_shape_until_its_end(store: ControlStore) -> None:
    r = held()
    await store.create_request(r)
    now = time.time()
    vote = Ballot("user:ann", ("admins",), "approve", "for the migration", window_seconds=60)
    judged = await store.vote(r.id, vote, now, 900)
    assert judged.request.status == "approved"
    assert judged.grant is not None and judged.grant.kind == "window"
    for _ in range(3):  # not consumed
        got = await store.use_grant("agent:bot", "app", "any-key", "fp-delete", now, "s")
        assert got is not None and got.id == judged.grant.id
    assert await store.use_grant("agent:bot", "app", "k", "fp-delete", now + 61, "s") is None
    assert judged.grant.id in [g.id for g in await store.grants(now)]


async def test_postgres_tells_every_gateway_of_a_change(control_dsn: str) -> None:
    one, other = PostgresControlStore(control_dsn), PostgresControlStore(control_dsn)
    await one.start()
    await other.start()
    try:
        seen: list[str] = []
        arrived = asyncio.Event()

        def told(request_id: str) -> None:
            seen.append(request_id)
            arrived.set()

        other.on_change(told)
        r = held()
        await one.create_request(r)
        await asyncio.wait_for(arrived.wait(), 10)
        arrived.clear()
        await one.vote(r.id, ballot("user:ann"), time.time(), 900)
        await asyncio.wait_for(arrived.wait(), 10)
        assert seen.count(r.id) >= 2
    finally:
        await one.close()
        await other.close()


async def test_an_ended_grant_is_swept_once(store: ControlStore) -> None:
    r = held()
    await store.create_request(r)
    now = time.time()
    await store.settle(r.id, "timed_out", now)
    unused = (await store.vote(r.id, ballot("user:ann"), now, 0.01)).grant
    used_request = held(key="key-delete-2")
    await store.create_request(used_request)
    await store.settle(used_request.id, "timed_out", now)
    used = (await store.vote(used_request.id, ballot("user:ann"), now, 0.01)).grant
    assert unused is not None and used is not None
    assert await store.use_grant("agent:bot", "app", used.key, "fp", now, "s") is not None
    later = now + 1
    swept = await asyncio.gather(store.expire_grants(later), store.expire_grants(later))
    ids = [g.id for batch in swept for g in batch]
    # The unused one ends once; a used one-time grant has no end to record.
    assert ids.count(unused.id) == 1 and used.id not in ids
    assert unused.id not in [g.id for g in await store.expire_grants(later)]
