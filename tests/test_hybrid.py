"""The Neo4j+Qdrant hybrid: a write whose vector half fails is repaired, never served split (adapters/hybrid.py)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.embedder import BatchingEmbedder
from adapters.errors import StoreSpecError
from adapters.hybrid import HybridBackend
from adapters.model import Entity, ObservationAddition
from adapters.records import embedding_text, text_hash
from adapters.specs import parse
from tests.stores import make_store

S = "agent-7"


class FlakyVectors:
    """Makes the real Qdrant client's upserts fail while `down` is set: the vector half of a write fails."""

    def __init__(self, store: HybridBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = True
        client = store._vq
        real: Callable[..., Any] = client.upsert

        async def upsert(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise ConnectionError("qdrant unreachable (injected)")
            return await real(*args, **kwargs)

        monkeypatch.setattr(client, "upsert", upsert)


async def _names(store: HybridBackend, embedder: BatchingEmbedder, query: str) -> dict[str, float]:
    [vec] = await embedder.embed([query])
    found = await store.semantic_search(S, vec, 5, None, [])
    return {r.entity.name: r.score for r in found.results}


async def test_a_failed_vector_write_is_never_served_and_is_repaired(
        embedder: BatchingEmbedder, servers: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store("hybrid", embedder, tmp_path, servers)
    assert isinstance(store, HybridBackend)
    await store.open()
    v = itertools.count(1)
    try:
        await store.create_entities(S, [Entity("bob", "person", ("repairs bicycles",))], next(v))
        await store._embeddings.settled()
        flaky = FlakyVectors(store, monkeypatch)
        done = await store.create_entities(S, [Entity("alice", "person", ("drinks green tea every morning",))],
                                           next(v))
        assert [e.name for e in done.answer] == ["alice"]  # the graph half committed: the write is acknowledged
        await store._embeddings.settled()
        assert (await store.open_nodes(S, ["alice"])).entities[0].observations == ("drinks green tea every morning",)
        # While Qdrant refuses, search still answers, and never with a vector Neo4j does not confirm.
        assert "alice" not in await _names(store, embedder, "green tea")
        # A later observation changes alice's text while her first vector is still waiting: only the newest lands.
        await store.add_observations(S, [ObservationAddition("alice", ("keeps a tea diary",))], next(v))
        await store._embeddings.settled()
        flaky.down = False
        found = await _names(store, embedder, "green tea")  # the search first lands what was left behind
        assert found["alice"] > found.get("bob", -1.0)
        assert not store._unsynced
        stored = await store.get_vectors([(S, "alice")])
        alice = (await store.open_nodes(S, ["alice"])).entities[0]
        assert "keeps a tea diary" in alice.observations
        assert stored[(S, "alice")][0] == text_hash(embedding_text("alice", alice.entity_type, alice.observations))
    finally:
        await store.close()


async def test_vectors_lost_with_a_crash_are_recomputed_on_open(
        embedder: BatchingEmbedder, servers: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store("hybrid", embedder, tmp_path, servers)
    assert isinstance(store, HybridBackend)
    await store.open()
    FlakyVectors(store, monkeypatch)
    await store.create_entities(S, [Entity("carol", "person", ("plays the cello in an orchestra",))], 1)
    await store.close()  # the computed vector never reached Qdrant, and the process ends
    again = HybridBackend(store.spec, embedder)
    await again.open()  # embed_stale finds carol's lagging vector_hash
    try:
        assert "carol" in await _names(again, embedder, "cellist musician")
    finally:
        await again.close()


def test_spec_parts_are_store_specs_of_their_own() -> None:
    spec = parse("hybrid:?graph=bolt://neo4j:7687?prefix=Mem&vectors=qdrant+local:///var/q")
    graph, vectors = spec.parts["graph"], spec.parts["vectors"]
    assert (graph.text, vectors.text) == ("bolt://neo4j:7687?prefix=Mem", "qdrant+local:///var/q")
    assert (graph.kind, graph.host, graph.port, graph.options) == ("neo4j", "neo4j", 7687, {"prefix": "Mem"})
    assert (vectors.kind, vectors.path) == ("qdrant", "var/q")
    with pytest.raises(StoreSpecError, match="graph="):
        parse("hybrid:?graph=postgresql://x&vectors=qdrant://q")
    with pytest.raises(StoreSpecError, match="vectors="):
        parse("hybrid:?graph=bolt://x")
