"""`pgwarden targets`: add, list, remove; the credential is referenced, never shown."""

from __future__ import annotations

from pathlib import Path

import orjson
import psycopg
import pytest
from typer.testing import CliRunner

from cli.localpg import SUPERUSER, SUPERUSER_PASSWORD, LocalCluster
from cli.main import app
from gateway.proxy.targets import TargetError, TargetRegistry, parse_dbname
from tests.harness import create_scratch_database, drop_scratch_database


def _run(state: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        # `targets add` checks that the credential it references can be read.
        app, list(args), env={"PGWARDEN_STATE_DIR": str(state), "A": "pw", **(env or {})}
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
    target = TargetRegistry(tmp_path / "targets.json").get("app")
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
    assert TargetRegistry(tmp_path / "targets.json").get("app") is None


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
    target = TargetRegistry(tmp_path / "targets.json").get("f")
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
    target = TargetRegistry(tmp_path / "targets.json").get("srv")
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
    target = TargetRegistry(tmp_path / "targets.json").get("any")
    assert target is not None and target.database_for("whatever") == "whatever"
    # Without --database a target serves its default database alone.
    assert _run(tmp_path, "targets", "add", "one", "--password-env", "A")[0] == 0
    target = TargetRegistry(tmp_path / "targets.json").get("one")
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
