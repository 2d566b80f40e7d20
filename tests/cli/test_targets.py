"""`pgwarden targets`: add, list, remove; the credential is referenced, never shown."""

from __future__ import annotations

from pathlib import Path

import orjson
import psycopg
import pytest
from typer.testing import CliRunner

from cli.localpg import (
    MD5_PASSWORD,
    MD5_USER,
    SUPERUSER,
    SUPERUSER_PASSWORD,
    TRUST_USER,
    LocalCluster,
)
from cli.main import app
from gateway.control.targets import TargetError, parse_dbname
from tests.harness import create_scratch_database, drop_scratch_database, stored_target


def _run(state: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        # `targets add` checks that the credential it references can be read.
        app,
        list(args),
        env={"PGWARDEN_STATE_DIR": str(state), "A": "pw", **(env or {})},
    )
    return result.exit_code, result.stdout, result.stderr


def test_add_list_remove(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    code, out, _ = _run(
        tmp_path, "targets", "add", "app", "--host", "db.internal", "--port", "5433",
        "--dbname", "appdb", "--user", "svc", "--password-env", "APP_PW",
        "--sslmode", "verify-full", "--sslrootcert", str(ca), "--label", "env=prod",
        env={"APP_PW": "s3cret"},
    )  # fmt: skip
    assert code == 0, out
    target = stored_target(tmp_path, "app")
    assert target is not None
    assert (target.host, target.port, target.dbname, target.user) == (
        "db.internal",
        5433,
        "appdb",
        "svc",
    )
    assert target.labels == {"env": "prod"} and target.sslmode == "verify-full"
    assert target.password({"APP_PW": "s3cret"}) == "s3cret"

    code, out, _ = _run(tmp_path, "targets", "list", "--json", env={"APP_PW": "s3cret"})
    assert code == 0
    listed = orjson.loads(out)
    assert listed[0]["name"] == "app" and listed[0]["credential"] == "env:APP_PW"
    assert "s3cret" not in out

    code, out, _ = _run(tmp_path, "targets", "list")
    assert code == 0 and "app" in out and "s3cret" not in out

    code, _, _ = _run(tmp_path, "targets", "remove", "app")
    assert code == 0
    assert stored_target(tmp_path, "app") is None


def test_errors_are_one_line_and_non_zero(tmp_path: Path) -> None:
    assert _run(tmp_path, "targets", "add", "app", "--password-env", "A")[0] == 0
    code, _, err = _run(tmp_path, "targets", "add", "app", "--password-env", "A")
    assert code != 0 and err.strip().count("\n") == 0 and "already exists" in err
    code, _, err = _run(tmp_path, "targets", "add", "b", "--sslmode", "sometimes")
    assert code != 0 and "sslmode" in err
    code, _, err = _run(
        tmp_path, "targets", "add", "c", "--password-env", "A", "--password-file", "/x"
    )
    assert code != 0 and "not both" in err
    code, _, err = _run(tmp_path, "targets", "remove", "nope")
    assert code != 0 and "no target named nope" in err


def test_password_file_is_read_at_connect_time(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    assert _run(tmp_path, "targets", "add", "f", "--password-file", str(secret))[0] == 0
    target = stored_target(tmp_path, "f")
    assert target is not None and target.password({}) == "from-file"
    secret.write_text("rotated\n")
    assert target.password({}) == "rotated"


@pytest.mark.server
def test_install_ddl_watch(tmp_path: Path, pg_cluster: LocalCluster) -> None:
    code, out, _ = _run(tmp_path, "targets", "install-ddl-watch", "nowhere", "--print")
    assert code == 0 and "CREATE EVENT TRIGGER pgwarden_ddl_watch" in out
    assert "ENABLE ALWAYS" in out
    code, _, err = _run(tmp_path, "targets", "install-ddl-watch", "nowhere")
    assert code != 0 and "no target named 'nowhere'" in err

    name, dsn = create_scratch_database(pg_cluster, "pgwarden_watch")
    try:
        code, out, _ = _run(
            tmp_path, "targets", "add", "db", "--port", str(pg_cluster.port), "--dbname", name,
            "--user", SUPERUSER, "--password-env", "DB_PW", "--sslmode", "disable",
            env={"DB_PW": SUPERUSER_PASSWORD},
        )  # fmt: skip
        assert code == 0, out
        for _ in range(2):  # idempotent
            code, out, err = _run(
                tmp_path, "targets", "install-ddl-watch", "db", env={"DB_PW": SUPERUSER_PASSWORD}
            )
            assert code == 0, err
            assert "DDL watch installed in target db" in out
        with psycopg.connect(dsn, autocommit=True) as conn:
            before = conn.execute("SELECT sum(n) FROM pgwarden.ddl_generation").fetchone()
            enabled = conn.execute(
                "SELECT evtenabled FROM pg_event_trigger WHERE evtname = 'pgwarden_ddl_watch'"
            ).fetchall()
            conn.execute("CREATE TABLE moved (id int)")
            after = conn.execute("SELECT sum(n) FROM pgwarden.ddl_generation").fetchone()
        assert enabled == [("A",)]
        assert before is not None and after is not None and after[0] == before[0] + 1
    finally:
        drop_scratch_database(pg_cluster, name)


def test_a_target_serves_the_databases_it_lists(tmp_path: Path) -> None:
    code, out, _ = _run(
        tmp_path, "targets", "add", "srv", "--dbname", "appdb", "--password-env", "A",
        "--database", "scratch", "--database", "reports",
    )  # fmt: skip
    assert code == 0, out
    target = stored_target(tmp_path, "srv")
    assert target is not None and target.databases == ("scratch", "reports")
    assert target.database_for(None) == "appdb"
    assert target.database_for("appdb") == "appdb"
    assert target.database_for("reports") == "reports"
    with pytest.raises(TargetError, match='does not serve database "postgres"'):
        target.database_for("postgres")
    code, out, _ = _run(tmp_path, "targets", "list", "--json")
    assert orjson.loads(out)[0]["databases"] == ["scratch", "reports"]
    code, out, _ = _run(tmp_path, "targets", "list")
    assert code == 0

    assert _run(tmp_path, "targets", "add", "any", "--password-env", "A", "--database", "*")[0] == 0
    target = stored_target(tmp_path, "any")
    assert target is not None and target.database_for("whatever") == "whatever"
    # Without --database a target serves its default database alone.
    assert _run(tmp_path, "targets", "add", "one", "--password-env", "A")[0] == 0
    target = stored_target(tmp_path, "one")
    assert target is not None and target.databases == ()
    with pytest.raises(TargetError):
        target.database_for("template1")


def test_dbname_names_a_target_and_optionally_one_of_its_databases() -> None:
    assert parse_dbname("app") == ("app", None)
    assert parse_dbname("app/reports") == ("app", "reports")
    # Only the first separator splits: a database name may hold more.
    assert parse_dbname("app/a/b") == ("app", "a/b")
    with pytest.raises(TargetError, match="names no database"):
        parse_dbname("app/")


def test_add_checks_what_it_references_unless_told_not_to(tmp_path: Path) -> None:
    code, _, err = _run(tmp_path, "targets", "add", "x", "--password-env", "NOT_SET_HERE")
    assert code == 1 and "NOT_SET_HERE is not set" in err
    code, _, err = _run(tmp_path, "targets", "add", "x", "--password-file", str(tmp_path / "no"))
    assert code == 1 and "cannot read password file" in err
    code, _, err = _run(
        tmp_path, "targets", "add", "x", "--sslmode", "verify-full",
        "--sslrootcert", str(tmp_path / "ca.pem"),
    )  # fmt: skip
    assert code == 1 and "cannot read --sslrootcert" in err
    assert stored_target(tmp_path, "x") is None
    # The credential may exist only where the gateway runs.
    code, _, _ = _run(
        tmp_path, "targets", "add", "x", "--password-env", "NOT_SET_HERE", "--no-check"
    )
    assert code == 0
    # A bad port or host is refused whatever --no-check says.
    for option, value, says in (
        ("--port", "0", "not in 1..65535"),
        ("--port", "65536", "not in 1..65535"),
        ("--host", "", "host must be"),
        ("--host", "db host", "invalid host"),
        ("--password-env", "A-B", "not an environment variable name"),
    ):
        code, _, err = _run(tmp_path, "targets", "add", "y", option, value, "--no-check")
        assert code == 1 and says in err, (option, value, err)


@pytest.mark.server
@pytest.mark.parametrize(
    ("options", "env", "auth", "tls"),
    [
        (("--user", SUPERUSER, "--password-env", "DB_PW", "--sslmode", "disable"),
         {"DB_PW": SUPERUSER_PASSWORD}, "SCRAM-SHA-256", False),
        (("--user", MD5_USER, "--password-env", "DB_PW", "--sslmode", "disable"),
         {"DB_PW": MD5_PASSWORD}, "md5", False),
        (("--user", TRUST_USER, "--sslmode", "disable"), {}, "trust", False),
        (("--host", "localhost", "--user", SUPERUSER, "--password-env", "DB_PW",
          "--sslmode", "verify-full", "--sslrootcert", "{ca}"),
         {"DB_PW": SUPERUSER_PASSWORD}, "SCRAM-SHA-256-PLUS", True),
    ],
)  # fmt: skip
def test_targets_test_logs_in_and_reports_tls_auth_and_version(
    tmp_path: Path,
    pg_cluster: LocalCluster,
    app_database: str,
    options: tuple[str, ...],
    env: dict[str, str],
    auth: str,
    tls: bool,
) -> None:
    args = [a.replace("{ca}", str(pg_cluster.ca_cert)) for a in options]
    if "--host" not in args:
        args += ["--host", "127.0.0.1"]
    code, _, err = _run(
        tmp_path, "targets", "add", "db", "--port", str(pg_cluster.port), "--dbname", app_database,
        *args, env=env,
    )  # fmt: skip
    assert code == 0, err
    code, out, err = _run(tmp_path, "targets", "test", "db", env=env)
    assert code == 0, err
    assert f"auth {auth};" in out and f"database {app_database}" in out
    assert ("TLS TLSv1." in out) == tls and ("TLS none" in out) != tls
    code, out, _ = _run(tmp_path, "targets", "test", "db", "--json", env=env)
    report = orjson.loads(out)
    assert report["auth_method"] == auth and report["server_version"].split(".")[0].isdigit()
    assert (report["tls"] is not None) == tls
    for secret in env.values():
        assert secret not in out


@pytest.mark.server
def test_targets_test_reports_a_refused_login_in_one_line(
    tmp_path: Path, pg_cluster: LocalCluster
) -> None:
    env = {"DB_PW": "wrong-password-123"}
    code, _, err = _run(
        tmp_path, "targets", "add", "db", "--port", str(pg_cluster.port), "--user", SUPERUSER,
        "--password-env", "DB_PW", "--sslmode", "disable", env=env,
    )  # fmt: skip
    assert code == 0, err
    code, out, err = _run(tmp_path, "targets", "test", "db", env=env)
    assert code == 1 and err.count("\n") == 1
    assert "refused the gateway's login" in err and "wrong-password-123" not in out + err
    code, _, err = _run(tmp_path, "targets", "test", "db", "--database", "other", env=env)
    assert code == 1 and "does not serve database" in err
    code, _, err = _run(tmp_path, "targets", "test", "nobody")
    assert code == 1 and "no target named" in err


def test_apply_makes_the_store_hold_the_files_targets(tmp_path: Path) -> None:
    declared = tmp_path / "declared.json"

    def declare(*targets: dict[str, object]) -> None:
        declared.write_bytes(orjson.dumps({"targets": list(targets)}))

    one = {"name": "one", "host": "db1", "port": 5432, "dbname": "d", "user": "u",
           "password_env": "ONLY_IN_THE_POD"}  # fmt: skip
    two = {"name": "two", "host": "db2", "port": 5433, "dbname": "d", "user": "u"}
    declare(one, two)
    code, out, err = _run(tmp_path, "targets", "apply", str(declared))
    assert code == 0, err
    assert "2 added or replaced, 0 removed, 0 unchanged" in out
    assert stored_target(tmp_path, "one") is not None  # its credential is not checked here
    code, _, _ = _run(tmp_path, "targets", "add", "by-hand", "--host", "db3")
    assert code == 0

    declare({**one, "port": 6000}, two)
    code, out, err = _run(tmp_path, "targets", "apply", str(declared))
    assert code == 0 and "1 added or replaced, 0 removed, 1 unchanged" in out, err
    changed = stored_target(tmp_path, "one")
    assert changed is not None and changed.port == 6000
    assert stored_target(tmp_path, "by-hand") is not None  # kept without --prune

    declare(two)
    code, out, err = _run(tmp_path, "targets", "apply", str(declared), "--prune")
    assert code == 0 and "0 added or replaced, 2 removed, 1 unchanged" in out, err
    assert stored_target(tmp_path, "one") is None and stored_target(tmp_path, "by-hand") is None

    declared.write_text('{"targets": [')
    code, _, err = _run(tmp_path, "targets", "apply", str(declared))
    assert code == 1 and "not valid JSON" in err and err.count("\n") == 1
    assert stored_target(tmp_path, "two") is not None
