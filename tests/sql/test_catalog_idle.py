"""The catalog's metadata connection does not hold its database: closed when idle, and on
release() once the query in flight is done."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from cli.localpg import LocalCluster
from gateway.sql import Catalog, StatementFacts, TableRef, analyze

pytestmark = pytest.mark.server


class Connections:
    """A connect function that keeps every connection it made."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.made: list[Any] = []

    async def __call__(self) -> Any:
        conn = await asyncpg.connect(self.dsn)
        self.made.append(conn)
        return conn

    def open(self) -> int:
        return sum(not c.is_closed() for c in self.made)


def one(sql: str) -> StatementFacts:
    (facts,) = analyze(sql)
    return facts


async def _eventually_closed(connections: Connections) -> None:
    for _ in range(200):
        if connections.open() == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the idle catalog connection was never closed")


async def test_an_idle_connection_is_closed_and_made_again_when_needed(
    pg_cluster: LocalCluster,
) -> None:
    connections = Connections(pg_cluster.dsn())
    cat = Catalog(connections, idle_seconds=0.2, ttl=0.0)
    try:
        f = await cat.resolve(one("SELECT * FROM pg_class"))
        assert f.reads == (TableRef("pg_catalog", "pg_class"),)
        assert connections.open() == 1
        await _eventually_closed(connections)
        f = await cat.resolve(one("SELECT * FROM pg_namespace"))
        assert "catalog_unavailable" not in f.flags
        assert len(connections.made) == 2
    finally:
        await cat.close()


async def test_a_connection_in_use_is_not_closed_as_idle(pg_cluster: LocalCluster) -> None:
    connections = Connections(pg_cluster.dsn())
    cat = Catalog(connections, idle_seconds=0.05)
    try:
        # A query longer than the idle time: the timer must not close it under the query.
        rows = await cat._fetch("SELECT pg_sleep(0.3), 1")
        assert rows[0][1] == 1
        assert len(connections.made) == 1
        await _eventually_closed(connections)
    finally:
        await cat.close()


async def test_release_waits_for_the_query_in_flight(pg_cluster: LocalCluster) -> None:
    connections = Connections(pg_cluster.dsn())
    cat = Catalog(connections, idle_seconds=0)
    try:
        query = asyncio.ensure_future(cat._fetch("SELECT pg_sleep(0.3), 1"))
        await asyncio.sleep(0.05)
        await cat.release()
        # The lookup in flight got its answer (not a dropped connection), then it closed.
        assert query.done() and query.result()[0][1] == 1
        assert connections.open() == 0
        assert len(connections.made) == 1
    finally:
        await cat.close()


async def test_idle_seconds_zero_keeps_the_connection(pg_cluster: LocalCluster) -> None:
    connections = Connections(pg_cluster.dsn())
    cat = Catalog(connections, idle_seconds=0)
    try:
        await cat._fetch("SELECT 1")
        await asyncio.sleep(0.2)
        assert connections.open() == 1
    finally:
        await cat.close()
