"""What a reload (SIGHUP) may change in a running gateway: the settings that take effect
without a restart, and the plain-words account of what changed."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from gateway.control.targets import Target
from gateway.settings import Settings

# Settings read where they are used (by each new session, at each statement), so a new
# value reaches everything after the reload. Every other setting is bound into a part built
# at start (the listener's socket, OPA, the audit writer, the verifiers): it needs a restart.
RELOADABLE = frozenset(
    {
        "listener.allow_plaintext_password",
        "listener.max_message_size",
        "listener.max_startup_size",
        "listener.startup_timeout_seconds",
        "identity.recheck_seconds",
        "audit.record_rows_limit",
        "audit.record_bytes_limit",
        "shutdown.drain_seconds",
        "log.level",
    }
)


def flat_settings(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Every setting by its dotted name (`listener.port`), as in the TOML file's sections."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(flat_settings(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


@dataclass(frozen=True, slots=True)
class SettingsChange:
    """The settings a reload found changed: those it applied and those left until a restart."""

    applied: tuple[str, ...]
    needs_restart: tuple[str, ...]
    settings: Settings


def settings_change(running: Settings, reread: Settings) -> SettingsChange:
    """Apply to `running` what `reread` changes among the reloadable settings."""
    old, new = flat_settings(running), flat_settings(reread)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    applied = tuple(k for k in changed if k in RELOADABLE)
    sections: dict[str, dict[str, Any]] = {}
    for key in applied:
        section, _, field = key.partition(".")
        sections.setdefault(section, {})[field] = new[key]
    settings = running
    if sections:
        update = {
            section: getattr(running, section).model_copy(update=fields)
            for section, fields in sections.items()
        }
        settings = running.model_copy(update=update)
    if "log.level" in applied:
        level = str(new["log.level"]).upper()
        for logger in (logging.getLogger(), logging.getLogger("pgwarden")):
            logger.setLevel(level)
    return SettingsChange(
        applied=tuple(f"{k} = {new[k]!r}" for k in applied),
        # Names only: a value may hold a secret (a DSN's password).
        needs_restart=tuple(k for k in changed if k not in RELOADABLE),
        settings=settings,
    )


def targets_change(before: Mapping[str, Target], after: Mapping[str, Target]) -> str | None:
    """`added a; removed b; changed c`, or None when the targets are as they were."""
    parts = []
    for verb, names in (
        ("added", sorted(after.keys() - before.keys())),
        ("removed", sorted(before.keys() - after.keys())),
        ("changed", sorted(n for n in before.keys() & after.keys() if before[n] != after[n])),
    ):
        if names:
            parts.append(f"{verb} {', '.join(names)}")
    return "; ".join(parts) or None
