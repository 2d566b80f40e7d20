"""A throwaway PostgreSQL cluster (initdb/pg_ctl) for the demo and the tests."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cli.certs import ensure_server_cert

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "pgwarden-local-superuser"  # a throwaway cluster on loopback only
# Roles made for exercising each upstream login method.
MD5_USER, MD5_PASSWORD = "md5user", "md5-secret"
TRUST_USER = "trustuser"

# The sample application database of the demo and the tests; customers has classified columns.
APP_DB = "appdb"
APP_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS customers (
    id int PRIMARY KEY, name text NOT NULL, email text, phone text, ssn text, card_number text
);
CREATE TABLE IF NOT EXISTS orders (
    id int PRIMARY KEY, customer_id int REFERENCES customers, amount numeric
);
INSERT INTO customers VALUES
    (1, 'Ada', 'ada@example.com', '+44 20 7946 0001', '123-45-6789', '4111111111111111'),
    (2, 'Grace', 'grace@example.org', '+1 202 555 0143', '987-65-4321', '5500000000000004')
ON CONFLICT DO NOTHING;
INSERT INTO orders VALUES (1, 1, 10.5), (2, 1, 20), (3, 2, 7.25) ON CONFLICT DO NOTHING;
"""


def _pg_bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    if not candidates:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install -y postgresql)")
    return candidates[0].parent


def reachable_by_postgres(path: Path) -> bool:
    """Whether the postgres OS user (which runs the server when we are root) can reach `path`:
    every existing parent must be searchable by others."""
    if os.geteuid() != 0:
        return True
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        program = Path(argv[4] if argv[0] == "runuser" else argv[0]).name
        raise RuntimeError(f"{program} failed: {detail}")


@dataclass
class LocalCluster:
    """One cluster under `base_dir`, listening on 127.0.0.1:`port` with TLS on."""

    base_dir: Path
    port: int

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "run"

    @property
    def ca_cert(self) -> Path:
        return self.base_dir / "tls" / "ca.crt"

    def dsn(
        self, user: str = SUPERUSER, password: str = SUPERUSER_PASSWORD, dbname: str = "postgres"
    ) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{dbname}"

    def _as_owner(self, argv: list[str]) -> list[str]:
        # initdb and postgres refuse to run as root: run them as the `postgres` OS user.
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        bindir = _pg_bindir()
        for d in (self.base_dir, self.data_dir, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            self._chown(d)
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        self._chown(pwfile)
        subprocess.run(
            self._as_owner(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    "--pwfile",
                    str(pwfile),
                    "--auth-local",
                    "trust",
                    "--auth-host",
                    "scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale",
                    "C.UTF-8",
                ]
            ),
            check=True,
            capture_output=True,
        )
        pwfile.unlink()
        certs = ensure_server_cert(self.base_dir / "tls")
        for src, name in ((certs.cert, "server.crt"), (certs.key, "server.key")):
            dst = self.data_dir / name
            shutil.copyfile(src, dst)
            dst.chmod(0o600)
            self._chown(dst)
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            f"host all {TRUST_USER} 127.0.0.1/32 trust\n"
            f"host all {MD5_USER} 127.0.0.1/32 md5\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# pgwarden throwaway cluster\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "ssl = on\n"
                "max_connections = 300\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "shared_buffers = 128MB\n"
            )

    def running(self) -> bool:
        status = subprocess.run(
            self._as_owner([str(_pg_bindir() / "pg_ctl"), "-D", str(self.data_dir), "status"]),
            check=False,
            capture_output=True,
        )
        return status.returncode == 0

    def start(self) -> None:
        self.init()
        bindir = _pg_bindir()
        if self.running():
            self._bootstrap_roles()
            return
        subprocess.run(
            self._as_owner(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.base_dir / "postgres.log"),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    f"-p {self.port}",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        self._bootstrap_roles()

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        bindir = _pg_bindir()
        psql = (
            bindir / "psql" if (bindir / "psql").exists() else Path(shutil.which("psql") or "psql")
        )
        out = subprocess.run(
            [
                str(psql),
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout

    def _bootstrap_roles(self) -> None:
        self.psql(
            "SET password_encryption = 'md5';"
            f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{MD5_USER}') THEN "
            f"CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}'; END IF;"
            f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{TRUST_USER}') THEN "
            f"CREATE ROLE {TRUST_USER} LOGIN; END IF; END$$;"
        )

    def create_app_database(self) -> str:
        """The sample database (idempotent), open to the md5 and trust roles too."""
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{APP_DB}'").strip()
        if not exists:
            self.psql(f"CREATE DATABASE {APP_DB}")
            self.psql(f"GRANT ALL ON DATABASE {APP_DB} TO {MD5_USER}, {TRUST_USER}")
        self.psql(APP_SCHEMA_SQL, dbname=APP_DB)
        grant = f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {MD5_USER}, {TRUST_USER}"
        self.psql(grant, dbname=APP_DB)
        return APP_DB

    def stop(self) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        subprocess.run(
            self._as_owner(
                [str(_pg_bindir() / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]
            ),
            check=False,
            capture_output=True,
        )
