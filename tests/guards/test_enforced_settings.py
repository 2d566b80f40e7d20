"""Enforced session settings (issue 11 item 3): every way a client could raise or clear
the read-only mode or the timeouts the policy puts on its session is refused, and the
setting in effect upstream, as the session's own SHOW reads it, is still the enforced one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from cli.localpg import APP_DB
from gateway.protocol import FunctionCall
from tests.harness import RunningGateway
from tests.proxy.wire import RawClient, errors

pytestmark = pytest.mark.server

REFUSED = "42501"
# As SHOW prints the engineers' guards of tests/guards/conftest.py.
ENFORCED = {
    "default_transaction_read_only": "on",
    "statement_timeout": "2s",
    "idle_in_transaction_session_timeout": "1min",
}

# Each way to raise or clear an enforced setting, sent as one Query.
ESCAPES = [
    "SET statement_timeout = 0",
    "SET SESSION statement_timeout = '1h'",
    "SET statement_timeout TO 2001",
    'SET "Statement_Timeout" = 0',
    "SET statement_timeout = 'forever'",
    "SET idle_in_transaction_session_timeout = 0",
    "SET default_transaction_read_only = off",
    "SET SESSION default_transaction_read_only TO false",
    "SET transaction_read_only = of",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "BEGIN READ WRITE",
    "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
    "SELECT set_config('statement_timeout', '0', false)",
    "SELECT 1 FROM (SELECT set_config('default_transaction_read_only', 'off', false)) s",
    "WITH s AS (SELECT pg_catalog.set_config('idle_in_transaction_session_timeout', '0', true))"
    " SELECT * FROM s",
    "SELECT set_config(lower('STATEMENT_TIMEOUT'), '0', false)",
    "SELECT 1 WHERE set_config('statement_timeout', '0', false) IS NOT NULL",
    "UPDATE pg_settings SET setting = '0' WHERE name = 'statement_timeout'",
    "ALTER ROLE CURRENT_USER SET statement_timeout = 0",
    f"ALTER DATABASE {APP_DB} SET default_transaction_read_only = off",
    "ALTER ROLE ALL RESET ALL",
    "PREPARE loosen AS SELECT set_config('statement_timeout', '0', false)",
    # Code pgwarden cannot see into, with a statement after it in the same message.
    "SELECT pgw_loosen(); SELECT pg_sleep(0)",
]
# The same, inside a transaction block.
ESCAPES_IN_TRANSACTION = [
    "SET LOCAL statement_timeout = 0",
    "SET TRANSACTION READ WRITE",
    "SET LOCAL transaction_read_only = off",
]
# Ways that keep within the guards, and what SHOW statement_timeout says after each.
WITHIN = [
    ("SET statement_timeout = 1000", "1s"),
    ("SET statement_timeout = '1500ms'", "1500ms"),
    ("SET default_transaction_read_only = on", "2s"),
    ("BEGIN READ ONLY; COMMIT", "2s"),
]
# After lowering the timeout, each of these returns every setting to the enforced value.
RESETS = [
    "RESET statement_timeout",
    "RESET ALL",
    "DISCARD ALL",
    "SET statement_timeout TO DEFAULT",
    "SET SESSION statement_timeout = DEFAULT",
]
_LOOSEN = """
CREATE OR REPLACE FUNCTION public.pgw_loosen() RETURNS text LANGUAGE sql
AS $$ SELECT set_config('statement_timeout', '0', false) $$
"""


@pytest.fixture(scope="module")
def engineer(guarded_gateway: RunningGateway) -> str:
    return guarded_gateway.token("user:eng-guarded", groups=("engineers",))


@pytest.fixture(scope="module", autouse=True)
def loosen_function(guarded_gateway: RunningGateway) -> Iterator[None]:
    """A function that turns statement_timeout off: code pgwarden cannot see into."""
    with psycopg.connect(guarded_gateway.direct_dsn(), autocommit=True) as conn:
        conn.execute(_LOOSEN)
    yield
    with psycopg.connect(guarded_gateway.direct_dsn(), autocommit=True) as conn:
        conn.execute("DROP FUNCTION IF EXISTS public.pgw_loosen()")
        conn.execute(f"ALTER DATABASE {APP_DB} RESET default_transaction_read_only")


def _connect(gw: RunningGateway, token: str, **extra: str) -> psycopg.Connection[Any]:
    return psycopg.connect(gw.dsn(token, **extra), autocommit=True, connect_timeout=10)


def _settings(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """The session's settings as the server itself shows them."""
    out: dict[str, str] = {}
    for name in ENFORCED:
        row = conn.execute(f"SHOW {name}").fetchone()
        assert row is not None
        out[name] = str(row[0])
    return out


async def _asyncpg_settings(conn: asyncpg.Connection) -> dict[str, str]:
    return {name: str(await conn.fetchval(f"SHOW {name}")) for name in ENFORCED}


def _assert_guard_refusal(exc: BaseException) -> None:
    assert isinstance(exc, psycopg.Error), exc
    assert exc.diag.sqlstate == REFUSED, exc
    message = exc.diag.message_primary or ""
    assert message.startswith("pgwarden: statement denied:"), message
    # The guard's reason, or the policy's own where it denies the statement anyway
    # (changing identity through pg_settings, role DDL).
    assert any(w in message for w in ("enforced", "last statement", "identity", "role")), message
    assert "decision id:" in (exc.diag.message_detail or "")


def test_a_guarded_session_starts_with_the_enforced_settings(
    guarded_gateway: RunningGateway, engineer: str
) -> None:
    with _connect(guarded_gateway, engineer) as conn:
        assert _settings(conn) == ENFORCED


def test_unguarded_principals_keep_the_servers_defaults(guarded_gateway: RunningGateway) -> None:
    admin = guarded_gateway.token("user:admin-unguarded", groups=("admins",))
    with _connect(guarded_gateway, admin) as conn:
        assert _settings(conn)["statement_timeout"] == "0"
        conn.execute("SET statement_timeout = 0")


@pytest.mark.parametrize("sql", ESCAPES)
def test_each_escape_is_refused_psycopg(
    guarded_gateway: RunningGateway, engineer: str, sql: str
) -> None:
    with _connect(guarded_gateway, engineer) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(sql)
        _assert_guard_refusal(info.value)
        # The session goes on, with the enforced settings in effect upstream.
        assert _settings(conn) == ENFORCED


@pytest.mark.parametrize("sql", ESCAPES_IN_TRANSACTION)
def test_each_escape_in_a_transaction_is_refused(
    guarded_gateway: RunningGateway, engineer: str, sql: str
) -> None:
    with _connect(guarded_gateway, engineer) as conn:
        conn.execute("BEGIN")
        with pytest.raises(psycopg.Error) as info:
            conn.execute(sql)
        _assert_guard_refusal(info.value)
        # As after any error in a transaction block: failed until ROLLBACK.
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.execute("ROLLBACK")
        assert _settings(conn) == ENFORCED


@pytest.mark.parametrize("sql", [s for s in ESCAPES if ";" not in s])
def test_each_escape_is_refused_asyncpg_extended(
    guarded_gateway: RunningGateway, engineer: str, sql: str
) -> None:
    async def run() -> dict[str, str]:
        conn = await asyncpg.connect(guarded_gateway.url(engineer))
        try:
            # fetch() prepares the statement: refused at its Parse.
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.fetch(sql)
            assert info.value.sqlstate == REFUSED
            assert "pgwarden: statement denied" in str(info.value)
            return await _asyncpg_settings(conn)
        finally:
            await conn.close()

    assert asyncio.run(run()) == ENFORCED


def test_set_config_with_the_name_as_a_parameter_is_refused_asyncpg(
    guarded_gateway: RunningGateway, engineer: str
) -> None:
    async def run() -> dict[str, str]:
        conn = await asyncpg.connect(guarded_gateway.url(engineer))
        try:
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.fetchval("SELECT set_config($1, $2, false)", "statement_timeout", "0")
            assert info.value.sqlstate == REFUSED
            return await _asyncpg_settings(conn)
        finally:
            await conn.close()

    assert asyncio.run(run()) == ENFORCED


@pytest.mark.parametrize(("sql", "timeout"), WITHIN)
def test_settings_within_the_guards_are_allowed(
    guarded_gateway: RunningGateway, engineer: str, sql: str, timeout: str
) -> None:
    with _connect(guarded_gateway, engineer) as conn:
        conn.execute(sql)
        assert _settings(conn) == {**ENFORCED, "statement_timeout": timeout}


@pytest.mark.parametrize("sql", RESETS)
def test_reset_returns_to_the_enforced_values(
    guarded_gateway: RunningGateway, engineer: str, sql: str
) -> None:
    """The enforced values are the upstream session's startup values, so the server itself
    returns to them: RESET, RESET ALL and DISCARD ALL re-apply them."""
    with _connect(guarded_gateway, engineer) as conn:
        conn.execute("SET statement_timeout = 500")
        conn.execute("SET idle_in_transaction_session_timeout = 1000")
        assert _settings(conn)["statement_timeout"] == "500ms"
        conn.execute(sql)
        after = _settings(conn)
        if sql.startswith("SET") or sql.startswith("RESET statement"):
            after["idle_in_transaction_session_timeout"] = "1min"  # only the one was reset
        assert after == ENFORCED


def test_reset_asyncpg(guarded_gateway: RunningGateway, engineer: str) -> None:
    async def run() -> dict[str, str]:
        conn = await asyncpg.connect(guarded_gateway.url(engineer))
        try:
            await conn.execute("SET statement_timeout = 500")
            await conn.execute("RESET ALL")
            await conn.execute("DISCARD ALL")
            return await _asyncpg_settings(conn)
        finally:
            await conn.close()

    assert asyncio.run(run()) == ENFORCED


@pytest.mark.parametrize(
    "options",
    [
        "-c statement_timeout=0",
        "-c default_transaction_read_only=off",
        "-c idle_in_transaction_session_timeout=0",
        "--statement-timeout=5min",
    ],
)
def test_startup_options_cannot_loosen_the_guards(
    guarded_gateway: RunningGateway, engineer: str, options: str
) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        _connect(guarded_gateway, engineer, options=options).close()
    assert "startup option refused" in str(info.value)
    assert "enforced" in str(info.value)


def test_startup_option_within_the_guards_holds_until_reset(
    guarded_gateway: RunningGateway, engineer: str
) -> None:
    with _connect(guarded_gateway, engineer, options="-c statement_timeout=1000") as conn:
        assert _settings(conn)["statement_timeout"] == "1s"
        conn.execute("RESET statement_timeout")
        assert _settings(conn) == ENFORCED


def test_startup_options_asyncpg(guarded_gateway: RunningGateway, engineer: str) -> None:
    async def run() -> str:
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(
                guarded_gateway.url(engineer), server_settings={"statement_timeout": "0"}
            )
        return str(info.value)

    assert "startup option refused" in asyncio.run(run())


def test_read_only_is_in_effect_upstream(guarded_gateway: RunningGateway, engineer: str) -> None:
    """The policy allows engineers' writes; the server refuses them in the read-only session."""
    with _connect(guarded_gateway, engineer) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO orders (customer_id, amount) VALUES (1, 1)")
        conn.execute("SELECT 1")


def test_statement_timeout_is_in_effect_upstream(
    guarded_gateway: RunningGateway, engineer: str
) -> None:
    with _connect(guarded_gateway, engineer) as conn:
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            conn.execute("SELECT pg_sleep(30)")
        assert "statement timeout" in str(info.value)


def test_opaque_code_that_changed_a_setting_ends_the_session(
    guarded_gateway: RunningGateway, engineer: str
) -> None:
    """A function pgwarden cannot see into turned statement_timeout off: the settings are
    read back before the next statement, which never runs; the session ends saying why."""
    with _connect(guarded_gateway, engineer) as conn:
        conn.execute("SELECT pgw_loosen()")
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT pg_sleep(30)")
        assert info.value.diag.sqlstate == REFUSED
        assert info.value.diag.severity == "FATAL"
        assert "enforced" in str(info.value) and "statement_timeout" in str(info.value)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


def test_opaque_code_that_changed_nothing_goes_on(
    guarded_gateway: RunningGateway, engineer: str
) -> None:
    with psycopg.connect(guarded_gateway.direct_dsn(), autocommit=True) as direct:
        direct.execute(
            "CREATE OR REPLACE FUNCTION public.pgw_harmless() RETURNS int"
            " LANGUAGE sql AS $$ SELECT 1 $$"
        )
    with _connect(guarded_gateway, engineer) as conn:
        conn.execute("SELECT pgw_harmless()")
        assert _settings(conn) == ENFORCED


def test_opaque_code_asyncpg(guarded_gateway: RunningGateway, engineer: str) -> None:
    async def run() -> str:
        conn = await asyncpg.connect(guarded_gateway.url(engineer))
        try:
            await conn.fetchval("SELECT pgw_loosen()")
            with pytest.raises(
                (asyncpg.PostgresError, asyncpg.exceptions.ConnectionDoesNotExistError)
            ) as info:
                await conn.fetchval("SELECT 1")
            return str(info.value)
        finally:
            await conn.close()

    assert "enforced" in asyncio.run(run())


def test_function_call_message_of_set_config_is_refused(
    guarded_gateway: RunningGateway, engineer: str
) -> None:
    """The FunctionCall protocol message names set_config by OID: its setting is an
    argument pgwarden does not read, so it is refused whatever it names."""
    with psycopg.connect(guarded_gateway.direct_dsn()) as direct:
        row = direct.execute("SELECT 'pg_catalog.set_config'::regproc::oid").fetchone()
    assert row is not None
    client = RawClient.connect(guarded_gateway.host, guarded_gateway.port)
    try:
        client.login("app", engineer)
        client.send(
            FunctionCall(int(row[0]), (0,), (b"statement_timeout", b"0", b"false")).encode()
        )
        frames = client.until_ready()
        refused = errors(frames)
        assert len(refused) == 1 and refused[0].sqlstate == REFUSED, frames
        assert "enforced" in (refused[0].message or "")
        shown = client.query("SHOW statement_timeout")
        values = [body for code, body in shown if code == ord("D")]
        assert len(values) == 1 and values[0].endswith(b"2s"), shown
    finally:
        client.close()
