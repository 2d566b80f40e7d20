"""Masks from the reference policy applied to real result rows, in both protocols and formats."""

from __future__ import annotations

import asyncpg
import psycopg
import pytest

from tests.harness import RunningGateway

pytestmark = pytest.mark.server


def _agent(gateway: RunningGateway) -> str:
    return str(gateway.token("agent:masking", groups=("ai-agents",)))


def _engineer(gateway: RunningGateway) -> str:
    # Masked too (not in pii-readers), but allowed to compute over classified columns:
    # for ai-agents a function, cast or operator over one is refused as an oracle.
    return str(gateway.token("dev:masking", groups=("engineers",)))


def test_simple_protocol_masks_classified_columns(gateway: RunningGateway) -> None:
    with psycopg.connect(gateway.dsn(_agent(gateway)), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, name, email, phone, ssn FROM customers ORDER BY id", prepare=False
        ).fetchall()
    assert [r[0] for r in rows] == [1, 2]
    assert [r[1] for r in rows] == ["Ada", "Grace"]  # not classified: untouched
    assert rows[0][2] == "a***@example.com"
    assert rows[0][3].endswith("0001") and "+44" not in rows[0][3]
    assert rows[0][4] == "***"


def test_extended_protocol_text_and_binary_formats(gateway: RunningGateway) -> None:
    with psycopg.connect(gateway.dsn(_agent(gateway)), autocommit=True) as conn:
        for binary in (False, True):
            cur = conn.cursor(binary=binary)
            rows = cur.execute(
                "SELECT id, name, email FROM customers WHERE id = %s", [2]
            ).fetchall()
            assert rows == [(2, "Grace", "g***@example.org")], binary


def test_expressions_over_masked_columns_are_masked_whole(gateway: RunningGateway) -> None:
    with psycopg.connect(gateway.dsn(_engineer(gateway)), autocommit=True) as conn:
        row = conn.execute(
            "SELECT upper(email), email || '', row_to_json(c)::text FROM customers c WHERE id = 1"
        ).fetchone()
    assert row is not None
    for value in row:
        assert value is None or "ada@example.com" not in value.lower()
        assert value is None or "123-45-6789" not in value


async def test_asyncpg_prepared_statement_rows_are_masked(gateway: RunningGateway) -> None:
    conn = await asyncpg.connect(gateway.url(_agent(gateway)))
    try:
        stmt = await conn.prepare("SELECT id, email, card_number FROM customers ORDER BY id")
        for _ in range(3):  # executions reuse the statement's description
            rows = await stmt.fetch()
            assert [r["email"] for r in rows] == ["a***@example.com", "g***@example.org"]
            assert all(r["card_number"] != "4111111111111111" for r in rows)
    finally:
        await conn.close()


def test_cursor_fetch_takes_the_sessions_masks(gateway: RunningGateway) -> None:
    with psycopg.connect(gateway.dsn(_agent(gateway))) as conn:
        conn.execute("DECLARE c CURSOR FOR SELECT email FROM customers ORDER BY id")
        rows = conn.execute("FETCH ALL FROM c").fetchall()
        conn.rollback()
    assert rows and all(r[0] is None or "ada@" not in r[0] for r in rows)


def test_pii_readers_see_values(gateway: RunningGateway) -> None:
    token = gateway.token("eng:pii", groups=("engineers", "pii-readers"))
    with psycopg.connect(gateway.dsn(token), autocommit=True) as conn:
        row = conn.execute("SELECT email FROM customers WHERE id = 1").fetchone()
    assert row == ("ada@example.com",)


def test_unclassified_result_of_a_masked_statement_is_untouched(gateway: RunningGateway) -> None:
    token = gateway.token("eng:plain", groups=("engineers",))
    with psycopg.connect(gateway.dsn(token), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, name FROM customers WHERE email LIKE %s ORDER BY id", ["%a%"]
        ).fetchall()
        simple = conn.execute(
            "SELECT id, name FROM customers WHERE email LIKE '%a%' ORDER BY id", prepare=False
        ).fetchall()
    assert rows == simple == [(1, "Ada"), (2, "Grace")]


def test_server_errors_do_not_quote_masked_values(gateway: RunningGateway) -> None:
    with psycopg.connect(gateway.dsn(_engineer(gateway)), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as caught:
            conn.execute("SELECT email::int FROM customers WHERE id = 1", prepare=False)
        assert "ada@example.com" not in str(caught.value)
        assert "withheld" in str(caught.value)
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as caught:
            conn.execute("SELECT ssn::int FROM customers WHERE id = %s", [1])
        assert "123-45-6789" not in str(caught.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)
