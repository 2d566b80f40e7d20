"""Off loopback, /metrics needs a bearer token of one of admin.token_groups (checked by the
gateway's own token verifier); health probes need none. Tests use loopback addresses only,
so the app is driven in-process through its ASGI interface."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.admin import GatewayState, ReadinessChecks, admin_app, gateway_registry
from gateway.admin.app import AdminAccess
from gateway.identity.local import LocalTokenIssuer
from gateway.identity.verifier import IdentityVerifier
from gateway.metrics import GatewayMetrics, Latencies
from gateway.settings import Settings, load_settings
from tests.harness import identity_verifier


class _Up:
    up = True
    restarts = 0
    hits = 0
    misses = 0
    position: int | None = None
    index_lag = 0
    accepting = True

    def __init__(self) -> None:
        self.commit_seconds = Latencies()

    # The control store answers (readiness's targets part).
    problem: str | None = None


async def _bundle_loaded() -> bool:
    return True


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(state_dir=tmp_path / "state")


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with identity_verifier(settings) as verifier:
        async for c in _admin_client(verifier):
            yield c


async def _admin_client(verifier: IdentityVerifier) -> AsyncIterator[httpx.AsyncClient]:
    part = _Up()
    state = GatewayState(
        metrics=GatewayMetrics(), open_sessions=Counter, decisions=part, opa=part, audit=part
    )
    app = admin_app(
        registry=gateway_registry(state),
        readiness=ReadinessChecks(opa_serves_bundle=_bundle_loaded, audit=part, targets=part),
        access=AdminAccess(open_access=False, verify=verifier.verify, groups=["admins", "ops"]),
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://admin"
    ) as c:
        yield c


def _token(settings: Settings, *groups: str) -> str:
    issuer = LocalTokenIssuer.from_settings(settings)
    try:
        return issuer.issue("ops:prometheus", list(groups), 600).token
    finally:
        issuer.close()


async def test_metrics_without_a_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "pgwarden_" not in response.text


async def test_metrics_with_a_forged_token_is_401(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path
) -> None:
    good = _token(settings, "admins")
    header, payload, signature = good.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    another_key = _token(load_settings(state_dir=tmp_path / "elsewhere"), "admins")
    for token in (forged, another_key, "not-a-jwt"):
        response = await client.get("/metrics", headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 401, (token, response.text)
        assert "pgwarden_" not in response.text


async def test_metrics_with_a_token_of_another_group_is_403(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    token = _token(settings, "engineers")
    response = await client.get("/metrics", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert "pgwarden_" not in response.text


async def test_metrics_with_a_token_of_a_listed_group_is_served(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    token = _token(settings, "engineers", "ops")
    response = await client.get("/metrics", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert "pgwarden_opa_up 1.0" in response.text


async def test_health_probes_need_no_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
