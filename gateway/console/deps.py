"""What the console's routes are given by the composition root: the gateway parts they read
and act through (never copies of their rules)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.admin.approvals import TokenCheck
from gateway.control.store import ControlStore
from gateway.enforce.approvals import ApprovalDesk
from gateway.identity.principal import Principal
from gateway.settings import Settings


@dataclass(frozen=True)
class ConsoleDeps:
    settings: Settings
    # The data path's token check (signature, expiry, revocation): the token login uses it.
    verify: TokenCheck
    # The data path's recheck of an open session's token (revoked, expired): None if valid.
    still_valid: Callable[[Principal], str | None] | None = None
    control: ControlStore | None = None
    approvals: ApprovalDesk | None = None
    # The audit sink the gateway writes to (audit pages read through it; tokens revoked from
    # the console are recorded in it).
    audit: Any = None
    # The process environment (secrets named by *_env settings are read from it).
    environ: Mapping[str, str] = field(default_factory=dict)

    @property
    def admin_groups(self) -> frozenset[str]:
        return frozenset(self.settings.admin.token_groups)

    @property
    def tls(self) -> bool:
        """Whether browsers reach the console over TLS (its cookie is then Secure)."""
        s = self.settings
        if s.console.public_url:
            return s.console.public_url.startswith("https://")
        return s.admin.tls_cert is not None
