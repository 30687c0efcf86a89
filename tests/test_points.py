"""The point-database stores (Qdrant, ChromaDB) where several writers meet: Qdrant's conditional writes checked in
Qdrant itself (the client's local mode implements `update_filter` as a server does), and a fleet refusing the stores
that cannot be shared."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import Backend
from adapters.embedder import BatchingEmbedder, EmbeddingInfo
from adapters.points import point_id
from adapters.qdrant import QdrantPoints
from adapters.records import Kind
from proxy.clock import HybridClock
from proxy.control import MigrationOptions, SqliteControlStore
from proxy.errors import FleetUnsafe
from proxy.migration import MigrationEngine
from proxy.stores import backend_for


def _payload(name: str, version: int) -> dict[str, object]:
    return {"scope": "s", "source": name, "relation_type": "knows", "target": "x", "metadata": {},
            "version": version, "deleted": False}


async def _versions(points: QdrantPoints, names: list[str]) -> dict[str, int]:
    ids = [point_id((Kind.RELATION, "s", (n, "knows", "x"))) for n in names]
    return {p["source"]: p["version"] for p in await points.get(Kind.RELATION, ids)}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 50)), min_size=1,
                         max_size=6), min_size=1, max_size=8))
def test_a_conditional_write_never_replaces_a_newer_record_whatever_the_batches(
        batches: list[list[tuple[str, int]]]) -> None:
    """Writers that never read first (the worst case of two proxies racing): each batch written straight through
    the conditional path, in any order and mix of versions. Every point ends at the highest version written to it,
    as apply-if-newer says, because Qdrant decides each write against what it holds."""
    async def run() -> dict[str, int]:
        points = QdrantPoints("qdrant+local:///:memory:")
        await points.open(EmbeddingInfo(model="m", dimension=4))
        try:
            for batch in batches:
                rows = {point_id((Kind.RELATION, "s", (n, "knows", "x"))): _payload(n, v) for n, v in batch}
                await points.put(Kind.RELATION, list(rows.items()))
            return await _versions(points, ["a", "b", "c", "d"])
        finally:
            await points.close()

    expected: dict[str, int] = {}
    for batch in batches:
        last: dict[str, int] = {}
        for n, v in batch:
            last[n] = v  # within one batch the last row of a point is the one sent
        for n, v in last.items():
            expected[n] = max(expected.get(n, 0), v)
    assert asyncio.run(run()) == expected


@pytest.mark.parametrize("target", ["qdrant+local:///{d}/q", "chroma+local:///{d}/c"])
async def test_a_fleet_refuses_a_store_several_proxies_cannot_write_at_once(
        embedder: BatchingEmbedder, tmp_path: Path, target: str) -> None:
    spec = target.format(d=tmp_path)

    async def open_store(s: str) -> Backend:
        store = backend_for(s, embedder)
        await store.open()
        return store

    control = SqliteControlStore(tmp_path / "control.db", initial_primary=f"sqlite:///{tmp_path}/a.db")
    fleet = MigrationEngine(control, open_store, HybridClock(3), background=False, fleet=True)
    await fleet.start()
    try:
        with pytest.raises(FleetUnsafe) as refused:
            await fleet.start_migration(spec, MigrationOptions(), "test")
        assert "a fleet cannot share" in str(refused.value) and "one proxy" in str(refused.value)
    finally:
        await fleet.stop()
    # one proxy may use it, and a fleet whose primary it is does not start
    alone = MigrationEngine(control, open_store, HybridClock(3), background=False)
    await alone.start()
    try:
        await alone.start_migration(spec, MigrationOptions(), "test")
        await alone.run_backfill()
        await alone.advance(alone.state.phase, "test")
        await alone.advance(alone.state.phase, "test")
    finally:
        await alone.stop()
    assert (await control.load()).primary == spec
    fleet = MigrationEngine(control, open_store, HybridClock(3), background=False, fleet=True)
    with pytest.raises(FleetUnsafe):
        await fleet.start()
    await fleet.stop()
    await control.close()
