"""Classified values must not reach an ai-agents client by any way other than masked rows.

Through the real gateway, real OPA and real PostgreSQL: the planner's statistics (pg_stats,
pg_statistic) keep sample values of customers.email; session settings, notifications and
advisory locks can carry a value computed in a masked statement to the client or to a
later, unmasked statement.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import psycopg
import pytest
from psycopg.rows import TupleRow

from gateway.protocol import Bind, DataRow, Describe, Execute, Parse, Query, Sync
from tests.harness import RunningGateway

from . import RawClient, assert_policy_refusal, connect, direct, refusal_of, simple, token_for

pytestmark = pytest.mark.server

SECRETS = ("ada@example.com", "grace@example.org", "123-45-6789", "987-65-4321")
CHANNEL = "would carry their values past the masks"


@pytest.fixture
def agent(gateway: RunningGateway) -> Iterator[psycopg.Connection[TupleRow]]:
    with connect(gateway.dsn(token_for(gateway, "ai-agents"))) as conn:
        yield conn


def assert_clean(seen: Any) -> None:
    text = repr(seen)
    for secret in SECRETS:
        assert secret not in text, (secret, text[:500])


def test_planner_statistics_do_not_list_classified_values(
    gateway: RunningGateway, agent: psycopg.Connection[TupleRow]
) -> None:
    direct(gateway, "ANALYZE customers")
    # The premise: the statistics hold the cleartext.
    raw = direct(
        gateway,
        "SELECT histogram_bounds::text FROM pg_stats "
        "WHERE tablename = 'customers' AND attname = 'email'",
    )
    assert "ada@example.com" in repr(raw)
    for text in (
        "SELECT attname, most_common_vals, histogram_bounds FROM pg_stats "
        "WHERE tablename = 'customers'",
        "SELECT * FROM pg_stats WHERE tablename = 'customers'",
        "SELECT s FROM pg_stats s",
        "SELECT stavalues1, stavalues2, stavalues3 FROM pg_statistic",
    ):
        rows = simple(agent, text)
        assert rows, text
        assert_clean(rows)
    # Computing on the samples (a cast, a function) is an oracle for ai-agents, not a read.
    for text in (
        "SELECT attname, most_common_vals::text, histogram_bounds::text FROM pg_stats "
        "WHERE tablename = 'customers'",
        "SELECT s::text FROM pg_stats s",
        "SELECT array_to_string(histogram_bounds, ',') FROM pg_catalog.pg_stats",
        "SELECT stavalues1::text, stavalues2::text, stavalues3::text FROM pg_statistic",
    ):
        with pytest.raises(psycopg.Error) as exc:
            simple(agent, text)
        assert_policy_refusal(refusal_of(exc.value), reason="(expression)")


def test_a_predicate_on_statistics_samples_is_an_oracle(
    agent: psycopg.Connection[TupleRow],
) -> None:
    with pytest.raises(psycopg.Error) as exc:
        simple(agent, "SELECT attname FROM pg_stats WHERE histogram_bounds::text LIKE '%ada%'")
    assert_policy_refusal(refusal_of(exc.value))


def test_a_setting_does_not_carry_a_masked_value(agent: psycopg.Connection[TupleRow]) -> None:
    with pytest.raises(psycopg.Error) as exc:
        simple(agent, "SELECT set_config('pgw.leak', email, false) FROM customers WHERE id = 1")
    assert_policy_refusal(refusal_of(exc.value), reason=CHANNEL)
    # Nothing was stored: the setting does not exist.
    assert simple(agent, "SELECT current_setting('pgw.leak', true)") == [(None,)]
    with pytest.raises(psycopg.Error):
        simple(agent, "SELECT set_config('application_name', ssn, false) FROM customers")
    assert_clean(agent.info.parameter_status("application_name"))
    # A setting of a constant beside no classified column is unaffected.
    assert simple(agent, "SELECT set_config('pgw.ok', 'x', false)") == [("x",)]


def test_a_notification_does_not_carry_a_masked_value(agent: psycopg.Connection[TupleRow]) -> None:
    heard: list[str] = []
    agent.add_notify_handler(lambda n: heard.append(n.payload))
    simple(agent, "LISTEN pgw_leak")
    with pytest.raises(psycopg.Error) as exc:
        simple(agent, "SELECT pg_notify('pgw_leak', email) FROM customers")
    assert_policy_refusal(refusal_of(exc.value), reason=CHANNEL)
    simple(agent, "SELECT 1")
    assert_clean(heard)


def test_an_advisory_lock_does_not_carry_a_masked_fragment(
    agent: psycopg.Connection[TupleRow],
) -> None:
    with pytest.raises(psycopg.Error) as exc:
        simple(agent, "SELECT pg_advisory_lock(ascii(email)) FROM customers WHERE id = 1")
    assert_policy_refusal(refusal_of(exc.value), reason=CHANNEL)
    held = simple(agent, "SELECT objid FROM pg_locks WHERE locktype = 'advisory'")
    assert (ord("a"),) not in held


@pytest.mark.parametrize("kind", ["S", "P"])
def test_a_pipelined_description_of_an_earlier_statement_does_not_plan_the_masks(
    gateway: RunningGateway, kind: Literal["S", "P"]
) -> None:
    """Parse A, Describe A, Parse B (same name), Bind, Execute B in one pipeline: A's
    description arrives after B replaced A, and must not be taken for B's columns."""
    client = RawClient(gateway, token_for(gateway, "ai-agents"))
    try:
        # B's estimate, known first: after A's Bind in the same pipeline (no Sync yet)
        # pgwarden explains nothing, and an ai-agent's read without an estimate asks
        # approval (gateway/guards/estimate.py).
        client.send(Query(b"SELECT email FROM customers"))
        client.until_ready()
        client.send(
            Parse("", b"SELECT name FROM customers"),
            Bind("", ""),
            Describe(kind, ""),
            Parse("", b"SELECT email FROM customers"),
            Bind("", ""),
            Execute(""),
            Sync(),
        )
        reply = client.until_ready()
    finally:
        client.close()
    rows = [DataRow.decode(body).values for code, body in reply if code == "D"]
    assert len(rows) == 2, reply
    assert_clean(rows)


def test_other_sessions_statement_text_is_masked(
    gateway: RunningGateway, agent: psycopg.Connection[TupleRow]
) -> None:
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as other:
        other.execute(b"SELECT id FROM customers WHERE ssn = '987-65-4321'")
        # The premise: the other session's text, literal and all, is there to read.
        assert "987-65-4321" in repr(direct(gateway, "SELECT query FROM pg_stat_activity"))
        rows = simple(agent, "SELECT pid, query FROM pg_stat_activity")
        assert rows
        assert_clean(rows)
        assert_clean(simple(agent, "SELECT a FROM pg_stat_activity a"))
        with pytest.raises(psycopg.Error) as exc:
            simple(agent, "SELECT a::text FROM pg_stat_activity a")
        assert_policy_refusal(refusal_of(exc.value), reason="(expression)")
        with pytest.raises(psycopg.Error) as exc:
            simple(agent, "SELECT query FROM pg_stat_get_activity(NULL)")
        assert_policy_refusal(refusal_of(exc.value), reason="statement text")
