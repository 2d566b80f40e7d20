"""`pgwarden login` / `logout` end to end: a device-flow OIDC issuer served here, a real
gateway trusting it, the CLI run as a person runs it (a subprocess, HOME a temp folder), and
Debian's psql connecting through the gateway with nothing but `service=app`."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest

from cli.localpg import LocalCluster, free_port
from gateway.control.client import ControlClient
from tests.harness import ROOT, RunningGateway, start_gateway, stop_gateway
from tests.identity.test_oidc import AUDIENCE, IssuerKey, IssuerRoute, TestIssuer

pytestmark = pytest.mark.server

CLIENT_ID = "pgwarden-cli"
PGWARDEN = ROOT / ".venv" / "bin" / "pgwarden"
PSQL = shutil.which("psql") or "/usr/bin/psql"
# Short, so the tests poll several times in well under a second each.
INTERVAL = 0.2


def form_route(
    answer: Callable[[dict[str, str]], tuple[int, dict[str, Any]]],
) -> IssuerRoute:
    """A test issuer route taking form fields and answering JSON."""

    def route(path: str, headers: Message, body: bytes) -> tuple[int, dict[str, str], bytes]:
        status, reply = answer(dict(urllib.parse.parse_qsl(body.decode())))
        return status, {"Content-Type": "application/json"}, orjson.dumps(reply)

    return route


@dataclass
class DeviceFlow:
    """The issuer's device grant: one device code per request; its token endpoint answers
    the next scripted error (authorization_pending, slow_down, access_denied,
    expired_token) or, on "token", a token signed with the issuer's key."""

    idp: TestIssuer
    key: IssuerKey
    answers: list[str] = field(default_factory=list)
    claims: dict[str, Any] = field(default_factory=dict)
    polls: list[float] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    device_requests: list[dict[str, str]] = field(default_factory=list)
    _codes: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.idp.metadata |= {
            "device_authorization_endpoint": f"{self.idp.url}/device",
            "token_endpoint": f"{self.idp.url}/token",
        }
        self.idp.routes[("POST", "/device")] = form_route(self.device)
        self.idp.routes[("POST", "/token")] = form_route(self.token)

    def script(self, *answers: str, **claims: Any) -> None:
        with self._lock:
            self.answers[:] = answers
            self.claims = claims
            self.polls.clear()

    def device(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self.device_requests.append(form)
        if form.get("client_id") != CLIENT_ID:
            return 400, {"error": "invalid_client"}
        code = uuid.uuid4().hex
        self._codes.add(code)
        return 200, {
            "device_code": code,
            "user_code": "WDJB-MJHT",
            "verification_uri": f"{self.idp.url}/activate",
            "verification_uri_complete": f"{self.idp.url}/activate?user_code=WDJB-MJHT",
            "expires_in": 30,
            "interval": INTERVAL,
        }

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.polls.append(time.monotonic())
            good = (
                form.get("grant_type") == "urn:ietf:params:oauth:grant-type:device_code"
                and form.get("device_code") in self._codes
                and form.get("client_id") == CLIENT_ID
            )
            if not good:
                return 400, {"error": "invalid_grant"}
            answer = self.answers.pop(0) if self.answers else "authorization_pending"
            if answer != "token":
                return 400, {"error": answer}
            token = self.key.sign(self.idp.claims(**self.claims))
            self.issued.append(token)
            return 200, {"access_token": token, "id_token": token, "token_type": "Bearer"}


@pytest.fixture(scope="module")
def login_gateway(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[tuple[RunningGateway, DeviceFlow]]:
    idp = TestIssuer()
    key = IssuerKey("RS256", kid="k1")
    idp.keys.append(key)
    flow = DeviceFlow(idp, key)
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-login-"))
    gw = start_gateway(
        state,
        pg_cluster,
        opa_binary,
        identity={"oidc_issuer": idp.url, "oidc_audience": AUDIENCE},
        admin={"host": "127.0.0.1", "port": free_port()},
        console={"login_client_id": CLIENT_ID, "login_token_hours": 2},
    )
    try:
        yield gw, flow
    finally:
        stop_gateway(gw)
        idp.stop()
        shutil.rmtree(state, ignore_errors=True)


def admin_url(gw: RunningGateway) -> str:
    assert gw.gateway.admin is not None and gw.gateway.admin.address is not None
    host, port = gw.gateway.admin.address
    return f"http://{host}:{port}"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def person_env(home: Path, **extra: str) -> dict[str, str]:
    """A person's shell: their HOME, no PG* or PGWARDEN_* variables of the test run."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGWARDEN_")) and k != "HOME"
    }
    return env | {"HOME": str(home)} | extra


def pgwarden(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PGWARDEN), *args],
        env=env or person_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=60,
    )


def login(
    gw: RunningGateway, home: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return pgwarden(
        home,
        "login",
        "app",
        "--gateway-url",
        admin_url(gw),
        "--sslrootcert",
        str(gw.certs.ca_cert),
        *extra,
        env=env,
    )


def psql(
    home: Path, conninfo: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PSQL, conninfo, "-X", "-At", "-w", "-c", "SELECT 40 + 2"],
        env=env or person_env(home),
        capture_output=True,
        text=True,
        timeout=30,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def marked_passwords(pgpass: Path) -> list[str]:
    """The .pgpass lines pgwarden login wrote (each follows its marker comment)."""
    lines = pgpass.read_text().splitlines()
    return [lines[i + 1] for i, line in enumerate(lines) if line.startswith("# pgwarden login")]


def jti_of(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


def test_login_psql_second_login_and_logout(
    login_gateway: tuple[RunningGateway, DeviceFlow], home: Path
) -> None:
    gw, flow = login_gateway
    services, pgpass = home / ".pg_service.conf", home / ".pgpass"
    # Entries of the person's own, which login and logout must leave as they are.
    services.write_text("[other]\nhost=db.example\nport=5432\ndbname=other\n")
    pgpass.write_text("db.example:5432:other:bob:s3cret\n")
    pgpass.chmod(0o600)

    flow.script("authorization_pending", "authorization_pending", "authorization_pending", "token")
    done = login(gw, home)
    assert done.returncode == 0, done.stderr
    assert f"{flow.idp.url}/activate?user_code=WDJB-MJHT" in done.stdout
    assert "WDJB-MJHT" in done.stdout
    # Four polls, each at least the interval after the one before.
    assert len(flow.polls) == 4
    assert all(b - a >= INTERVAL * 0.9 for a, b in zip(flow.polls, flow.polls[1:], strict=False))
    assert flow.device_requests[-1]["scope"] == "openid profile email"

    assert mode(services) == 0o600 and mode(pgpass) == 0o600
    assert "[other]\nhost=db.example\nport=5432\ndbname=other" in services.read_text()
    assert "db.example:5432:other:bob:s3cret" in pgpass.read_text().splitlines()
    [first_line] = marked_passwords(pgpass)
    first_token = first_line.rsplit(":", 1)[1]
    # The token is the gateway's own, not the IdP's, with the person's subject and groups.
    claims = jwt.decode(first_token, options={"verify_signature": False})
    assert claims["iss"] == gw.settings.identity.local_issuer
    assert (claims["sub"], claims["groups"]) == ("alice@example.com", ["engineers"])
    assert 2 * 3600 - 60 <= claims["exp"] - claims["iat"] <= 2 * 3600
    with ControlClient(gw.settings) as control:
        record = control.token(claims["jti"])
    assert record is not None and record.subject == "alice@example.com"

    # No password, no host on the command line: the service entry and .pgpass say it all.
    ran = psql(home, "service=app")
    assert (ran.returncode, ran.stdout.strip()) == (0, "42"), ran.stderr

    flow.script("authorization_pending", "token")
    again = login(gw, home)
    assert again.returncode == 0, again.stderr
    assert services.read_text().count("[app]") == 1
    [second_line] = marked_passwords(pgpass)
    second_token = second_line.rsplit(":", 1)[1]
    assert second_token != first_token
    assert "db.example:5432:other:bob:s3cret" in pgpass.read_text().splitlines()
    assert mode(services) == 0o600 and mode(pgpass) == 0o600
    ran = psql(home, "service=app")
    assert (ran.returncode, ran.stdout.strip()) == (0, "42"), ran.stderr
    # The replaced token is written nowhere any more, and no longer accepted.
    assert f"revoked token {jti_of(first_token)}" in again.stdout
    host, port = gw.host, gw.port
    direct = f"host={host} port={port} dbname=app user=alice sslmode=disable"
    refused = psql(home, direct, env=person_env(home, PGPASSWORD=first_token))
    assert refused.returncode != 0 and "token revoked" in refused.stderr

    out = pgwarden(home, "logout", "app")
    assert out.returncode == 0, out.stderr
    assert f"revoked token {jti_of(second_token)}" in out.stdout
    assert "[app]" not in services.read_text()
    assert marked_passwords(pgpass) == []
    assert "[other]\nhost=db.example" in services.read_text()
    assert "db.example:5432:other:bob:s3cret" in pgpass.read_text().splitlines()
    gone = psql(home, "service=app")
    assert gone.returncode != 0
    # The token itself, presented again (PGPASSWORD, not the command line), is refused by
    # the gateway.
    refused = psql(home, direct, env=person_env(home, PGPASSWORD=second_token))
    assert refused.returncode != 0
    assert "pgwarden" in refused.stderr and "token revoked" in refused.stderr
    with ControlClient(gw.settings) as control:
        record = control.token(jti_of(second_token))
    assert record is not None and record.revoked_at is not None


def test_pgservicefile_and_pgpassfile_are_honoured(
    login_gateway: tuple[RunningGateway, DeviceFlow], home: Path, tmp_path: Path
) -> None:
    gw, flow = login_gateway
    services, pgpass = tmp_path / "conf" / "services", tmp_path / "conf" / "passwords"
    env = person_env(home, PGSERVICEFILE=str(services), PGPASSFILE=str(pgpass))
    flow.script("token")
    done = login(gw, home, env=env)
    assert done.returncode == 0, done.stderr
    assert mode(services) == 0o600 and mode(pgpass) == 0o600
    assert not (home / ".pg_service.conf").exists() and not (home / ".pgpass").exists()
    ran = psql(home, "service=app", env=env)
    assert (ran.returncode, ran.stdout.strip()) == (0, "42"), ran.stderr
    out = pgwarden(home, "logout", "app", env=env)
    assert out.returncode == 0, out.stderr
    assert "[app]" not in services.read_text()


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ("access_denied", "the sign-in was refused at the identity provider (access_denied)"),
        ("expired_token", "the code expired before it was confirmed at the identity provider"),
    ],
)
def test_a_refused_or_expired_device_code_is_a_clear_error_and_writes_nothing(
    login_gateway: tuple[RunningGateway, DeviceFlow], home: Path, answer: str, said: str
) -> None:
    gw, flow = login_gateway
    flow.script("authorization_pending", answer)
    with ControlClient(gw.settings) as control:
        before = len(control.tokens())
    done = login(gw, home)
    assert done.returncode == 1
    assert said in done.stderr and "nothing was written" in done.stderr
    assert not (home / ".pg_service.conf").exists() and not (home / ".pgpass").exists()
    with ControlClient(gw.settings) as control:
        assert len(control.tokens()) == before


def test_logout_with_the_gateway_unreachable_still_removes_the_entries(
    login_gateway: tuple[RunningGateway, DeviceFlow], home: Path
) -> None:
    gw, flow = login_gateway
    flow.script("token")
    assert login(gw, home).returncode == 0
    [line] = marked_passwords(home / ".pgpass")
    jti = jti_of(line.rsplit(":", 1)[1])
    out = pgwarden(home, "logout", "app", "--gateway-url", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1
    assert "removed [app]" in out.stdout
    assert "could not be reached" in out.stderr and f"pgwarden tokens revoke {jti}" in out.stderr
    assert "[app]" not in (home / ".pg_service.conf").read_text()
    assert marked_passwords(home / ".pgpass") == []


# -- the exchange endpoint itself --------------------------------------------------------


def exchange(gw: RunningGateway, token: str) -> httpx.Response:
    return httpx.post(
        f"{admin_url(gw)}/login/oidc", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def test_exchange_refuses_what_the_data_path_refuses_and_pgwarden_tokens(
    login_gateway: tuple[RunningGateway, DeviceFlow],
) -> None:
    gw, flow = login_gateway
    idp = flow.idp
    wrong_audience = flow.key.sign(idp.claims(aud="another-app"))
    expired = flow.key.sign(idp.claims(exp=int(time.time()) - 3600))
    stranger = IssuerKey("RS256", kid="k1").sign(idp.claims())
    for token, check in [
        (wrong_audience, "wrong audience"),
        (expired, "token expired"),
        (stranger, "bad signature"),
    ]:
        answer = exchange(gw, token)
        assert (answer.status_code, answer.json()["detail"]) == (401, f"token rejected: {check}")
    # A pgwarden token cannot renew itself.
    own = exchange(gw, gw.token("alice@example.com", ("engineers",)))
    assert own.status_code == 401 and "cannot be exchanged" in own.json()["detail"]
    assert httpx.post(f"{admin_url(gw)}/login/oidc", timeout=10).status_code == 401
    # An IdP token cannot be "logged out" here: the IdP bounds it.
    idp_token = flow.key.sign(idp.claims())
    answer = httpx.post(
        f"{admin_url(gw)}/logout", headers={"Authorization": f"Bearer {idp_token}"}, timeout=10
    )
    assert answer.status_code == 400


def test_lifetime_counts_from_the_sign_in_at_the_idp(
    login_gateway: tuple[RunningGateway, DeviceFlow],
) -> None:
    gw, flow = login_gateway
    now = int(time.time())
    # Signed in 90 minutes ago: 30 of the 2 hours (console.login_token_hours) are left.
    recent = exchange(gw, flow.key.sign(flow.idp.claims(auth_time=now - 5400)))
    assert recent.status_code == 200, recent.text
    issued = recent.json()
    assert abs(issued["expires_at"] - (now - 5400 + 7200)) <= 5
    assert issued["listener"] == {"host": "", "port": gw.port, "tls": True}
    stale = exchange(gw, flow.key.sign(flow.idp.claims(auth_time=now - 3 * 3600)))
    assert stale.status_code == 401 and "sign in there again" in stale.json()["detail"]
