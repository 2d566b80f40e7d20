"""A policy change on disk takes effect in a running gateway, and no stale decision is served.

The gateway runs on a temporary copy of rego/ and bundles/ with its own OPA sidecar. A
statement is allowed (and then served from the decision cache); a deny rule for its table
is added on disk; from the moment the sidecar reports the new revision, every answer must
be the new policy's. Removing the rule brings the old behaviour back, again without a
restart of the gateway or of OPA.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import psycopg
import pytest
import uvloop
from psycopg.rows import TupleRow

from cli.localpg import LocalCluster
from gateway.policy.sidecar import OpaSidecar
from tests.harness import RunningGateway

from . import REFUSED, assert_policy_refusal, connect, harness, refusal_of, simple, token_for

T = TypeVar("T")

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
LOCKDOWN_REASON = "orders are locked down by a policy change"
LOCKDOWN = f"""# Added by a test: a deny rule for one table.
package pgwarden

deny_reasons contains "{LOCKDOWN_REASON}" if {{
\tsome t in input.statement.reads
\tt.table == "orders"
}}
"""
STATEMENT = "SELECT count(*) FROM orders"


@pytest.fixture(scope="module")
def policy_copy() -> Iterator[tuple[Path, Path]]:
    root = Path(tempfile.mkdtemp(prefix="pgw-pol-"))
    shutil.copytree(ROOT / "rego", root / "rego")
    shutil.copytree(ROOT / "bundles", root / "bundles", ignore=shutil.ignore_patterns("*.tar.gz"))
    try:
        yield root / "rego", root / "bundles"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def live(
    request: pytest.FixtureRequest,
    pg_cluster: LocalCluster,
    app_database: str,
    opa_binary: Path,
    policy_copy: tuple[Path, Path],
) -> Iterator[RunningGateway]:
    conftest = harness(request)
    rego, bundles = policy_copy
    state = Path(tempfile.mkdtemp(prefix="pgw-rl-"))
    gw = conftest.start_gateway(
        state, pg_cluster, opa_binary, policy={"rego_dir": rego, "bundle_dir": bundles}
    )
    try:
        yield gw
    finally:
        conftest.stop_gateway(gw)
        shutil.rmtree(state, ignore_errors=True)


def attempt(conn: psycopg.Connection[TupleRow]) -> tuple[str, Any]:
    try:
        return "allow", simple(conn, STATEMENT)
    except psycopg.Error as exc:
        return "deny", refusal_of(exc)


def first_in_session(gw: RunningGateway, text: str) -> list[tuple[Any, ...]]:
    """`text` as the first Query of a new ai-agents session: decided (a session's plans are
    its own), so from the decision cache where it holds the decision."""
    with connect(gw.dsn(token_for(gw, "ai-agents"))) as conn:
        return simple(conn, text)


def wait_for_flip(
    gw: RunningGateway, conn: psycopg.Connection[TupleRow], want: str, old_revision: str
) -> Any:
    """Run the statement until the answer is `want` (deadline 15 s); once the sidecar reports
    a revision other than `old_revision`, every answer must already be `want`."""
    sidecar = gw.gateway.sidecar
    cache = gw.gateway.decider
    assert sidecar is not None and cache is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        # Active once the sidecar reports it or a decision made under it reached the cache.
        seen = (sidecar.revision, cache.revision)
        new_revision_active = any(r not in (None, old_revision) for r in seen)
        outcome, value = attempt(conn)
        if new_revision_active:
            assert outcome == want, f"stale decision under revision {sidecar.revision}: {value}"
        if outcome == want:
            return value
        time.sleep(0.05)
    raise AssertionError(f"the policy change never took effect (still {outcome}: {value})")


def test_policy_change_takes_effect_without_restart(
    live: RunningGateway, policy_copy: tuple[Path, Path]
) -> None:
    rego, _ = policy_copy
    sidecar = live.gateway.sidecar
    cache = live.gateway.decider
    assert sidecar is not None and cache is not None
    opa_pid = sidecar.pid
    rule = rego / "pgwarden" / "zz_lockdown.rego"
    with (
        connect(live.dsn(token_for(live, "ai-agents"))) as conn,
        connect(live.dsn(token_for(live, "ai-agents"))) as prepared,
    ):
        # A statement prepared (protocol Parse) under the old policy, executed since by
        # Bind/Execute alone: the change must reach it too, not only new Parses.
        for _ in range(2):
            assert prepared.execute(STATEMENT, prepare=True).fetchall() == [(3,)]
        # Allowed, then served from the cache (to another session: a session's next text
        # of the shape, ai-agents' too, runs on the plan its shape left and asks nothing).
        assert simple(conn, STATEMENT) == [(3,)]
        hits = cache.hits
        assert first_in_session(live, STATEMENT) == [(3,)]
        assert cache.hits > hits, "the second decision did not come from the cache"
        old_revision = sidecar.revision
        assert old_revision is not None and cache.revision == old_revision

        rule.write_text(LOCKDOWN)
        try:
            r = wait_for_flip(live, conn, "deny", old_revision)
            assert_policy_refusal(r, reason=LOCKDOWN_REASON)
            # The decision carried the new revision (the sidecar's own poll may lag behind).
            new_revision = cache.revision
            assert new_revision is not None and new_revision != old_revision
            # No stale answer from now on, from the cache or otherwise; other tables unaffected.
            hits = cache.hits
            for _ in range(5):
                outcome, value = attempt(conn)
                assert outcome == "deny" and value.sqlstate == REFUSED, value
                assert LOCKDOWN_REASON in value.message
            assert cache.hits > hits  # the new policy's deny is what the cache now holds
            assert simple(conn, "SELECT 7 * 6") == [(42,)]
            for _ in range(2):
                with pytest.raises(psycopg.Error) as info:
                    prepared.execute(STATEMENT, prepare=True)
                assert LOCKDOWN_REASON in refusal_of(info.value).message
            # Other sessions see the new policy as well.
            with connect(live.dsn(token_for(live, "admins"))) as other:
                with pytest.raises(psycopg.Error) as info:
                    simple(other, STATEMENT)
                assert LOCKDOWN_REASON in refusal_of(info.value).message
        finally:
            rule.unlink(missing_ok=True)

        # Reverted: allowed again, and never the lockdown once the reverted revision is live.
        assert wait_for_flip(live, conn, "allow", new_revision) == [(3,)]
        deadline = time.monotonic() + 5
        while sidecar.revision != old_revision and time.monotonic() < deadline:
            time.sleep(0.05)
        # The sources are the original ones again, so is the revision.
        assert sidecar.revision == old_revision
        for _ in range(5):
            assert simple(conn, STATEMENT) == [(3,)]
        assert prepared.execute(STATEMENT, prepare=True).fetchall() == [(3,)]
        # And the cache works again under it: decisions are kept and served.
        assert cache.revision == old_revision
        hits = cache.hits
        for _ in range(3):
            assert first_in_session(live, STATEMENT) == [(3,)]
        assert cache.hits > hits, "the decision cache stopped serving after the revert"
    # OPA was reloaded, not restarted.
    assert sidecar.pid == opa_pid


NO_OP_RULE = """# Added by a test: a rule no decision reads; only the revision changes.
package pgwarden

test_marker := true
"""


def test_an_agents_read_decided_again_after_a_policy_change_keeps_its_estimate(
    live: RunningGateway, policy_copy: tuple[Path, Path]
) -> None:
    """An asyncpg prepared read (its Parse leaves the parameter types to the server) executed
    after a policy change is decided again inside the client's Bind/Execute pipeline, where
    nothing can be explained: it runs on the estimate its Parse made, not held for a human."""
    rego, _ = policy_copy
    cache = live.gateway.decider
    assert cache is not None
    rule = rego / "pgwarden" / "zz_no_op.rego"
    query = "SELECT count(*) FROM orders WHERE id > $1"

    async def scenario() -> list[int]:
        conn = await asyncpg.connect(live.url(token_for(live, "ai-agents")))
        try:
            stmt = await conn.prepare(query)
            counts = [await stmt.fetchval(0)]
            old_revision = cache.revision
            assert old_revision is not None
            rule.write_text(NO_OP_RULE)
            try:
                deadline = time.monotonic() + 15
                # A decision of another statement brings the new revision into the cache.
                while cache.revision in (None, old_revision):
                    assert time.monotonic() < deadline, "the policy change never took effect"
                    assert await conn.fetchval("SELECT 6 * 7") == 42
                    await asyncio.sleep(0.05)
                counts.append(await stmt.fetchval(0))
            finally:
                rule.unlink(missing_ok=True)
            return counts
        finally:
            await conn.close()

    assert asyncio.run(scenario()) == [3, 3]


TEXT_RULE = """# Added by a test: a rule that reads the statement's text.
package pgwarden

deny_reasons contains "the text names a forbidden literal" if {
\tcontains(input.statement.text, "'forbidden'")
}
"""


def test_a_policy_that_starts_reading_the_text_keys_its_decisions_by_it(
    live: RunningGateway, policy_copy: tuple[Path, Path]
) -> None:
    """Under the reference policy texts that differ only in literals share one decision; once
    the policy reads `statement.text`, each text is decided on its own, at once."""
    rego, _ = policy_copy
    rule = rego / "pgwarden" / "zz_text.rego"

    def run(conn: psycopg.Connection[TupleRow], literal: str) -> tuple[str, Any]:
        text = "SELECT count(*) FROM customers WHERE name <> '" + literal + "'"  # noqa: S608
        try:
            return "allow", simple(conn, text)
        except psycopg.Error as exc:
            return "deny", refusal_of(exc)

    with connect(live.dsn(token_for(live, "admins"))) as conn:
        assert run(conn, "fine") == ("allow", [(2,)])
        assert run(conn, "forbidden") == ("allow", [(2,)])  # the shared decision
        rule.write_text(TEXT_RULE)
        try:
            deadline = time.monotonic() + 15
            while run(conn, "forbidden")[0] != "deny":
                assert time.monotonic() < deadline, "the policy change never took effect"
                time.sleep(0.05)
            for _ in range(3):  # neither literal is ever served the other's decision
                assert run(conn, "fine") == ("allow", [(2,)])
                outcome, value = run(conn, "forbidden")
                assert outcome == "deny" and "forbidden literal" in value.message, value
        finally:
            rule.unlink(missing_ok=True)
        deadline = time.monotonic() + 15
        while run(conn, "forbidden")[0] != "allow":
            assert time.monotonic() < deadline, "the revert never took effect"
            time.sleep(0.05)


# -- an OPA pgwarden does not run ------------------------------------------------------------


@pytest.fixture
def external_opa(
    request: pytest.FixtureRequest, pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[tuple[RunningGateway, OpaSidecar, Path]]:
    """A gateway given an OPA URL (`policy.opa_url`): that OPA, on a policy copy of its own,
    is run here, beside the gateway, not by it."""
    conftest = harness(request)
    root = Path(tempfile.mkdtemp(prefix="pgw-ext-"))
    shutil.copytree(ROOT / "rego", root / "rego")
    shutil.copytree(ROOT / "bundles", root / "bundles", ignore=shutil.ignore_patterns("*.tar.gz"))
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="external-opa", daemon=True)
    thread.start()

    def run(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    opa = OpaSidecar(
        opa_binary=opa_binary,
        rego_dir=root / "rego",
        bundle_dir=root / "bundles",
        work_dir=root / "opa",
        poll_seconds=0.2,
    )
    run(opa.start())
    gw = None
    try:
        gw = conftest.start_gateway(
            root / "state",
            pg_cluster,
            opa_binary,
            policy={"opa_url": opa.url, "revision_poll_seconds": 0.2},
        )
        assert gw.gateway.sidecar is None
        yield gw, opa, root / "rego"
    finally:
        if gw is not None:
            conftest.stop_gateway(gw)
        run(opa.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        shutil.rmtree(root, ignore_errors=True)


def test_external_opa_policy_change_reaches_cached_and_prepared_decisions(
    external_opa: tuple[RunningGateway, OpaSidecar, Path],
) -> None:
    gw, opa, rego = external_opa
    cache = gw.gateway.decider
    assert cache is not None
    with (
        connect(gw.dsn(token_for(gw, "ai-agents"))) as conn,
        connect(gw.dsn(token_for(gw, "ai-agents"))) as prepared,
    ):
        for _ in range(2):
            assert prepared.execute(STATEMENT, prepare=True).fetchall() == [(3,)]
            assert simple(conn, STATEMENT) == [(3,)]
        hits = cache.hits
        assert simple(conn, STATEMENT) == [(3,)]
        assert cache.hits > hits, "the decision was not served from the cache"
        old_revision = opa.revision
        assert old_revision is not None and cache.revision == old_revision

        (rego / "pgwarden" / "zz_lockdown.rego").write_text(LOCKDOWN)
        deadline = time.monotonic() + 15
        while opa.revision == old_revision:
            assert time.monotonic() < deadline, "the external OPA never loaded the change"
            time.sleep(0.05)
        # OPA serves the new policy now; the gateway learns it within its poll interval,
        # and from then on neither the cache nor a prepared statement may answer the old way.
        time.sleep(0.2 + 0.5)
        for _ in range(3):
            with pytest.raises(psycopg.Error) as info:
                simple(conn, STATEMENT)
            assert LOCKDOWN_REASON in refusal_of(info.value).message
            with pytest.raises(psycopg.Error) as info:
                prepared.execute(STATEMENT, prepare=True)
            assert LOCKDOWN_REASON in refusal_of(info.value).message


def refused_under_lockdown(
    live: Any,
    rule: Path,
    conn: psycopg.Connection[TupleRow],
    attempt: Callable[[], object],
    planned: Callable[[], int],
) -> None:
    """Put LOCKDOWN in force (`rule`), check that `attempt` is refused by it and did not
    run on a plan (`planned` unmoved), then revert it and wait for the policy before."""
    old_revision = live.gateway.sidecar.revision
    assert old_revision is not None
    rule.write_text(LOCKDOWN)
    try:
        wait_for_flip(live, conn, "deny", old_revision)
        # The lockdown's revision, as the cache or the sidecar has it by now (the cache may
        # say None for a moment: not confirmed again yet). A revert may bring back the
        # revision of before (the same sources): only the lockdown's is stale after it.
        new_revision = None
        deadline = time.monotonic() + 15
        while new_revision is None and time.monotonic() < deadline:
            seen = (live.gateway.decider.revision, live.gateway.sidecar.revision)
            new_revision = next((r for r in seen if r not in (None, old_revision)), None)
            time.sleep(0.02)
        assert new_revision is not None, "the lockdown's revision was never reported"
        before = planned()
        with pytest.raises(psycopg.Error) as info:
            attempt()
        assert LOCKDOWN_REASON in refusal_of(info.value).message
        assert planned() == before
    finally:
        rule.unlink(missing_ok=True)
    wait_for_flip(live, conn, "allow", new_revision)


def test_a_planned_execute_is_decided_afresh_after_a_policy_change(
    live: Any, policy_copy: tuple[Path, Path]
) -> None:
    """An Execute relayed on the plan its Parse made (no decision of its own) stops being so
    the moment another policy is in force: the next one is refused by the new policy."""
    rego, _ = policy_copy
    metrics = live.gateway.context.metrics
    rule = rego / "pgwarden" / "zz_plan_lockdown.rego"
    with (
        connect(live.dsn(token_for(live, "admins"))) as prepared,
        connect(live.dsn(token_for(live, "ai-agents"))) as conn,
    ):
        before = sum(metrics.planned_executes.values())
        for _ in range(3):
            assert prepared.execute(STATEMENT, prepare=True).fetchall() == [(3,)]
        assert sum(metrics.planned_executes.values()) >= before + 2
        refused_under_lockdown(
            live,
            rule,
            conn,
            lambda: prepared.execute(STATEMENT, prepare=True),
            lambda: sum(metrics.planned_executes.values()),
        )
        # Decided afresh under the reverted policy, then relayed on the new plan again.
        for _ in range(2):
            assert prepared.execute(STATEMENT, prepare=True).fetchall() == [(3,)]


def test_an_agents_query_plan_is_decided_afresh_after_a_policy_change(
    live: Any, policy_copy: tuple[Path, Path]
) -> None:
    """ai-agents' Queries of one shape and one cost estimate run on the plan the first left
    (each explained, none decided) until another policy is in force: the next text of the
    shape is refused by the new policy, and runs on a plan again once it is reverted."""
    rego, _ = policy_copy
    metrics = live.gateway.context.metrics
    rule = rego / "pgwarden" / "zz_query_plan_lockdown.rego"
    # Below every id: the same estimate for each literal (the primary key's range).
    shape = "SELECT count(*) FROM orders WHERE id > {}"
    with (
        connect(live.dsn(token_for(live, "ai-agents"))) as agent,
        connect(live.dsn(token_for(live, "ai-agents"))) as conn,
    ):
        before = sum(metrics.planned_queries.values())
        for bound in (-1, -2, -3):
            assert simple(agent, shape.format(bound)) == [(3,)]
        assert sum(metrics.planned_queries.values()) >= before + 2
        refused_under_lockdown(
            live,
            rule,
            conn,
            lambda: simple(agent, shape.format(-4)),
            lambda: sum(metrics.planned_queries.values()),
        )
        planned = sum(metrics.planned_queries.values())
        for bound in (-5, -6, -7):
            assert simple(agent, shape.format(bound)) == [(3,)]
        assert sum(metrics.planned_queries.values()) >= planned + 2
