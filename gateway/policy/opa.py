"""The Decider that asks OPA: transport plus parser, bounded in time, never raising."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import replace
from typing import Any

from gateway.policy.decision import Decision
from gateway.policy.parse import parse_response
from gateway.policy.transport import OpaTransport, OpaUnreachable

log = logging.getLogger(__name__)


class OpaDecider:
    """Asks OPA for each input; any failure becomes a deny that says what went wrong."""

    def __init__(self, transport: OpaTransport, *, timeout_seconds: float) -> None:
        self.transport = transport
        self.timeout_seconds = timeout_seconds

    async def decide(self, policy_input: dict[str, Any], *, not_after: float | None) -> Decision:
        decision = await self._ask(policy_input)
        if decision.decision_id is None:
            # OPA hands out ids only when its decision log is on; the audit record and the
            # client's error DETAIL still need one id to point at this decision.
            decision = replace(decision, decision_id=str(uuid.uuid4()))
        return decision

    async def _ask(self, policy_input: dict[str, Any]) -> Decision:
        try:
            # httpx bounds each phase separately; this bounds the whole hop.
            async with asyncio.timeout(self.timeout_seconds):
                status, body = await self.transport.query(policy_input)
        except TimeoutError:
            return Decision.refuse(f"OPA did not answer within {self.timeout_seconds:g}s")
        except OpaUnreachable as exc:
            # Where OPA listens (a socket path, an internal address) is the operator's to
            # know: the log has it, the client gets what it can act on.
            log.warning("%s", exc)
            return Decision.refuse(
                "OPA unreachable: the policy engine is not answering, so no statement can run;"
                " retry shortly, or tell the gateway's operator if it persists"
            )
        except Exception as exc:  # the protocol promises no exception ever reaches the proxy
            log.exception("OPA query failed")
            return Decision.refuse(f"OPA query failed: {type(exc).__name__}")
        return parse_response(status, body)
