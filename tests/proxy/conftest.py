"""Fixtures for data-path tests: an admins token and a direct psycopg connection for comparison."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest


@pytest.fixture(scope="session")
def admin_token(gateway: Any) -> str:
    return str(gateway.token("agent:relay-tests", groups=("admins",)))


@pytest.fixture
def direct(gateway: Any) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def via(gateway: Any, admin_token: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(gateway.dsn(admin_token), autocommit=True, connect_timeout=10) as conn:
        yield conn
