"""Fixtures of the tests that run `pgwarden serve` as a process (serve_process.py)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import TupleRow

from cli.localpg import APP_DB, LocalCluster

from .serve_process import kill_leftovers


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A fresh state dir for a gateway process; what still runs from it goes with it."""
    # Short: OPA's unix socket lives under it and sockaddr_un is small.
    path = Path(tempfile.mkdtemp(prefix="pgw-"))
    try:
        yield path
    finally:
        kill_leftovers(path)


@pytest.fixture
def direct(pg_cluster: LocalCluster, app_database: str) -> Iterator[psycopg.Connection[TupleRow]]:
    """Straight to the application database, bypassing any gateway."""
    with psycopg.connect(pg_cluster.dsn(dbname=APP_DB), autocommit=True) as conn:
        yield conn
