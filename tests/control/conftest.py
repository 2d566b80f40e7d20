"""Fixtures of the control store tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cli.localpg import LocalCluster
from tests.harness import create_scratch_database, drop_scratch_database


@pytest.fixture(scope="module")
def control_dsn(pg_cluster: LocalCluster) -> Iterator[str]:
    """A PostgreSQL control store of the module's own: an empty scratch database."""
    name, dsn = create_scratch_database(pg_cluster, "pgwarden_control")
    try:
        yield dsn
    finally:
        drop_scratch_database(pg_cluster, name)
