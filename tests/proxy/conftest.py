"""Fixtures for data-path tests: an admins token and a direct psycopg connection for comparison."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.harness import RunningGateway


@pytest.fixture(scope="session")
def admin_token(gateway: RunningGateway) -> str:
    return str(gateway.token("agent:relay-tests", groups=("admins",)))


@pytest.fixture
def direct(gateway: RunningGateway) -> Iterator[psycopg.Connection[TupleRow]]:
    with psycopg.connect(gateway.direct_dsn(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def via(gateway: RunningGateway, admin_token: str) -> Iterator[psycopg.Connection[TupleRow]]:
    with psycopg.connect(gateway.dsn(admin_token), autocommit=True, connect_timeout=10) as conn:
        yield conn
