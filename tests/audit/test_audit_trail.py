"""The audit trail over both stores: records, group commit, durability, tampering, retention."""

from __future__ import annotations

import asyncio
import time

import orjson

from gateway.audit import AuditKeyring, AuditWriter, RecordFilter, StoredRecord, verify
from gateway.audit.chain import key_for_epoch, link_of
from gateway.audit.records import parse_record_id
from gateway.identity.principal import Principal
from gateway.policy.decision import Decision

from .conftest import CHAIN, AuditRig, session_event, statement_outcome, statement_request


async def _fill(rig: AuditRig, n: int) -> tuple[AuditWriter, list[str]]:
    writer = rig.writer()
    await writer.start()
    ids = [await writer.request(statement_request(f"SELECT {i}")) for i in range(n)]
    return writer, ids


async def test_every_record_kind_round_trips_and_verifies(rig: AuditRig) -> None:
    async with rig.writer() as writer:
        await writer.session(session_event("auth_failure", "token expired"))
        await writer.session(session_event("session_start"))
        req_id = await writer.request(statement_request("SELECT id, email FROM customers"))
        await writer.outcome(statement_outcome(req_id))
        await writer.outcome(
            statement_outcome(
                req_id, command_tag=None, rows=None, sqlstate="42501", error_message="denied"
            )
        )
        await writer.session(session_event("session_end", "client quit"))

    store = rig.store()
    chain, seq = parse_record_id(req_id) or ("", 0)
    stored = await store.get(chain, seq)
    assert stored is not None
    record = stored.record()
    assert record["principal"] == {
        "subject": "agent:ci-bot",
        "issuer": "pgwarden",
        "groups": ["ai-agents"],
        "token_id": "jti-1",
    }
    assert record["decision"]["action"] == "allow"
    assert record["decision"]["decision_id"] == "dec-1"
    assert record["decision"]["bundle_revision"] == "rev-7"
    assert record["decision"]["cache_hit"] is True
    assert record["decision"]["reasons"] == ["ai-agents may read"]
    assert record["approval_id"] == "appr-1"
    assert record["masked_columns"] == ["public.customers.email"]
    assert record["params"] == ["42", None]
    assert record["fingerprint"] == "fp-SELECT id, email FROM customers"
    assert (stored.subject, stored.target, stored.action) == ("agent:ci-bot", "app", "allow")

    kinds = [r.kind for r in [x async for x in store.scan(CHAIN)]]
    assert kinds == [
        "auth_failure", "session_start", "request", "outcome", "outcome", "session_end",
    ]  # fmt: skip
    outcome = await store.get(CHAIN, 4)
    assert outcome is not None
    assert outcome.request_id == req_id
    assert outcome.record()["recorded_rows"] == [["1", "j***@example.com"], ["2", None]]
    assert outcome.record()["bytes_out"] == 120
    failed = await store.get(CHAIN, 5)
    assert failed is not None and failed.record()["sqlstate"] == "42501"
    ended = await store.get(CHAIN, 6)
    assert ended is not None and ended.record()["reason"] == "client quit"
    assert (await rig.verify()).ok


async def test_recorded_rows_are_bounded(rig: AuditRig) -> None:
    rows = tuple((str(i), "x" * 10) for i in range(50))
    async with rig.writer(rows_limit=5) as writer:
        await writer.outcome(statement_outcome("gw-test:1", recorded_rows=rows))
    out = await rig.store().get(CHAIN, 1)
    assert out is not None
    assert len(out.record()["recorded_rows"]) == 5
    assert out.record()["recorded_rows_truncated"] is True


async def test_concurrent_requests_share_commits(rig: AuditRig) -> None:
    writer = rig.writer()
    await writer.start()
    store = writer.store
    ids = await asyncio.gather(
        *(writer.request(statement_request(f"SELECT {i}")) for i in range(400))
    )
    await writer.close()
    assert len(set(ids)) == 400
    assert 1 <= store.commits < 400 / 10, store.commits
    assert len([r async for r in rig.store().scan(CHAIN)]) == 400
    assert (await rig.verify()).ok


async def test_request_is_durable_when_it_returns(rig: AuditRig) -> None:
    async with rig.writer() as writer:
        for i in range(5):
            rid = await writer.request(statement_request(f"SELECT {i}"))
            _, seq = parse_record_id(rid) or ("", 0)
            # Another connection, from outside the writer, sees it committed.
            rows = await rig.sql(
                "SELECT text FROM audit_record WHERE chain = ? AND seq = ?", CHAIN, seq
            )
            assert [tuple(r) for r in rows] == [(f"SELECT {i}",)]


async def _tampered(rig: AuditRig, n: int = 8) -> None:
    writer, _ = await _fill(rig, n)
    await writer.close()
    assert (await rig.verify()).ok


async def _only_problem(rig: AuditRig) -> tuple[str, int, str]:
    report = await rig.verify()
    assert not report.ok
    (problem,) = report.problems
    return problem.kind, problem.seq, problem.detail


async def test_verify_names_an_edited_body(rig: AuditRig) -> None:
    await _tampered(rig)
    (row,) = await rig.sql("SELECT body FROM audit_record WHERE seq = 4")
    body = bytes(row[0]).replace(b"SELECT 3", b"SELECT 9")
    await rig.sql("UPDATE audit_record SET body = ? WHERE seq = 4", body)
    kind, seq, _ = await _only_problem(rig)
    assert (kind, seq) == ("changed", 4)


async def test_verify_names_an_edited_search_column(rig: AuditRig) -> None:
    await _tampered(rig)
    await rig.sql("UPDATE audit_record SET subject = 'someone-else' WHERE seq = 6")
    kind, seq, detail = await _only_problem(rig)
    assert (kind, seq) == ("changed", 6)
    assert "subject" in detail


async def test_verify_names_a_deleted_record(rig: AuditRig) -> None:
    await _tampered(rig)
    await rig.sql("DELETE FROM audit_record WHERE seq = 3")
    kind, seq, _ = await _only_problem(rig)
    assert (kind, seq) == ("missing", 3)


async def test_verify_names_a_deleted_and_renumbered_record(rig: AuditRig) -> None:
    await _tampered(rig)
    await rig.sql("DELETE FROM audit_record WHERE seq = 3")
    for seq in range(4, 9):
        await rig.sql("UPDATE audit_record SET seq = ? WHERE seq = ?", seq - 1, seq)
    kind, seq, _ = await _only_problem(rig)
    assert (kind, seq) == ("missing", 3)


async def test_verify_names_swapped_records(rig: AuditRig) -> None:
    await _tampered(rig)
    await rig.sql("UPDATE audit_record SET seq = -1 WHERE seq = 5")
    await rig.sql("UPDATE audit_record SET seq = 5 WHERE seq = 6")
    await rig.sql("UPDATE audit_record SET seq = 6 WHERE seq = -1")
    kind, seq, _ = await _only_problem(rig)
    assert (kind, seq) == ("reordered", 5)


async def test_verify_names_a_truncated_tail(rig: AuditRig) -> None:
    await _tampered(rig)
    await rig.sql("DELETE FROM audit_record WHERE seq > 5")
    kind, seq, _ = await _only_problem(rig)
    assert (kind, seq) == ("truncated", 6)


async def test_verify_names_a_wholly_deleted_chain(rig: AuditRig) -> None:
    await _tampered(rig)
    await rig.sql("DELETE FROM audit_record")
    kind, seq, _ = await _only_problem(rig)
    assert (kind, seq) == ("truncated", 1)


async def _forge(rig: AuditRig, seq: int, text: str) -> tuple[bytes, bytes]:
    (row,) = await rig.sql("SELECT body FROM audit_record WHERE seq = ?", seq)
    env = orjson.loads(bytes(row[0]))
    env["record"]["text"] = text
    body = orjson.dumps(env, option=orjson.OPT_SORT_KEYS)
    return body, bytes(32)


async def test_verify_names_a_forged_record_in_the_middle(rig: AuditRig) -> None:
    await _tampered(rig)
    for seq in range(8, 3, -1):
        await rig.sql("UPDATE audit_record SET seq = ? WHERE seq = ?", seq + 1, seq)
    body, link = await _forge(rig, 3, "DROP TABLE customers")
    body = body.replace(b'"seq":3', b'"seq":4')
    await rig.sql(
        "INSERT INTO audit_record (chain, seq, epoch, kind, time, session_id, subject, target,"
        " action, request_id, text, body, link) SELECT chain, 4, epoch, kind, time, session_id,"
        " subject, target, action, request_id, ?, ?, ? FROM audit_record WHERE seq = 3",
        "DROP TABLE customers", body, link,
    )  # fmt: skip
    kind, seq, _ = await _only_problem(rig)
    assert (kind, seq) == ("inserted", 4)


async def test_verify_names_a_forged_record_at_the_end(rig: AuditRig) -> None:
    await _tampered(rig)
    body, link = await _forge(rig, 8, "SELECT harmless")
    body = body.replace(b'"seq":8', b'"seq":9')
    await rig.sql(
        "INSERT INTO audit_record (chain, seq, epoch, kind, time, session_id, subject, target,"
        " action, request_id, text, body, link) SELECT chain, 9, epoch, kind, time, session_id,"
        " subject, target, action, request_id, ?, ?, ? FROM audit_record WHERE seq = 8",
        "SELECT harmless", body, link,
    )  # fmt: skip
    kind, seq, _ = await _only_problem(rig)
    assert (kind, seq) == ("inserted", 9)


async def test_prune_leaves_a_verifiable_chain(rig: AuditRig) -> None:
    writer, _ = await _fill(rig, 6)
    cutoff = time.time()
    await asyncio.sleep(0.01)
    keep = await writer.request(statement_request("SELECT kept"))
    anchor = await writer.prune(cutoff)
    assert anchor is not None and anchor.through_seq == 6
    after = await writer.request(statement_request("SELECT after prune"))
    await writer.close()
    store = rig.store()
    seqs = [r.seq async for r in store.scan(CHAIN)]
    assert seqs == [7, 8, 9]
    assert keep == f"{CHAIN}:7" and after == f"{CHAIN}:9"
    assert (await rig.verify()).ok

    # The pruned prefix cannot be cut further without the anchor noticing.
    await rig.sql("DELETE FROM audit_record WHERE seq = 7")
    kind, seq, _ = await _only_problem(rig)
    assert (kind, seq) == ("missing", 7)


async def test_a_deleted_prune_anchor_shows_the_pruned_records_missing(rig: AuditRig) -> None:
    writer, _ = await _fill(rig, 4)
    await writer.prune(time.time())
    await writer.close()
    assert (await rig.verify()).ok
    await rig.sql("DELETE FROM audit_anchor")
    kind, seq, detail = await _only_problem(rig)
    assert (kind, seq) == ("missing", 1)
    assert "1..4" in detail


async def test_key_rotation_keeps_the_chain_verifiable(rig: AuditRig) -> None:
    writer, _ = await _fill(rig, 3)
    await writer.rotate_key()
    await writer.request(statement_request("SELECT after first rotation"))
    await writer.rotate_key()
    await writer.request(statement_request("SELECT after second rotation"))
    await writer.close()
    genesis = rig.keyring.genesis_key(CHAIN)
    assert genesis is not None
    epoch, key = rig.keyring.current(CHAIN)
    assert epoch == 2 and key == key_for_epoch(genesis, 2) and key != genesis
    assert (rig.keyring.current_path(CHAIN).stat().st_mode & 0o777) == 0o600
    report = await rig.verify()
    assert report.ok and report.chains[0].epoch == 2


async def test_a_record_resigned_with_a_later_key_fails(rig: AuditRig) -> None:
    writer, _ = await _fill(rig, 4)
    await writer.rotate_key()
    await writer.request(statement_request("SELECT 4"))
    await writer.close()
    # The intruder holds the current key (epoch 1) and rewrites record 2 and everything after
    # it, relinking them correctly under that key; only epoch 0's key could make it pass.
    _, stolen = rig.keyring.current(CHAIN)
    rows = await rig.sql("SELECT seq, body, link FROM audit_record ORDER BY seq")
    prev = bytes(rows[0][2])
    for seq, body, _ in rows[1:]:
        env = orjson.loads(bytes(body))
        env["epoch"] = 1
        if seq == 2:
            env["record"]["text"] = "SELECT nothing to see"
        new_body = orjson.dumps(env, option=orjson.OPT_SORT_KEYS)
        prev = link_of(stolen, prev, new_body)
        await rig.sql(
            "UPDATE audit_record SET body = ?, link = ?, epoch = 1, text = ? WHERE seq = ?",
            new_body, prev, env["record"].get("text"), seq,
        )  # fmt: skip
    rig.heads.record(CHAIN, rows[-1][0], prev)
    kind, seq, detail = await _only_problem(rig)
    assert (kind, seq) == ("changed", 2)
    assert "epoch 1" in detail


async def test_a_crash_between_rotation_commit_and_key_swap_recovers(rig: AuditRig) -> None:
    writer, _ = await _fill(rig, 2)
    epoch0, key0 = rig.keyring.current(CHAIN)
    await writer.rotate_key()
    await writer.close()
    # Put the old key back, as if the process died before replacing the key file.
    rig.keyring.replace_current(CHAIN, epoch0, key0)
    async with rig.writer() as writer:
        await writer.request(statement_request("SELECT after restart"))
    assert rig.keyring.current(CHAIN)[0] == 1
    assert (await rig.verify()).ok


async def test_verify_without_the_genesis_key_is_a_failure(rig: AuditRig) -> None:
    writer, _ = await _fill(rig, 2)
    await writer.close()
    report = await verify(rig.store(), AuditKeyring(rig.tmp / "elsewhere"), rig.heads)
    assert not report.ok and report.problems[0].kind == "unverifiable"


async def test_search_filters(rig: AuditRig) -> None:
    async with rig.writer() as writer:
        await writer.request(statement_request("SELECT 1 FROM orders"))
        await writer.request(statement_request("DELETE FROM orders", decision=Decision("deny")))
        await writer.request(statement_request("SELECT 100%_x", target="other"))

    store = rig.store()
    assert [r.text for r in await store.search(RecordFilter(action="deny"), 10)] == [
        "DELETE FROM orders"
    ]
    assert [r.text for r in await store.search(RecordFilter(text="orders"), 10)] == [
        "DELETE FROM orders", "SELECT 1 FROM orders",
    ]  # fmt: skip
    assert [r.text for r in await store.search(RecordFilter(text="%_"), 10)] == ["SELECT 100%_x"]
    assert [r.target for r in await store.search(RecordFilter(target="other"), 10)] == ["other"]
    assert await store.search(RecordFilter(subject="nobody"), 10) == []
    assert len(await store.search(RecordFilter(since=time.time() + 60), 10)) == 0


async def test_search_by_group_masks_request_ids_and_pages(rig: AuditRig) -> None:
    engineer = Principal("eng:bob", "pgwarden", ("engineers", "pii-readers"), "jti-2", None)
    async with rig.writer() as writer:
        masked = await writer.request(statement_request("SELECT email FROM customers"))
        plain = await writer.request(
            statement_request("SELECT id FROM orders", principal=engineer, masked_columns=())
        )
        await writer.outcome(statement_outcome(masked))
        await writer.outcome(statement_outcome(plain))
        await writer.session(session_event("session_end"))
    # A tampered body that is not JSON any more: the searches over the body skip it, they
    # do not fail (verify names it).
    await rig.sql("UPDATE audit_record SET body = ? WHERE seq = 5", b"not json")
    store = rig.store()

    def texts(found: list[StoredRecord]) -> list[str | None]:
        return [r.text for r in found]

    assert texts(await store.search(RecordFilter(group="engineers"), 10)) == [
        "SELECT id FROM orders"
    ]
    assert texts(await store.search(RecordFilter(group="pii-readers"), 10)) == [
        "SELECT id FROM orders"
    ]
    # A group is matched whole, never as a substring of another or of the body.
    assert await store.search(RecordFilter(group="engineer"), 10) == []
    assert await store.search(RecordFilter(group="agent:ci-bot"), 10) == []
    assert texts(await store.search(RecordFilter(group="ai-agents", kind="request"), 10)) == [
        "SELECT email FROM customers"
    ]
    assert texts(await store.search(RecordFilter(masked=True), 10)) == [
        "SELECT email FROM customers"
    ]
    unmasked = await store.search(RecordFilter(masked=False, kind="request"), 10)
    assert texts(unmasked) == ["SELECT id FROM orders"]
    outcomes = await store.search(RecordFilter(request_ids=(masked, plain, "gw-x:9")), 10)
    assert sorted(r.request_id or "" for r in outcomes) == sorted([masked, plain])
    assert await store.search(RecordFilter(request_ids=()), 10) == []
    # Keyset pages: newest first, each page before the last one's oldest position.
    first = await store.search(RecordFilter(), 2)
    second = await store.search(RecordFilter(before_pos=first[-1].pos), 2)
    rest = await store.search(RecordFilter(before_pos=second[-1].pos), 10)
    every = await store.search(RecordFilter(), 10)
    assert [r.id for r in first + second + rest] == [r.id for r in every]
    assert len(every) == 5


async def test_a_second_writer_of_the_chain_does_not_fork_it(rig: AuditRig) -> None:
    # `pgwarden audit prune` runs beside the gateway's writer on the same chain.
    gateway, _ = await _fill(rig, 3)
    async with rig.writer() as cli:
        await cli.request(statement_request("SELECT from the cli"))
        assert await cli.prune(time.time()) is not None
    assert await gateway.request(statement_request("SELECT after")) == f"{CHAIN}:6"
    await gateway.close()
    assert (await rig.verify()).ok


async def test_a_store_from_before_record_keys_is_given_them(rig: AuditRig) -> None:
    """Records nobody waits on carry a key (how a record sent again is found stored); a
    store made before the key column gets it when opened, and its old records verify."""
    async with rig.writer() as writer:
        first = await writer.request(statement_request())
    await rig.sql("ALTER TABLE audit_record DROP COLUMN record_key")
    async with rig.writer() as writer:
        await writer.outcome(statement_outcome(first))
        await writer.request(statement_request())
    rows = await rig.sql("SELECT kind, record_key IS NOT NULL FROM audit_record ORDER BY seq")
    assert [(r[0], bool(r[1])) for r in rows] == [
        ("request", False),
        ("outcome", True),
        ("request", False),
    ]
    assert (await rig.verify()).ok
