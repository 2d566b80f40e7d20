"""Who is signed in to the console: a person, as the identity provider (or a token) named them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.identity.principal import Principal


@dataclass(frozen=True)
class Person:
    subject: str
    groups: frozenset[str]
    display_name: str
    via: Literal["oidc", "saml", "token"]


def acting_principal(person: Person) -> Principal:
    """The person as the approval desk and the audit trail name whoever acts: their
    subject and groups, as their sign-in (IdP or token) vouched for them."""
    return Principal(
        subject=person.subject,
        issuer=f"pgwarden-console:{person.via}",
        groups=tuple(sorted(person.groups)),
        token_id=f"console:{person.via}",
        expires_at=None,
        claims={"name": person.display_name},
    )
