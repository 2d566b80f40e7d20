"""Readiness: whether this gateway can take statements now, and if not, what is missing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

# A readiness probe must answer even while OPA hangs (stopped, overloaded).
OPA_PROBE_SECONDS = 1.0


class AuditHealth(Protocol):
    """What the audit sink (the writer, or its process's supervisor) says of itself."""

    @property
    def accepting(self) -> bool: ...


class TargetList(Protocol):
    # Why the control store holding the targets (and the token registry) was not readable
    # at its last look; None while it is.
    @property
    def problem(self) -> str | None: ...


@dataclass(frozen=True)
class ReadinessChecks:
    """The parts a statement needs: OPA with a bundle, the audit writer, the target registry;
    and a gateway that is not draining (SIGTERM: new connections are refused)."""

    opa_serves_bundle: Callable[[], Awaitable[bool]]
    audit: AuditHealth
    targets: TargetList
    draining: Callable[[], bool] = field(default=lambda: False)

    async def problems(self) -> dict[str, str]:
        """Each part that is not ready, with why; empty when all are."""
        found: dict[str, str] = {}
        if self.draining():
            found["gateway"] = "draining: new connections are refused"
        opa = await opa_problem(self.opa_serves_bundle)
        if opa is not None:
            found["opa"] = opa
        audit = audit_problem(self.audit)
        if audit is not None:
            found["audit"] = audit
        targets = targets_problem(self.targets)
        if targets is not None:
            found["targets"] = targets
        return found


async def opa_problem(serves_bundle: Callable[[], Awaitable[bool]]) -> str | None:
    try:
        async with asyncio.timeout(OPA_PROBE_SECONDS):
            if await serves_bundle():
                return None
    except TimeoutError:
        return f"OPA did not answer its health check within {OPA_PROBE_SECONDS:g}s"
    return "OPA is not running or has no policy bundle loaded"


def audit_problem(audit: AuditHealth) -> str | None:
    # One attribute of the sink, so that a supervisor's richer state (up, restarting) can
    # be pointed at here alone.
    if audit.accepting:
        return None
    return "the audit writer is not accepting records"


def targets_problem(targets: TargetList) -> str | None:
    if targets.problem is None:
        return None
    return f"the control store (targets, token registry) is not readable: {targets.problem}"
