"""OIDC through the real gateway: a key the issuer withdraws from its JWKS stops verifying
logins and ends the sessions it verified, on the schedule its cache headers set."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.localpg import LocalCluster
from gateway.protocol import ErrorResponse
from tests.harness import RunningGateway, start_gateway, stop_gateway
from tests.identity.test_oidc import AUDIENCE, IssuerKey, TestIssuer

from .wire import LoginRefused, RawClient

pytestmark = pytest.mark.server


@pytest.fixture
def oidc_gateway(
    pg_cluster: LocalCluster, app_database: str, opa_binary: Path
) -> Iterator[tuple[RunningGateway, TestIssuer]]:
    idp = TestIssuer()
    idp.keys.append(IssuerKey("RS256", kid="k1"))
    # The issuer says its key set may be kept for one second.
    idp.cache_headers = {"Cache-Control": "max-age=1"}
    state = Path(tempfile.mkdtemp(prefix="pgwarden-gw-oidc-"))
    identity = {
        "oidc_issuer": idp.url,
        "oidc_audience": AUDIENCE,
        "oidc_jwks_min_refresh_seconds": 0.5,
        "oidc_jwks_max_refresh_seconds": 30,
    }
    gw = start_gateway(state, pg_cluster, opa_binary, identity=identity)
    try:
        yield gw, idp
    finally:
        stop_gateway(gw)
        idp.stop()
        shutil.rmtree(state, ignore_errors=True)


def _login(gw: RunningGateway, token: str) -> RawClient:
    client = RawClient.connect(gw.host, gw.port, timeout=10)
    try:
        client.login("app", token)
    except BaseException:
        client.close()
        raise
    return client


def test_withdrawn_key_ends_its_sessions_and_logins(
    oidc_gateway: tuple[RunningGateway, TestIssuer],
) -> None:
    gw, idp = oidc_gateway
    old_key = idp.keys[0]
    old_token = old_key.sign(idp.claims(groups=["admins"]))
    client = _login(gw, old_token)
    try:
        assert client.query("SELECT 1")[-1][0] == ord("Z")
        new_key = IssuerKey("RS256", kid="k2")
        idp.keys[:] = [new_key]  # k1 withdrawn
        withdrawn = time.monotonic()
        client.timeout = 10  # well under the ceiling (30 s) and the periodic recheck (30 s)
        code, body = client.frame()  # the idle session is ended, unprompted
        ended = time.monotonic()
        err = ErrorResponse.decode(body)
        assert (chr(code), err.severity, err.sqlstate) == ("E", "FATAL", "28P01")
        assert err.message == "pgwarden: session ended: signing key withdrawn"
        assert client.answers_or_closes(5) == "closed"
    finally:
        client.close()
    print(f"session ended {1000 * (ended - withdrawn):.0f} ms after the key was withdrawn")
    with pytest.raises(LoginRefused) as info:
        _login(gw, old_key.sign(idp.claims(groups=["admins"])))
    assert info.value.error.message == "pgwarden: token rejected: unknown signing key"
    fresh = _login(gw, new_key.sign(idp.claims(groups=["admins"])))
    try:
        assert fresh.query("SELECT 1")[-1][0] == ord("Z")
    finally:
        fresh.close()
