"""A target is a server: dbname=TARGET/DATABASE reaches its other databases where the target
and the policy allow it, and pgwarden's own catalog connections never hold a database that
a client drops, renames or copies."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson
import psycopg
import pytest
from psycopg import sql
from psycopg.abc import Params
from psycopg.rows import TupleRow

from cli.localpg import SUPERUSER
from gateway.control.targets import Target
from tests.harness import RunningGateway, StoredTargets

pytestmark = pytest.mark.server

# A target that serves every database of the server, and one that serves only its default.
SERVER = "srv_any"
LISTED = "srv_listed"


def _token(gateway: RunningGateway, *groups: str) -> str:
    return str(gateway.token(f"test:{'+'.join(groups)}", groups=groups))


def _direct(
    gateway: RunningGateway, text: str, dbname: str | None = None, params: Params | None = None
) -> list[tuple[Any, ...]]:
    dsn = gateway.direct_dsn(dbname) if dbname else gateway.direct_dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(text.encode() if params is None else text, params)
        return cur.fetchall() if cur.description is not None else []


@pytest.fixture(scope="module")
def server_targets(gateway: RunningGateway) -> Iterator[str]:
    """Targets over the test cluster: SERVER serves any database; LISTED one scratch database."""
    scratch = f"tdb_{uuid.uuid4().hex[:8]}"
    _direct(gateway, f"CREATE DATABASE {scratch}")
    registry = StoredTargets(gateway.settings)
    common: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": gateway.cluster.port,
        "dbname": "appdb",
        "user": SUPERUSER,
        "password_env": "PGWARDEN_TEST_UPSTREAM_PW",
        "sslmode": "disable",
    }
    registry.add(Target(name=SERVER, databases=("*",), **common), replace=True)
    registry.add(Target(name=LISTED, databases=(scratch,), **common), replace=True)
    try:
        yield scratch
    finally:
        _direct(gateway, f"DROP DATABASE IF EXISTS {scratch} WITH (FORCE)")


def _connect(gateway: RunningGateway, dbname: str, token: str) -> psycopg.Connection[TupleRow]:
    return psycopg.connect(gateway.dsn(token, target=dbname), autocommit=True, connect_timeout=10)


def _refusal(gateway: RunningGateway, dbname: str, token: str) -> asyncpg.PostgresError:
    """The server error a real driver gets when connecting (asyncpg reports its SQLSTATE)."""

    async def connect() -> None:
        conn = await asyncpg.connect(
            host=gateway.host,
            port=gateway.port,
            user="tester",
            password=token,
            database=dbname,
            ssl=False,
        )
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(connect())
    return info.value


# -- reaching a second database ------------------------------------------------------------


@pytest.mark.parametrize("group", ["admins", "engineers"])
@pytest.mark.parametrize("target", [SERVER, LISTED])
def test_admins_and_engineers_reach_a_database_the_target_serves(
    gateway: RunningGateway, server_targets: str, group: str, target: str
) -> None:
    with _connect(gateway, f"{target}/{server_targets}", _token(gateway, group)) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (server_targets,)
        rows = conn.execute("SELECT x FROM generate_series(1, 2) x WHERE x > %s", [1])
        assert rows.fetchall() == [(2,)]
    # The target alone (or naming its default) still reaches the default database.
    for dbname in (target, f"{target}/appdb"):
        with _connect(gateway, dbname, _token(gateway, group)) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("appdb",)


def test_postgres_database_with_asyncpg(gateway: RunningGateway, server_targets: str) -> None:
    async def main() -> list[Any]:
        conn = await asyncpg.connect(
            host=gateway.host,
            port=gateway.port,
            user="tester",
            password=_token(gateway, "admins"),
            database=f"{SERVER}/postgres",
            ssl=False,
        )
        try:
            return [await conn.fetchval("SELECT current_database()")]
        finally:
            await conn.close()

    assert asyncio.run(main()) == ["postgres"]


def test_ai_agents_are_refused_another_database_by_the_policy(
    gateway: RunningGateway, server_targets: str
) -> None:
    agent = _token(gateway, "ai-agents")
    error = _refusal(gateway, f"{SERVER}/{server_targets}", agent)
    assert error.sqlstate == "42501"
    assert error.message.startswith("pgwarden: statement denied: ")
    assert f"ai-agents may use only the default database appdb of target {SERVER}" in error.message
    assert error.detail is not None and "decision id" in error.detail
    # Their default database is theirs as before.
    with _connect(gateway, SERVER, agent) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("appdb",)


def test_a_database_the_target_does_not_serve_is_refused(
    gateway: RunningGateway, server_targets: str
) -> None:
    admin = _token(gateway, "admins")
    for dbname in (f"app/{server_targets}", f"{LISTED}/postgres"):
        error = _refusal(gateway, dbname, admin)
        assert error.sqlstate == "42501"
        assert "does not serve database" in error.message, error.message


def test_malformed_and_unknown_dbnames_are_clear_errors(
    gateway: RunningGateway, server_targets: str
) -> None:
    admin = _token(gateway, "admins")
    error = _refusal(gateway, f"{SERVER}/", admin)
    assert error.sqlstate == "3D000"
    assert "names no database" in error.message
    error = _refusal(gateway, f"nosuchtarget/{server_targets}", admin)
    assert error.sqlstate == "3D000"
    assert 'no target named "nosuchtarget"' in error.message
    # A database the target would serve but the server lacks: the server's own words.
    error = _refusal(gateway, f"{SERVER}/nosuchdb_{uuid.uuid4().hex[:6]}", admin)
    assert "does not exist" in error.message


def test_masks_follow_each_databases_own_tables(
    gateway: RunningGateway, server_targets: str
) -> None:
    """Each database has its own OIDs: a classified column is masked in the database the
    session uses, not looked up in the target's default one."""
    _direct(
        gateway,
        "CREATE TABLE IF NOT EXISTS customers (id int, name text, email text);"
        " TRUNCATE customers; INSERT INTO customers VALUES (7, 'Lin', 'lin@example.org')",
        server_targets,
    )
    engineer = _token(gateway, "engineers")
    # The default database's customers first, so its mask targets are known.
    with _connect(gateway, SERVER, engineer) as conn:
        row = conn.execute("SELECT email FROM customers WHERE id = 1").fetchone()
        assert row is not None and row[0] == "a***@example.com"
    with _connect(gateway, f"{SERVER}/{server_targets}", engineer) as conn:
        rows = conn.execute("SELECT id, name, email FROM customers").fetchall()
    assert rows == [(7, "Lin", "l***@example.org")]


# -- DROP DATABASE and friends while pgwarden has resolved names in the database -----------


def _catalog_connections(gateway: RunningGateway, database: str) -> int:
    rows = _direct(
        gateway,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'pgwarden-catalog' AND datname = %s",
        params=[database],
    )
    return int(rows[0][0])


def _database_with_resolved_names(gateway: RunningGateway, admin: str) -> str:
    """A new database in which a session through pgwarden has had names resolved (so
    pgwarden's catalog connection to it is open), that session closed again."""
    name = f"tdrop_{uuid.uuid4().hex[:8]}"
    with _connect(gateway, SERVER, admin) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with _connect(gateway, f"{SERVER}/{name}", admin) as conn:
        conn.execute("CREATE TABLE t (id int)")
        assert conn.execute("SELECT * FROM t").fetchall() == []
    assert _catalog_connections(gateway, name) == 1
    return name


def _database_exists(gateway: RunningGateway, name: str) -> bool:
    return bool(_direct(gateway, "SELECT 1 FROM pg_database WHERE datname = %s", params=[name]))


@pytest.mark.parametrize("force", ["", " WITH (FORCE)"])
def test_drop_database_that_pgwarden_resolved_names_in(
    gateway: RunningGateway, server_targets: str, force: str
) -> None:
    admin = _token(gateway, "admins")
    name = _database_with_resolved_names(gateway, admin)
    with _connect(gateway, SERVER, admin) as conn:
        # lock_timeout does not bound the 5 s wait for other sessions: a held database
        # shows as 55006 "is being accessed by other users".
        conn.execute(sql.SQL("DROP DATABASE {}" + force).format(sql.Identifier(name)))
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not _database_exists(gateway, name)


def test_create_database_from_a_template_pgwarden_resolved_names_in(
    gateway: RunningGateway, server_targets: str
) -> None:
    admin = _token(gateway, "admins")
    template = _database_with_resolved_names(gateway, admin)
    copy = f"{template}_copy"
    try:
        with _connect(gateway, SERVER, admin) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(copy), sql.Identifier(template)
                )
            )
        assert _database_exists(gateway, copy)
        with _connect(gateway, f"{SERVER}/{copy}", admin) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    finally:
        for db in (copy, template):
            _direct(gateway, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_rename_a_database_pgwarden_resolved_names_in(
    gateway: RunningGateway, server_targets: str
) -> None:
    admin = _token(gateway, "admins")
    name = _database_with_resolved_names(gateway, admin)
    renamed = f"{name}_renamed"
    try:
        with _connect(gateway, SERVER, admin) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(name), sql.Identifier(renamed)
                )
            )
        assert _database_exists(gateway, renamed)
    finally:
        for db in (name, renamed):
            _direct(gateway, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_drop_database_in_the_extended_protocol(
    gateway: RunningGateway, server_targets: str
) -> None:
    admin = _token(gateway, "admins")
    name = _database_with_resolved_names(gateway, admin)
    with _connect(gateway, SERVER, admin) as conn:
        # psycopg sends a statement without parameters as Parse/Bind/Execute with prepare=True.
        conn.execute(
            sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)).as_string(conn), prepare=True
        )
    assert not _database_exists(gateway, name)


def test_a_database_in_use_by_a_client_still_refuses_to_drop_as_direct(
    gateway: RunningGateway, server_targets: str
) -> None:
    admin = _token(gateway, "admins")
    name = _database_with_resolved_names(gateway, admin)
    try:
        with (
            _connect(gateway, f"{SERVER}/{name}", admin) as held,
            _connect(gateway, SERVER, admin) as conn,
        ):
            held.execute("SELECT 1")
            with pytest.raises(psycopg.errors.ObjectInUse):
                conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
            # The client's session in it keeps working: only pgwarden's own connection closed.
            assert held.execute("SELECT current_database()").fetchone() == (name,)
    finally:
        _direct(gateway, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.parametrize("via", ["gateway", "direct with FORCE"])
def test_a_database_made_again_under_its_name_is_masked_by_its_own_oids(
    gateway: RunningGateway, server_targets: str, via: str
) -> None:
    """What pgwarden read of a dropped database (mask targets by OID) must not describe the
    new database of the same name."""
    admin, engineer = _token(gateway, "admins"), _token(gateway, "engineers")
    name = f"tagain_{uuid.uuid4().hex[:8]}"
    table = (
        "CREATE TABLE customers (id int, email text); INSERT INTO customers VALUES (1, 'ann@x.org')"
    )
    try:
        for round_ in (1, 2):
            if round_ == 2 and via == "gateway":
                with _connect(gateway, SERVER, admin) as conn:
                    conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            else:
                _direct(gateway, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                _direct(gateway, f"CREATE DATABASE {name}")
            # Other tables first on the second round: the same table gets another OID.
            _direct(gateway, "CREATE TABLE filler (x int);" * (round_ - 1) + table, name)
            with _connect(gateway, f"{SERVER}/{name}", engineer) as conn:
                rows = conn.execute("SELECT id, email FROM customers").fetchall()
            assert rows == [(1, "a***@x.org")], round_
    finally:
        _direct(gateway, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_the_audit_trail_names_the_database_and_the_connect_decision(
    gateway: RunningGateway, server_targets: str
) -> None:
    from tests.integration.test_audit_support import last_pos, records_after, wait_for

    start = last_pos(gateway.settings)
    marker = f"audit_{uuid.uuid4().hex[:8]}"
    with _connect(gateway, f"{SERVER}/{server_targets}", _token(gateway, "engineers")) as conn:
        conn.execute(f"SELECT '{marker}'")
    _refusal(gateway, f"{SERVER}/{server_targets}", _token(gateway, "ai-agents"))

    dbname = f"{SERVER}/{server_targets}"

    def mine() -> list[Any] | None:
        ours = [r for r in records_after(gateway.settings, start) if r.target == dbname]
        # Per session: start, end, the CONNECT; and the engineer's SELECT.
        return ours if len(ours) >= 7 else None

    records = wait_for(mine)
    kinds = [r.kind for r in records]
    assert kinds.count("session_start") == 2 and kinds.count("session_end") == 2, kinds
    requests = [orjson.loads(r.body)["record"] for r in records if r.kind == "request"]
    connects = [q for q in requests if q["text"].startswith("-- startup: connect to database")]
    assert sorted(q["decision"]["action"] for q in connects) == ["allow", "deny"]
    assert any(marker in q["text"] for q in requests)


def test_drop_database_another_target_resolved_names_in(
    gateway: RunningGateway, server_targets: str
) -> None:
    """Two targets may name one server (a suite registers a target per database): pgwarden's
    connection through either must not hold a database dropped through the other."""
    admin = _token(gateway, "admins")
    name = f"tother_{uuid.uuid4().hex[:8]}"
    registry = StoredTargets(gateway.settings)
    registry.add(
        Target(
            name=name,
            host="localhost",  # the same server under another host name
            port=gateway.cluster.port,
            dbname=name,
            user=SUPERUSER,
            password_env="PGWARDEN_TEST_UPSTREAM_PW",
            sslmode="disable",
        )
    )
    try:
        with _connect(gateway, SERVER, admin) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with _connect(gateway, name, admin) as conn:
            conn.execute("CREATE TABLE t (id int)")
            assert conn.execute("SELECT * FROM t").fetchall() == []
        assert _catalog_connections(gateway, name) == 1
        with _connect(gateway, SERVER, admin) as conn:
            conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
        assert not _database_exists(gateway, name)
    finally:
        registry.remove(name)
        _direct(gateway, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
