"""Who is signed in to the console: a person, as an identity provider or a token named them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Person:
    subject: str
    groups: frozenset[str]
    display_name: str
    via: Literal["oidc", "saml", "token"]
