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
from adapters.errors import FleetUnsafe
from adapters.model import Entity
from adapters.points import point_id
from adapters.qdrant import QdrantPoints
from adapters.records import Kind, ObservationRecord, RelationRecord
from proxy.engine.backends import backend_for
from proxy.engine.clock import HybridClock
from proxy.engine.control import MigrationOptions, SqliteControlStore
from proxy.engine.migration import MigrationEngine


def _payload(name: str, version: int) -> dict[str, object]:
    return {"scope": "s", "source": name, "relation_type": "knows", "target": "x", "metadata": {},
            "version": version, "deleted": False}


async def _versions(points: QdrantPoints, names: list[str]) -> dict[str, int]:
    ids = [point_id((Kind.RELATION, "s", (n, "knows", "x"))) for n in names]
    return {p["source"]: p["version"] for p in await points.get(Kind.RELATION, ids)}


# Versions as the clock makes them (milliseconds in the high bits), a few apart: two writes of one millisecond differ
# only in their low bits, which a 64-bit float (Qdrant's range type) cannot tell apart.
NOW = 252545732429479938


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(NOW, NOW + 50)), min_size=1,
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
        await alone.backfill.run()
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


async def test_a_deletion_hides_exactly_the_children_older_than_it_to_the_last_bit(backend: Backend) -> None:
    """Writes a millisecond apart or less differ only in their versions' low bits. A deletion at V hides every
    child older than V and none newer, on every store, however close the versions (a float comparison would not)."""
    await backend.create_entities("s", [Entity("a", "t", ("old",)), Entity("b", "t", ())], NOW)
    await backend.delete_entities("s", ["a"], NOW + 3)
    await backend.create_entities("s", [Entity("a", "t", ())], NOW + 4)
    # replication brings children from either side of the deletion, one version away from it
    await backend.apply([ObservationRecord("s", "a", "just before", NOW + 2, NOW + 2),
                         ObservationRecord("s", "a", "just after", NOW + 5, NOW + 5),
                         RelationRecord("s", "a", "knows", "b", NOW + 2),
                         RelationRecord("s", "b", "likes", "a", NOW + 5)])
    graph = await backend.open_nodes("s", ["a"])
    assert [e.observations for e in graph.entities] == [("just after",)]
    assert [(r.source, r.relation_type, r.target) for r in graph.relations] == [("b", "likes", "a")]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(NOW, NOW + 20),
                                   st.sampled_from([0, NOW + 1, NOW + 7, NOW + 15])), min_size=1, max_size=4),
                min_size=1, max_size=8))
def test_a_conditional_entity_write_keeps_the_newest_record_and_the_highest_purge_point(
        batches: list[list[tuple[str, int, int]]]) -> None:
    """Entity records merge two ways: the newest version wins, and purge points merge by maximum whatever the
    version. Written straight through the conditional path by writers that never read, in any order, each entity
    ends at the highest version and the highest purge point written to it."""
    async def run() -> dict[str, tuple[int, int]]:
        points = QdrantPoints("qdrant+local:///:memory:")
        await points.open(EmbeddingInfo(model="m", dimension=4))
        try:
            for batch in batches:
                rows = {point_id((Kind.ENTITY, "s", (n,))): {
                    "scope": "s", "name": n, "entity_type": "t", "metadata": {}, "version": v, "created": v,
                    "purged": p, "deleted": False} for n, v, p in batch}
                await points.put(Kind.ENTITY, list(rows.items()))
            found = await points.get(Kind.ENTITY, [point_id((Kind.ENTITY, "s", (n,))) for n in ("a", "b")])
            return {p["name"]: (p["version"], p["purged"]) for p in found}
        finally:
            await points.close()

    expected: dict[str, tuple[int, int]] = {}
    for batch in batches:
        last = {n: (v, p) for n, v, p in batch}
        for n, (v, p) in last.items():
            old_v, old_p = expected.get(n, (0, 0))
            expected[n] = (max(old_v, v), max(old_p, p))
    assert asyncio.run(run()) == expected
