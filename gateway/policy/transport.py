"""The HTTP hop to OPA: one keep-alive httpx client over a Unix socket or loopback TCP."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import httpx
import orjson

from gateway.policy.parse import revision_of_bundles

if importlib.util.find_spec("sniffio") is None:
    # httpcore 1.0.x runs `import sniffio` on every request; anyio 4.16 no longer installs it,
    # so each request paid four failed imports (a sys.path scan each, ~250 µs in all, see
    # bench/opa_hop.py). A None entry makes the failed import instant and changes nothing else.
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]

# Host name used on the wire when the socket is a Unix socket; OPA ignores it.
_UDS_BASE = "http://opa"


class OpaUnreachable(Exception):
    """OPA could not be asked (refused, reset, timed out); the message says how it failed."""


class OpaTransport:
    """Posts policy inputs to OPA's data API and reads its health and bundle revision.

    `url` is `http://host:port` or `unix:///path/to/opa.sock`.
    """

    def __init__(
        self,
        url: str,
        *,
        decision_path: str,
        timeout_seconds: float,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self.decision_path = decision_path.strip("/")
        # `provenance` makes OPA name the bundle revision that made each decision, so the
        # audit record and the cache learn it from the answer itself at no extra round trip.
        self._decision_url = f"/v1/data/{self.decision_path}?provenance"
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=60.0,
        )
        if url.startswith("unix://"):
            transport = httpx.AsyncHTTPTransport(uds=url.removeprefix("unix://"), limits=limits)
            base_url = _UDS_BASE
        else:
            transport = httpx.AsyncHTTPTransport(limits=limits)
            base_url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            transport=transport,
            base_url=base_url,
            # The deadline is for OPA's answer; waiting for a pooled connection under a burst
            # is queueing, not an unresponsive OPA (the decider bounds the whole hop anyway).
            timeout=httpx.Timeout(timeout_seconds, pool=None),
            # No default User-Agent/Accept-Encoding: fewer bytes for OPA to parse per call.
            headers={"content-type": "application/json"},
            follow_redirects=False,
            trust_env=False,
        )
        for name in ("user-agent", "accept-encoding"):
            self._client.headers.pop(name, None)

    async def query(self, policy_input: dict[str, Any]) -> tuple[int, bytes]:
        """POST one input to the decision path; the HTTP status and the raw body."""
        return await self._post(self._decision_url, policy_input)

    async def query_rule(self, path: str, policy_input: dict[str, Any]) -> tuple[int, bytes]:
        """POST one input to another rule than the decision (the session rules)."""
        return await self._post(f"/v1/data/{path}", policy_input)

    async def _post(self, url: str, policy_input: dict[str, Any]) -> tuple[int, bytes]:
        # Wrapping the serialised input avoids building a second dict just to dump it.
        body = b'{"input":' + orjson.dumps(policy_input) + b"}"
        try:
            response = await self._client.post(url, content=body)
        except httpx.TimeoutException as exc:
            raise OpaUnreachable(f"OPA did not answer in time ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise OpaUnreachable(f"OPA unreachable at {self.url}: {_describe(exc)}") from exc
        return response.status_code, response.content

    async def revision(self) -> str | None:
        """The revision of the bundles OPA has loaded (None: no bundle loaded)."""
        try:
            response = await self._client.get("/v1/data/system/bundles")
        except httpx.HTTPError as exc:
            raise OpaUnreachable(f"OPA unreachable at {self.url}: {_describe(exc)}") from exc
        if response.status_code != 200:
            raise OpaUnreachable(f"OPA bundle status: HTTP {response.status_code}")
        result = orjson.loads(response.content).get("result")
        if not isinstance(result, dict):
            return None
        return revision_of_bundles(
            {
                name: (b.get("manifest") or {}).get("revision")
                for name, b in result.items()
                if isinstance(b, dict)
            }
        )

    async def healthy(self, *, bundles: bool) -> bool:
        """True when OPA is up (and, with `bundles`, has activated its bundles)."""
        try:
            response = await self._client.get("/health?bundles" if bundles else "/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def aclose(self) -> None:
        await self._client.aclose()


def _describe(exc: httpx.HTTPError) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
