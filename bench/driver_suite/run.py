"""Run a real driver's own test suite (pg8000, asyncpg, psycopg, node-postgres) through the
gateway and direct, and compare.

Nothing third-party lives in this repository: the driver's source and a throwaway venv are
prepared under /tmp (see `prepare`). Then, in this process:

  * a throwaway PostgreSQL cluster (cli.localpg.LocalCluster) is started, with what the
    driver's own CI prepares (pg8000: the hstore extension in the `postgres` database);
  * the real gateway (tests/conftest.start_gateway: reference policy, real OPA, SQLite audit) is
    started on its own uvloop thread, with one extra target named `postgres` -> database
    `postgres` as the superuser, serving every database of the cluster (`postgres/NAME`):
    the suites send dbname=postgres (pg8000: user=postgres and no database, so the gateway
    picks the target by the user name, as PostgreSQL picks the database); and one target
    per other database name the suite connects to by name (--register-test-databases);
  * the suite's pytest runs in a separate process (the throwaway venv's Python), twice:
    PGHOST/PGPORT/PGPASSWORD pointing at the gateway (password = an admins JWT), then straight
    at the cluster (password = the superuser's). Each run writes a JUnit XML report;
    node-postgres has no pytest: each of its test files runs in its own `node` process
    (see run_nodepg);
  * both summaries are printed, and every test whose outcome differs is listed.

Usage (from the repository root):
    .venv/bin/python bench/driver_suite/run.py                     # pg8000, both runs
    .venv/bin/python bench/driver_suite/run.py --driver asyncpg    # asyncpg's suite, both runs
    .venv/bin/python bench/driver_suite/run.py --driver psycopg    # psycopg 3's suite, both runs
    .venv/bin/python bench/driver_suite/run.py --driver node-postgres  # pg's integration tests
    .venv/bin/python bench/driver_suite/run.py -- -k notify        # extra args go to pytest
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Each test's outcome (passed, failed, error, skipped) and the first line of its message.
Outcomes = dict[str, tuple[str, str]]

PG8000_VERSION = "1.31.6"
WORK = Path(os.environ.get("DRIVER_SUITE_WORK", "/tmp/ds"))  # noqa: S108 (a throwaway work dir, by design)
VENV = Path(os.environ.get("DRIVER_SUITE_VENV", "/tmp/dsuite"))  # noqa: S108
SRC = WORK / f"pg8000-{PG8000_VERSION}"
TEST_DEPS = [f"pg8000=={PG8000_VERSION}", "pytest", "pytest-mock", "pytest-benchmark", "pytz"]

# asyncpg: the version the gateway itself is locked to. Its tests/ folder runs against the
# installed (compiled) asyncpg, whose asyncpg._testbase uses an existing server when PGHOST
# is set (cluster.RunningCluster; connection parameters from PG* variables).
ASYNCPG_VERSION = importlib.metadata.version("asyncpg")
ASYNCPG_VENV = Path(os.environ.get("DRIVER_SUITE_ASYNCPG_VENV", "/tmp/dsuite-asyncpg"))  # noqa: S108
# Only tests/ is copied here: the sdist's own asyncpg/ (uncompiled) would shadow the wheel.
ASYNCPG_SUITE = WORK / f"asyncpg-{ASYNCPG_VERSION}-suite"
ASYNCPG_DEPS = [f"asyncpg=={ASYNCPG_VERSION}", "pytest", "uvloop", "distro"]
# Databases asyncpg's tests connect to by name besides `postgres`.
ASYNCPG_DATABASES = ["testdb", "asyncpg_intro_test"]

# psycopg 3: the version the gateway's tests are locked to. Its sdist carries no tests/, so the
# folder comes from psycopg's git repository (PSYCOPG_TESTS_FROM: a git directory, e.g. the
# stored snapshot of github.com/psycopg/psycopg; its tag for the version when it has one, else
# HEAD), copied to PSYCOPG_SUITE with the repository's pyproject.toml (its pytest settings:
# warnings are errors). The tests run against the installed psycopg[binary] wheel.
PSYCOPG_VERSION = importlib.metadata.version("psycopg")
PSYCOPG_VENV = Path(os.environ.get("DRIVER_SUITE_PSYCOPG_VENV", "/tmp/dsuite-psycopg"))  # noqa: S108
PSYCOPG_SUITE = WORK / f"psycopg-{PSYCOPG_VERSION}-suite"
PSYCOPG_TESTS_FROM = Path(
    os.environ.get("PSYCOPG_TESTS_FROM", "/work/.mirror/psycopg+psycopg/repo")
)
# psycopg's pyproject extra `test` (mypy only serves the `mypy`-marked tests, deselected below)
# and psycopg_pool for tests/pool.
PSYCOPG_DEPS = [f"psycopg[binary]=={PSYCOPG_VERSION}", "psycopg-pool", "anyio>=4.0",
                "pproxy>=2.7", "pytest>=6.2.5", "pytest-randomly>=3.5"]  # fmt: skip
# psycopg's CI (tools/ci/ci_test.sh) selects by markers. "main" leaves out what is slow or
# needs what the CI installs for separate jobs (gevent, dnspython, PostGIS, numpy), what
# depends on timing on a shared machine, and mypy runs of typing examples; "slow" is the
# slow and timing-marked tests of the protocol paths (cancel, notifications, COPY,
# connection and cursor life, pools) that "main" leaves out. Test order is fixed (no
# pytest-randomly) so that both sides run the same sequence.
_PSYCOPG_NOT_CI = "not mypy and not gevent and not dns and not postgis and not numpy"
PSYCOPG_SUITES = {
    "main": ["-m", f"not slow and not timing and not flakey and {_PSYCOPG_NOT_CI}", "tests"],
    "slow": ["-m", f"(slow or timing) and not flakey and {_PSYCOPG_NOT_CI}",
             "--ignore=tests/test_waiting.py", "--ignore=tests/test_waiting_async.py",
             "--ignore=tests/test_free_threading.py", "tests"],
}  # fmt: skip

# node-postgres (npm `pg`): its integration tests from the git repository (NODEPG_FROM, by
# default the stored snapshot of github.com/brianc/node-postgres, at HEAD), unpacked under
# WORK. Its runtime dependencies that live in the same monorepo (pg-protocol, built with tsc;
# pg-pool, pg-connection-string, pg-cursor) are linked from the snapshot; the rest, and the
# test-only ones its test files require, come from npm into NODEPG_DEPS.
NODEPG_FROM = Path(os.environ.get("NODEPG_FROM", "/work/.mirror/brianc+node-postgres/repo"))
NODEPG_SRC = WORK / "node-postgres"
NODEPG_DEPS = WORK / "node-postgres-deps"
NODEPG_NPM = ["pg-types@2.2.0", "pgpass@1.0.5", "async@2.6.4", "bluebird@3.7.2", "co@4.6.0",
              "pg-copy-streams@0.3.0", "typescript@6", "@types/node@16", "mocha@11",
              "expect.js@0.3.1", "lodash@4", "ts-node@10", "concat-stream@1.0.1",
              "JSONStream@1.3.5", "stream-spec@0.3.5"]  # fmt: skip
NODEPG_WORKSPACE = ["pg", "pg-protocol", "pg-pool", "pg-connection-string", "pg-cursor",
                    "pg-query-stream"]  # fmt: skip
# Selections: "main" is pg's `make test-integration`; the others are a package's mocha suite:
# "cursor" pg-cursor's (portals read a few rows at a time: Execute with a row limit,
# PortalSuspended, Close), "pool" pg-pool's (connections checked out, ended, timed out),
# "stream" pg-query-stream's (a cursor read as a stream, paused and destroyed; TypeScript,
# run as its package.json does with ts-node, transpile-only: no type check of the tests).
NODEPG_MOCHA = {
    "cursor": ("pg-cursor", []),
    "pool": ("pg-pool", []),
    "stream": ("pg-query-stream", ["-r", "ts-node/register", "test/**/*.ts"]),
}
NODEPG_SUITES = ("main", *NODEPG_MOCHA)
NODEPG_REPORTER = Path(__file__).with_name("nodepg_reporter.cjs")
# `make test-integration`: every test/integration/**/*-tests.js, one node process each
# (connection-pool/tls-tests.js defines no test without node-postgres's client-certificate
# CI variables: it counts as one "(file)" that passes).
# Tests skipped on both sides, each for a reason by design (nodepg_reporter.cjs skips them, so
# the rest of their file still runs: the file would stop at their failure).
_UNKNOWN_ROLE = (
    "expects the login of a role that does not exist to fail: pgwarden takes the identity from"
    " the token (PGPASSWORD) and only records the user name"
)
NODEPG_SKIP_TESTS = {
    f"test/integration/client/error-handling-tests.js::{name}": _UNKNOWN_ROLE
    for name in (
        "non-query error with callback",
        "when connecting to an invalid host with callback",
        "when connecting to invalid host with promise",
        "non-query error",
    )
}
# Databases pg's tests connect to by name besides `postgres` (gh-issues/130: psql ... template1).
NODEPG_DATABASES = ["template1"]
NODEPG_FILE_TIMEOUT = 120.0

# pg8000's own CI (.github/workflows/test.yml, job main-test) runs exactly this selection:
# the auth/ folders need a server whose pg_hba forces one method per run, and the README
# examples need a specific server setup; both are separate CI jobs.
SUITES = {
    "main": [
        "-W", "error",
        "--ignore=test/dbapi/auth/", "--ignore=test/legacy/auth/", "--ignore=test/native/auth/",
        "--ignore=test/test_readme.py",
        "test",
    ],
    # The auth/ folders (CI jobs auth-test and ssl-test run them one method at a time against
    # a server whose pg_hba forces that method). Our cluster asks scram-sha-256 on TCP, has ssl
    # on, and has no gss: test_gss fails direct too, md5/password just need a connection.
    "auth": ["-W", "error", "test/dbapi/auth/", "test/legacy/auth/", "test/native/auth/"],
}  # fmt: skip
# Databases pg8000's tests create and then connect to by name: through the gateway the name is
# a target name, so these exist only when registered (--register-test-databases).
TEST_DATABASES = ["pg8000_scram_sha_256"]


def _venv(venv: Path, deps: list[str]) -> None:
    """A throwaway venv with `deps`. Made with a Python that has pip (the project's .venv,
    made by uv, has none)."""
    if not (venv / "bin" / "pytest").exists():
        python = shutil.which("python3") or sys.executable
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *deps], check=True)


def _sdist(venv: Path, name: str, version: str) -> Path:
    """The driver's sdist from PyPI (it carries the tests), unpacked under WORK."""
    src = WORK / f"{name}-{version}"
    if not src.is_dir():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", str(WORK), f"{name}=={version}"],
            check=True,
        )  # fmt: skip
        subprocess.run(["tar", "xzf", f"{name}-{version}.tar.gz"], cwd=WORK, check=True)
    return src


def _psycopg_tests() -> None:
    """psycopg's tests/ and pyproject.toml at the release tag (HEAD when the snapshot has no
    such tag), from a git directory: the sdist on PyPI does not carry them."""
    git = ["git", "-C", str(PSYCOPG_TESTS_FROM)]
    tags = subprocess.run([*git, "tag", "-l", PSYCOPG_VERSION], capture_output=True, text=True)
    ref = PSYCOPG_VERSION if tags.stdout.strip() else "HEAD"
    PSYCOPG_SUITE.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        [*git, "archive", ref, "tests", "tools/pproxy_fix.py", "pyproject.toml"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["tar", "x", "-C", str(PSYCOPG_SUITE)], input=archive.stdout, check=True)
    commit = subprocess.run([*git, "rev-parse", ref], check=True, capture_output=True, text=True)
    (PSYCOPG_SUITE / "SOURCE").write_text(f"{PSYCOPG_TESTS_FROM} {ref} {commit.stdout}")


def _nodepg() -> None:
    """node-postgres's source at HEAD, its npm dependencies, pg-protocol compiled."""
    git = ["git", "--git-dir", str(NODEPG_FROM)]
    NODEPG_SRC.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run([*git, "archive", "HEAD"], check=True, capture_output=True)
    subprocess.run(["tar", "x", "-C", str(NODEPG_SRC)], input=archive.stdout, check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    (NODEPG_SRC / "SOURCE").write_text(f"{NODEPG_FROM} HEAD {commit.stdout}")
    NODEPG_DEPS.mkdir(parents=True, exist_ok=True)
    (NODEPG_DEPS / "package.json").write_text('{"name": "nodepg-deps", "private": true}')
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", *NODEPG_NPM], cwd=NODEPG_DEPS,
                   check=True)  # fmt: skip
    modules = NODEPG_SRC / "node_modules"  # found by require() from packages/*/
    modules.unlink(missing_ok=True)
    modules.symlink_to(NODEPG_DEPS / "node_modules")
    for name in NODEPG_WORKSPACE:
        (modules / name).unlink(missing_ok=True)
        (modules / name).symlink_to(NODEPG_SRC / "packages" / name)
    # Its tsconfig names mocha's types (pg-protocol's own unit tests): tsc reports them
    # missing and still emits dist/, which is all pg needs.
    subprocess.run([str(modules / ".bin" / "tsc")], cwd=NODEPG_SRC / "packages" / "pg-protocol")
    if not (NODEPG_SRC / "packages" / "pg-protocol" / "dist" / "index.js").exists():
        raise SystemExit("pg-protocol did not build")


def prepare(driver: str) -> None:
    """The sdist (it carries the tests) and a venv with the driver and its test deps."""
    if driver == "node-postgres":
        if not (NODEPG_SRC / "node_modules" / "ts-node").exists():
            _nodepg()
        return
    if driver == "pg8000":
        _venv(VENV, TEST_DEPS)
        _sdist(VENV, "pg8000", PG8000_VERSION)
        return
    if driver == "psycopg":
        _venv(PSYCOPG_VENV, PSYCOPG_DEPS)
        if not (PSYCOPG_SUITE / "tests").is_dir():
            _psycopg_tests()
        return
    _venv(ASYNCPG_VENV, ASYNCPG_DEPS)
    if not (ASYNCPG_SUITE / "tests").is_dir():
        src = _sdist(ASYNCPG_VENV, "asyncpg", ASYNCPG_VERSION)
        ASYNCPG_SUITE.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / "tests", ASYNCPG_SUITE / "tests")


def run_suite(
    label: str,
    driver: str,
    suite: str,
    host: str,
    port: int,
    password: str,
    extra: list[str],
    out: Path,
) -> Outcomes:
    label = f"{driver}-{suite}-{label}"
    report = out / f"{label}.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST=host, PGPORT=str(port), PGPASSWORD=password, PYTHONDONTWRITEBYTECODE="1")
    if driver == "asyncpg":
        # The superuser and its database, as asyncpg's CI passes them with PGHOST.
        env.update(PGUSER="postgres", PGDATABASE="postgres")
        venv, cwd, selection = ASYNCPG_VENV, ASYNCPG_SUITE, ["tests"]
    elif driver == "psycopg":
        # psycopg's conftest reads the DSN from --test-dsn; libpq takes the password from
        # PGPASSWORD. dbname=postgres: a target through the gateway, the database direct.
        dsn = f"host={host} port={port} user=postgres dbname=postgres"
        venv, cwd = PSYCOPG_VENV, PSYCOPG_SUITE
        selection = [f"--test-dsn={dsn}", "-p", "no:randomly", *PSYCOPG_SUITES[suite]]
    else:
        venv, cwd, selection = VENV, SRC, SUITES[suite]
    # psycopg's conftest keeps a segfault flag in pytest's cache: the cache stays on for it.
    cache = [] if driver == "psycopg" else ["-p", "no:cacheprovider"]
    argv = [str(venv / "bin" / "python"), "-m", "pytest", *cache, "-q",
            "-rfE", f"--junitxml={report}", *selection, *extra]  # fmt: skip
    print(
        f"\n===== {label}: PGHOST={host} PGPORT={port} (cwd {cwd})\n$ {' '.join(argv)}", flush=True
    )
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    (out / f"{label}.log").write_text(proc.stdout + proc.stderr)
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else [proc.stderr[-2000:]]
    print(f"[{label}] {tail[0]}  ({time.monotonic() - started:.1f}s, log {out / (label + '.log')})")
    return parse_junit(report)


def run_nodepg(
    label: str, suite: str, host: str, port: int, password: str, extra: list[str], out: Path
) -> Outcomes:
    """Each of pg's integration test files in its own node process, as `make test-integration`
    runs them (a file stops at its first failure), its outcomes written by nodepg_reporter.cjs.
    `extra`: substrings of the file paths to run (all when empty)."""
    label = f"node-postgres-{suite}-{label}"
    pg = NODEPG_SRC / "packages" / "pg"
    report, log = out / f"{label}.jsonl", out / f"{label}.log"
    report.unlink(missing_ok=True)
    if suite in NODEPG_MOCHA:
        package, args = NODEPG_MOCHA[suite]
        return _run_mocha(label, NODEPG_SRC / "packages" / package, host, port, password,
                          [*args, *extra], out)  # fmt: skip
    files = sorted(
        str(p.relative_to(pg)) for p in (pg / "test" / "integration").rglob("*-tests.js")
    )
    files = [f for f in files if not extra or any(x in f for x in extra)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST=host, PGPORT=str(port), PGPASSWORD=password, PGUSER="postgres",
               PGDATABASE="postgres", NODEPG_REPORT=str(report), NODEPG_PG_DIR=str(pg),
               NODEPG_SKIP_TESTS=json.dumps(NODEPG_SKIP_TESTS))  # fmt: skip
    print(
        f"\n===== {label}: PGHOST={host} PGPORT={port} (cwd {pg}), {len(files)} files", flush=True
    )
    started = time.monotonic()
    outcomes: Outcomes = {}
    with log.open("w") as logf:
        for f in files:
            logf.write(f"\n===== {f}\n")
            logf.flush()
            try:
                subprocess.run(["node", "--require", str(NODEPG_REPORTER), f], cwd=pg,
                               env={**env, "NODEPG_TEST_FILE": f}, stdout=logf, stderr=logf,
                               timeout=NODEPG_FILE_TIMEOUT)  # fmt: skip
            except subprocess.TimeoutExpired:
                outcomes[f"{f}::(file)"] = ("failed", f"no exit within {NODEPG_FILE_TIMEOUT}s")
    if report.exists():
        for line in report.read_text().splitlines():
            rec = json.loads(line)
            name = f"{rec['file']}::{rec['name']}"
            if outcomes.get(name, ("", ""))[0] == "failed":
                continue  # a test name seen twice in one file: the failure stays
            outcomes[name] = (
                rec["outcome"],
                rec["message"].splitlines()[0][:200] if rec["message"] else "",
            )
    print(f"[{label}] {counts(outcomes)}  ({time.monotonic() - started:.1f}s, log {log})")
    return outcomes


def _run_mocha(
    label: str, cwd: Path, host: str, port: int, password: str, extra: list[str], out: Path
) -> Outcomes:
    """A node-postgres package's mocha suite (its test/*.js), outcomes from mocha's xunit
    reporter (JUnit XML). `extra` goes to mocha (e.g. --grep NAME)."""
    report, log = out / f"{label}.xml", out / f"{label}.log"
    report.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST=host, PGPORT=str(port), PGPASSWORD=password, PGUSER="postgres",
               PGDATABASE="postgres", TS_NODE_TRANSPILE_ONLY="true")  # fmt: skip
    argv = [str(NODEPG_SRC / "node_modules" / ".bin" / "mocha"), "--reporter", "xunit",
            "--reporter-option", f"output={report}", *extra]  # fmt: skip
    print(f"\n===== {label}: PGHOST={host} PGPORT={port} (cwd {cwd})\n$ {' '.join(argv)}")
    started = time.monotonic()
    with log.open("w") as logf:
        try:
            subprocess.run(argv, cwd=cwd, env=env, stdout=logf, stderr=logf,
                           timeout=NODEPG_FILE_TIMEOUT * 5)  # fmt: skip
        except subprocess.TimeoutExpired:
            logf.write(f"\nno exit within {NODEPG_FILE_TIMEOUT * 5}s\n")
    outcomes = parse_junit(report)
    print(f"[{label}] {counts(outcomes)}  ({time.monotonic() - started:.1f}s, log {log})")
    return outcomes


def parse_junit(path: Path) -> Outcomes:
    outcomes: Outcomes = {}
    if not path.exists():
        return outcomes
    root = ET.parse(path).getroot()  # noqa: S314 (our own pytest run's report)
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (
                    (child.get("message") or "").splitlines()[0][:200]
                    if child.get("message")
                    else ""
                )
                break
        outcomes[name] = (outcome, message)
    return outcomes


def counts(outcomes: Outcomes) -> str:
    c = {k: 0 for k in ("passed", "failed", "error", "skipped")}
    for outcome, _ in outcomes.values():
        c[outcome] += 1
    return " ".join(f"{k}={v}" for k, v in c.items()) + f" total={len(outcomes)}"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--driver", choices=("pg8000", "asyncpg", "psycopg", "node-postgres"), default="pg8000"
    )
    ap.add_argument("--only", choices=("gateway", "direct"), help="run one side only")
    ap.add_argument(
        "--suite",
        choices=sorted(set(SUITES) | set(PSYCOPG_SUITES) | set(NODEPG_SUITES)),
        default="main",
        help="pg8000: main (its CI main-test selection, default) or auth (its auth/ folders);"
        " psycopg: main (its CI's, without slow and timing tests) or slow (those);"
        " node-postgres: main (pg's test/integration), cursor, pool, stream (pg-cursor's,"
        " pg-pool's, pg-query-stream's)",
    )
    ap.add_argument(
        "--register-test-databases",
        action="store_true",
        help=f"also register targets for the databases the suite names: pg8000 {TEST_DATABASES},"
        f" asyncpg {ASYNCPG_DATABASES}, node-postgres {NODEPG_DATABASES} (same-named databases)",
    )
    ap.add_argument("--keep", action="store_true", help="keep cluster/gateway state dirs")
    ap.add_argument("--out", type=Path, default=WORK / "results")
    ap.add_argument(
        "pytest_args", nargs="*", help="extra pytest args; node-postgres: test file path substrings"
    )
    args = ap.parse_args()
    known = {"pg8000": SUITES, "psycopg": PSYCOPG_SUITES}.get(args.driver, {"main": []})
    if args.driver == "node-postgres":
        known = {name: [] for name in NODEPG_SUITES}
    if args.suite not in known:
        ap.error(f"--suite {args.suite} is not a selection of {args.driver}'s suite")
    prepare(args.driver)
    args.out.mkdir(parents=True, exist_ok=True)

    from cli.localpg import SUPERUSER, SUPERUSER_PASSWORD, LocalCluster, free_port
    from gateway.control.targets import Target
    from tests.harness import StoredTargets, start_gateway, stop_gateway

    opa = ROOT / ".pgwarden" / "bin" / "opa"
    base = Path(tempfile.mkdtemp(prefix="pgwarden-ds-pg-"))
    base.chmod(0o755)
    state = Path(tempfile.mkdtemp(prefix="pgwarden-ds-gw-"))
    cluster = LocalCluster(base, free_port())
    if args.driver == "psycopg":
        # As psycopg's CI starts its server: the two-phase commit tests need prepared
        # transactions (off by default).
        cluster.init()
        with (cluster.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("max_prepared_transactions = 10\n")
    cluster.start()
    gw = None
    try:
        cluster.create_app_database()
        cluster.psql("CREATE EXTENSION IF NOT EXISTS hstore;")  # as pg8000's CI does
        gw = start_gateway(state, cluster, opa)
        # Added once the gateway runs, into its control store (a login naming a target
        # the gateway has not seen reads the store).
        stored = StoredTargets(gw.settings)
        test_databases = {
            "pg8000": TEST_DATABASES,
            "asyncpg": ASYNCPG_DATABASES,
            "node-postgres": NODEPG_DATABASES,
        }.get(args.driver, [])
        names = ["postgres", *(test_databases if args.register_test_databases else [])]
        for name in names:  # each target: the same-named database, as the superuser
            stored.add(
                Target(name=name, host="127.0.0.1", port=cluster.port, dbname=name,
                       user=SUPERUSER, password_env="PGWARDEN_TEST_UPSTREAM_PW", sslmode="disable",
                       # postgres/NAME reaches any database of the cluster.
                       databases=("*",) if name == "postgres" else ())
            )  # fmt: skip
        token = gw.token(f"agent:{args.driver}-suite", groups=("admins",), ttl=6 * 3600)
        results: dict[str, Outcomes] = {}
        sides = {"gateway": (gw.host, gw.port, token),
                 "direct": ("127.0.0.1", cluster.port, SUPERUSER_PASSWORD)}  # fmt: skip
        if args.driver == "node-postgres":
            for side, (host, port, password) in sides.items():
                if args.only in (None, side):
                    results[side] = run_nodepg(
                        side, args.suite, host, port, password, args.pytest_args, args.out
                    )
        elif args.only in (None, "gateway"):
            results["gateway"] = run_suite(
                "gateway",
                args.driver,
                args.suite,
                gw.host,
                gw.port,
                token,
                args.pytest_args,
                args.out,
            )
        if args.driver != "node-postgres" and args.only in (None, "direct"):
            results["direct"] = run_suite(
                "direct",
                args.driver,
                args.suite,
                "127.0.0.1",
                cluster.port,
                SUPERUSER_PASSWORD,
                args.pytest_args,
                args.out,
            )
    finally:
        if gw is not None:
            stop_gateway(gw)
        cluster.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(state, ignore_errors=True)

    if args.driver == "pg8000":
        title = f"pg8000 {PG8000_VERSION}, selection {args.suite!r}: " + " ".join(
            SUITES[args.suite]
        )
    elif args.driver == "psycopg":
        title = f"psycopg {PSYCOPG_VERSION}, selection {args.suite!r}: " + " ".join(
            PSYCOPG_SUITES[args.suite]
        )
    elif args.driver == "node-postgres":
        commit = (NODEPG_SRC / "SOURCE").read_text().split()[-1][:8]
        title = f"node-postgres {commit}, selection {args.suite!r}"
    else:
        title = f"asyncpg {ASYNCPG_VERSION}: tests/"
    print(f"\n===== {title} own test suite")
    for label, outcomes in results.items():
        print(f"{label:8s} {counts(outcomes)}")
    if len(results) == 2:
        gwr, dr = results["gateway"], results["direct"]
        diff = sorted(
            n
            for n in set(gwr) | set(dr)
            if gwr.get(n, ("missing", ""))[0] != dr.get(n, ("missing", ""))[0]
        )
        print(f"\n{len(diff)} tests differ (gateway vs direct):")
        for n in diff:
            g, d = gwr.get(n, ("missing", "")), dr.get(n, ("missing", ""))
            print(f"  {n}\n      gateway={g[0]} direct={d[0]}  {g[1] or d[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
