"""Session settings the policy enforces on a principal's sessions: what the upstream session
starts with, which statements would raise or clear them, and whether they still hold.

How they hold. They are sent in the upstream startup packet, so PostgreSQL makes them the
session's reset values: RESET, RESET ALL, DISCARD ALL and SET ... TO DEFAULT return to them
(the server re-applies them; pgwarden lets those through). A SET that keeps within them
(a lower statement_timeout, read-only on) passes; one that raises or clears them, a READ
WRITE transaction, and every other way to change them (set_config(), a write to
pg_settings, ALTER ROLE/DATABASE ... SET, a FunctionCall of set_config) are refused.
Code pgwarden cannot see into (a user-defined function, CALL, DO) may call set_config():
the settings are read back from the server with the search_path read that follows such
code, before the next statement that needs it runs, and a session whose settings moved is
ended. Such code must therefore be the last statement of its Query message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.sql.facts import StatementFacts

READ_ONLY = "default_transaction_read_only"
STATEMENT_TIMEOUT = "statement_timeout"
IDLE_IN_TRANSACTION = "idle_in_transaction_session_timeout"
_READ_ONLY_NAMES = frozenset({READ_ONLY, "transaction_read_only"})
# Statements that run code pgwarden cannot see into, which may call set_config().
_OPAQUE_FLAGS = frozenset({"opaque_function"})
_OPAQUE_COMMANDS = frozenset({"CALL", "DO"})

# PostgreSQL's units for time settings whose base unit is the millisecond.
_UNITS_MS = {
    "us": 0.001,
    "ms": 1.0,
    "s": 1000.0,
    "min": 60_000.0,
    "h": 3_600_000.0,
    "d": 86_400_000.0,
}
_TIME = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-z]*)\s*")


def milliseconds(text: str) -> float | None:
    """A time setting's value (`5000`, `'30s'`, `1.5min`) in ms, as PostgreSQL reads it; None
    when it does not read as one."""
    match = _TIME.fullmatch(text.strip().strip("'\"").lower())
    if match is None:
        return None
    number, unit = match.groups()
    factor = _UNITS_MS.get(unit or "ms")
    return None if factor is None else float(number) * factor


def boolean(text: str) -> bool | None:
    """A boolean setting's value as PostgreSQL's parse_bool reads it (any unique prefix of
    true/false/yes/no, on/off from two letters, 1/0); None when it does not read as one."""
    word = text.strip().strip("'\"").lower()
    if word in ("1", "0"):
        return word == "1"
    if len(word) >= 2 and "on".startswith(word):
        return True
    if len(word) >= 2 and "off".startswith(word):
        return False
    for whole, value in (("true", True), ("false", False), ("yes", True), ("no", False)):
        if word and whole.startswith(word):
            return value
    return None


@dataclass(frozen=True, slots=True)
class EnforcedSettings:
    """What the policy enforces on one principal's sessions (nothing: all None/False)."""

    read_only: bool = False
    statement_timeout_ms: int | None = None
    idle_in_transaction_ms: int | None = None

    @property
    def active(self) -> bool:
        return (
            self.read_only
            or self.statement_timeout_ms is not None
            or self.idle_in_transaction_ms is not None
        )

    def startup_parameters(self) -> dict[str, str]:
        """Sent in the upstream startup packet: the session's values and its reset values."""
        params: dict[str, str] = {}
        if self.read_only:
            params[READ_ONLY] = "on"
        if self.statement_timeout_ms is not None:
            params[STATEMENT_TIMEOUT] = str(self.statement_timeout_ms)
        if self.idle_in_transaction_ms is not None:
            params[IDLE_IN_TRANSACTION] = str(self.idle_in_transaction_ms)
        return params

    @property
    def read_back(self) -> tuple[str, ...]:
        """The settings read back from the server after code pgwarden cannot see into."""
        return tuple(self.startup_parameters())

    def _caps(self) -> dict[str, int]:
        caps: dict[str, int] = {}
        if self.statement_timeout_ms is not None:
            caps[STATEMENT_TIMEOUT] = self.statement_timeout_ms
        if self.idle_in_transaction_ms is not None:
            caps[IDLE_IN_TRANSACTION] = self.idle_in_transaction_ms
        return caps

    def loosens(self, name: str, value: str) -> str | None:
        """Why setting `name` to `value` would raise or clear what is enforced (None: it
        keeps within it). A value that does not read as the setting's type loosens."""
        name = name.lower()
        if name in _READ_ONLY_NAMES:
            if self.read_only and boolean(value) is not True:
                return f"{name} must stay on: read-only is enforced on this session"
            return None
        cap = self._caps().get(name)
        if cap is None:
            return None
        ms = milliseconds(value)
        if ms is None or ms <= 0 or ms > cap:
            return (
                f"{name} may not be raised above {cap} ms or turned off:"
                " it is enforced on this session"
            )
        return None

    def refusal(self, statements: Sequence[StatementFacts]) -> str | None:
        """Why a message's statements may not run in a session with these settings enforced
        (None: they may, as far as these settings go)."""
        if not self.active:
            return None
        last = len(statements) - 1
        for i, facts in enumerate(statements):
            flags = facts.flags
            if self.read_only and "read_write" in flags:
                return (
                    "read-write transactions are not allowed: read-only is enforced on this session"
                )
            if "enforced_setting" in flags or (
                facts.command == "FUNCTION CALL"
                and any(f.rsplit(".", 1)[-1] == "set_config" for f in facts.functions)
            ):
                return (
                    "the statement may change a setting enforced on this session"
                    " (read-only, statement_timeout, idle_in_transaction_session_timeout);"
                    " only SET within the limits, or RESET, is allowed"
                )
            setting = facts.setting
            if setting is not None and setting[1] is not None:
                why = self.loosens(setting[0], setting[1])
                if why is not None:
                    return why
            if i < last and (
                _OPAQUE_FLAGS.intersection(flags) or facts.command in _OPAQUE_COMMANDS
            ):
                return (
                    "code pgwarden cannot see into must be the last statement of its Query"
                    " message while settings are enforced on the session (send the rest separately)"
                )
        return None

    def escaped(self, values: Mapping[str, str | None]) -> str | None:
        """Read back from the server after code pgwarden cannot see into: which enforced
        setting no longer holds (None: all do)."""
        for name in self.read_back:
            value = values.get(name)
            if value is None or self.loosens(name, value) is not None:
                return f"{name} is {value!r} on the server"
        return None
