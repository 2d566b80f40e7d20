"""Fixtures for identity tests: a temp state dir, its settings, and JWT forging for bad cases."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.control.mirror import ControlMirror
from gateway.identity.local import LocalTokenIssuer, LocalTokenVerifier
from gateway.settings import Settings, load_settings
from tests.harness import control_mirror


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(state_dir=tmp_path / "state")


@pytest.fixture
def issuer(settings: Settings) -> Iterator[LocalTokenIssuer]:
    issuer = LocalTokenIssuer.from_settings(settings)
    yield issuer
    issuer.close()


@pytest.fixture
async def mirror(settings: Settings) -> AsyncIterator[ControlMirror]:
    """The control store as a gateway reads it (polled: the SQLite store)."""
    async with control_mirror(settings) as mirror:
        yield mirror


@pytest.fixture
def local_verifier(settings: Settings, mirror: ControlMirror) -> LocalTokenVerifier:
    return LocalTokenVerifier.from_settings(settings, mirror)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(claims))}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


@pytest.fixture
def forge() -> Callable[[dict[str, Any], dict[str, Any], Callable[[bytes], bytes]], str]:
    """Assembles a JWT by hand, for tokens pyjwt refuses to make (alg none, HS256 keyed with
    a public key)."""
    return _forge
