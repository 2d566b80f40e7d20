"""The parser must see exactly what the server will run: standard_conforming_strings stays on,
and SQL text is decoded in the session's client_encoding."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.harness import RunningGateway

pytestmark = pytest.mark.server


def _connect(
    gateway: RunningGateway, groups: tuple[str, ...], **extra: str
) -> psycopg.Connection[TupleRow]:
    token = gateway.token("text:" + "-".join(groups), groups=groups)
    return psycopg.connect(gateway.dsn(token, **extra), autocommit=True)


@pytest.mark.parametrize("statement", [
    "SET standard_conforming_strings = off",
    "SET standard_conforming_strings TO 'off'",
    "SET SESSION standard_conforming_strings = false",
])  # fmt: skip
def test_turning_standard_conforming_strings_off_is_refused(
    gateway: RunningGateway, statement: str
) -> None:
    with _connect(gateway, ("admins",)) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="standard_conforming"):
            conn.execute(statement, prepare=False)
        assert_says_why(conn.pgconn.error_message.decode() or "")
        row = conn.execute("SHOW standard_conforming_strings").fetchone()
        assert row == ("on",)
        conn.execute("SET standard_conforming_strings = on", prepare=False)


def assert_says_why(message: str) -> None:
    """The refusal explains itself: the analysis reads literals with the setting on."""
    assert "standard_conforming_strings must stay on" in message, message
    assert "backslash" in message, message


def test_startup_option_turning_it_off_is_refused(gateway: RunningGateway) -> None:
    with pytest.raises(psycopg.OperationalError, match="standard_conforming") as info:
        _connect(gateway, ("admins",), options="-c standard_conforming_strings=off")
    assert_says_why(str(info.value))


def test_turning_it_off_by_set_config_ends_the_session(gateway: RunningGateway) -> None:
    """set_config() is not a SET the gate can refuse in advance: the server reports the new
    value, and the session ends before another statement is read under other rules."""
    with _connect(gateway, ("admins",)) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(
                "SELECT set_config('standard_conforming_strings', 'off', false)", prepare=False
            )
            conn.execute("SELECT 'a\\' OR true --'", prepare=False)
        assert_says_why(str(info.value))
        assert conn.closed or conn.broken


def test_sql_is_decoded_in_the_session_encoding(gateway: RunningGateway) -> None:
    with _connect(gateway, ("admins",)) as conn:
        conn.execute("SET client_encoding = 'LATIN1'", prepare=False)
        assert conn.info.encoding == "iso8859-1"
        row = conn.execute("SELECT 'café', length('café')", prepare=False).fetchone()
        assert row == ("café", 4)


def test_a_write_after_a_latin1_comment_is_still_seen(gateway: RunningGateway) -> None:
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as direct:
        before = direct.execute("SELECT count(*) FROM orders").fetchone()
    with _connect(gateway, ("ai-agents",)) as conn:
        conn.execute("SET client_encoding = 'LATIN1'", prepare=False)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="approval required"):
            conn.execute("/* déjà vu */ DELETE FROM orders WHERE id = 1", prepare=False)
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as direct:
        assert direct.execute("SELECT count(*) FROM orders").fetchone() == before
