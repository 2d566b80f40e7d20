"""Build the policy input document (schema version 1) for one statement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.identity.principal import Principal

INPUT_VERSION = 1


class TargetLike(Protocol):
    """What the input needs to know about the target and the database a session reaches."""

    @property
    def name(self) -> str: ...

    @property
    def database(self) -> str: ...

    @property
    def default_database(self) -> str: ...

    @property
    def databases(self) -> Sequence[str]: ...

    @property
    def labels(self) -> Mapping[str, str]: ...


class SessionLike(Protocol):
    """What the input needs to know about the client session."""

    @property
    def id(self) -> str: ...

    @property
    def client_addr(self) -> str | None: ...

    @property
    def application_name(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def in_transaction(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class TargetInfo:
    name: str
    # The database the session reaches ...
    database: str
    labels: Mapping[str, str] = field(default_factory=dict)
    # ... the target's own (dbname=TARGET); "" means `database` itself ...
    default_database: str = ""
    # ... and the others it lets clients choose (dbname=TARGET/DATABASE; "*": any).
    databases: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not self.default_database:
            object.__setattr__(self, "default_database", self.database)


def target_input(target: TargetLike) -> dict[str, Any]:
    """The input's `target` section: the policy sees which database of the target the
    session uses, besides the target's default and the others it allows."""
    return {
        "name": target.name,
        "database": target.database,
        "default_database": target.default_database,
        "databases": list(target.databases),
        "labels": dict(target.labels),
    }


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: str
    client_addr: str | None
    application_name: str
    # The startup packet's user: recorded for the policy, never trusted as identity.
    user: str
    in_transaction: bool = False


def build_input(
    principal: Principal,
    target: TargetLike,
    session: SessionLike,
    statement: dict[str, Any],
) -> dict[str, Any]:
    """The input document for one statement; `statement` comes from StatementFacts.to_input."""
    return assemble_input(principal.to_input(), target_input(target), session, statement)


def assemble_input(
    principal: dict[str, Any],
    target: dict[str, Any],
    session: SessionLike,
    statement: dict[str, Any],
) -> dict[str, Any]:
    """build_input() from the principal's and the target's parts already in input form (the
    statement gate makes them once per session): the one place the document is laid out."""
    return {
        "version": INPUT_VERSION,
        "principal": principal,
        "target": target,
        "session": {
            "id": session.id,
            "client_addr": session.client_addr,
            "application_name": session.application_name,
            "user": session.user,
            "in_transaction": session.in_transaction,
        },
        "statement": statement,
    }
