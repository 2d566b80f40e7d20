"""The login endpoints on an admin listener that needs tokens of admin.token_groups (as off
loopback): they answer a person of any group, by the token each request carries, while
/metrics still refuses them. Real verifier, real control store, the app served in process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.admin.app import AdminAccess, admin_app
from gateway.admin.login import PersonTokens
from gateway.identity.local import LocalTokenSigner
from gateway.identity.verifier import IdentityVerifier
from gateway.settings import Settings, load_settings
from tests.harness import control_mirror
from tests.identity.test_oidc import AUDIENCE, IssuerKey, TestIssuer


@pytest.fixture
def idp() -> Iterator[TestIssuer]:
    server = TestIssuer()
    server.keys.append(IssuerKey("RS256", kid="k1"))
    yield server
    server.stop()


@pytest.fixture
def settings(tmp_path: Path, idp: TestIssuer) -> Settings:
    return load_settings(
        state_dir=tmp_path / "state",
        identity={"oidc_issuer": idp.url, "oidc_audience": AUDIENCE},
        admin={"token_groups": ["admins"]},
    )


@pytest.fixture
async def admin(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    settings.state_dir.mkdir(parents=True)
    async with control_mirror(settings) as mirror:
        verifier = IdentityVerifier.from_settings(settings, mirror)
        logins = PersonTokens(
            settings=settings,
            verify=verifier.verify,
            signer=LocalTokenSigner.from_settings(settings),
            store=mirror.store,
            listener_port=6543,
        )
        app = admin_app(
            registry=CollectorRegistry(),
            readiness=None,  # type: ignore[arg-type]  # not asked here
            access=AdminAccess(open_access=False, verify=verifier.verify, groups=["admins"]),
            logins=logins,
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            yield client
        await verifier.aclose()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_an_engineer_logs_in_and_out_where_metrics_need_admins(
    admin: httpx.AsyncClient, idp: TestIssuer
) -> None:
    idp_token = idp.keys[0].sign(idp.claims(groups=["engineers"]))
    assert (await admin.get("/metrics", headers=bearer(idp_token))).status_code == 403
    assert (await admin.get("/login/config")).json()["oidc_issuer"] == idp.url
    issued = await admin.post("/login/oidc", headers=bearer(idp_token))
    assert issued.status_code == 200, issued.text
    token = issued.json()["token"]
    assert (await admin.get("/metrics", headers=bearer(token))).status_code == 403
    out = await admin.post("/logout", headers=bearer(token))
    assert (out.status_code, out.json()) == (200, {"revoked": issued.json()["token_id"]})
    again = await admin.post("/logout", headers=bearer(token))
    assert (again.status_code, again.json()["detail"]) == (401, "token rejected: token revoked")
