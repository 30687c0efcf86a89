"""Migrations between real stores, end to end: agents keep writing through the proxy while the backfill runs, and
every migration ends with a Verify of zero differences and the new primary holding exactly what was acknowledged."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from adapters.base import Backend
from adapters.embedder import BatchingEmbedder
from memshift.v1 import admin_pb2 as apb
from proxy.engine.backends import backend_for, redact
from tests.cluster import AUTH, boot, run_verify, seed, shutdown, wait_for
from tests.test_migration_e2e import Agent, Crowd, graph_of

_schemas = itertools.count()


def spec_for(kind: str, d: Path, servers: dict[str, str], role: str) -> str:
    if kind == "embedded":
        return f"sqlite:///{d}/{role}.db"
    if kind == "postgres":
        return f"{servers['postgres']}?schema=mig{next(_schemas)}_{role}"
    if kind == "qdrant":
        return f"qdrant+local:///{d}/{role}-qdrant"
    if kind == "neo4j":
        return f"{servers['neo4j']}?prefix=Mig{next(_schemas)}{role}"
    if kind == "hybrid":
        graph = f"{servers['neo4j']}?prefix=Mig{next(_schemas)}{role}"
        return f"hybrid:?graph={graph}&vectors=qdrant+local:///{d}/{role}-vectors"
    if kind == "qdrant-edge":
        return f"qdrant+edge:///{d}/{role}-edge"
    if kind == "chroma-local":
        return f"chroma+local:///{d}/{role}-chroma"
    if kind == "chroma":
        return f"{servers['chroma']}?prefix=mig{next(_schemas)}{role}"
    raise ValueError(kind)


PAIRS = [("embedded", "postgres"), ("postgres", "embedded"), ("embedded", "qdrant"), ("postgres", "qdrant"),
         ("embedded", "neo4j"), ("neo4j", "embedded"), ("embedded", "hybrid"),
         # ChromaDB: into a server, the seeds' own local-to-server move done live, and out to PostgreSQL
         ("embedded", "chroma"), ("chroma-local", "chroma"), ("chroma", "postgres"),
         ("qdrant", "qdrant-edge")]


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
async def test_migration_between_stores_ends_with_zero_differences(
        embedder: BatchingEmbedder, tmp_path: Path, servers: dict[str, str], source: str, target: str) -> None:
    old, new = spec_for(source, tmp_path, servers, "old"), spec_for(target, tmp_path, servers, "new")
    c = await boot(embedder, tmp_path, store=old)
    agents = [Agent(f"agent-{i}", c.memory) for i in range(3)]
    crowd = Crowd(agents)
    try:
        await seed(c, 300)
        crowd.start()
        await asyncio.sleep(0.2)
        await c.admin.StartMigration(apb.StartMigrationRequest(target=new, batch_size=64, workers=2), metadata=AUTH)
        await wait_for(c, lambda s: s.backfill.complete, 120)
        await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
        await asyncio.sleep(0.2)
        await crowd.finish()
        await wait_for(c, lambda s: s.repair_queue_depth == 0, 60)
        result = await run_verify(c)
        assert result.differences == 0, list(result.samples)
        assert result.primary_records == result.secondary_records > 600
        st = await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DUAL_WRITE), metadata=AUTH)
        assert st.phase == apb.COMPLETED and st.primary == redact(new)
    finally:
        crowd.stop.set()
        await shutdown(c)
    # Read the new primary directly: exactly what the agents were told.
    direct: Backend = backend_for(new, embedder)
    await direct.open()
    try:
        for agent in agents:
            ents, rels = await graph_of(direct, agent.scope)
            assert ents == agent.entities and rels == agent.relations
        assert len((await graph_of(direct, "seed"))[0]) == 300
        hits = await direct.semantic_search("seed", (await embedder.embed(["seed fact 42"]))[0], 3, None, [])
        assert "s0042" in [h.entity.name for h in hits.results]
    finally:
        await direct.close()


