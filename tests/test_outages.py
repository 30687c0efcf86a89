"""The world around the proxy fails: a real PostgreSQL (the new store, or the primary) stopped abruptly and started
again, a proxy restarted while its secondary is down. Agents keep being served from a reachable primary, an outage
holds the migration and resumes it instead of rolling it back, and nothing acknowledged is lost or copied again."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder
from adapters.postgres import PostgresBackend
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import memory_pb2 as pb
from tests.cluster import AUTH, Cluster, boot, run_verify, seed, shutdown, status, until, wait_for
from tests.servers import PostgresServer
from tests.test_migration_e2e import Agent, Crowd, graph_of


@pytest.fixture
def pg() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, to stop and start at will; crash-safe, as one in production is."""
    server = PostgresServer(crash_safe=True).start()
    yield server
    server.resume_if_halted()
    server.stop()


async def _health(c: Cluster) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{c.server.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        return int(reply.status)


async def _to_dual_write(c: Cluster, target: str) -> None:
    await seed(c, 200)
    await c.admin.StartMigration(apb.StartMigrationRequest(target=target, batch_size=64, workers=2), metadata=AUTH)
    await wait_for(c, lambda s: s.backfill.complete, 60)
    await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)


async def _both_hold_what_agents_were_told(tmp: Path, target: str, embedder: BatchingEmbedder,
                                           agents: list[Agent]) -> None:
    for direct in (EmbeddedBackend(tmp / "old.db", embedder), PostgresBackend(target, embedder)):
        await direct.open()
        try:
            for agent in agents:
                ents, rels = await graph_of(direct, agent.scope)
                assert ents == agent.entities and rels == agent.relations, direct.name
            assert len((await graph_of(direct, "seed"))[0]) == 200
        finally:
            await direct.close()


async def test_a_proxy_restarted_while_its_secondary_is_down_serves_from_the_primary(
        embedder: BatchingEmbedder, tmp_path: Path, pg: PostgresServer) -> None:
    target = f"{pg.dsn}?schema=restart_down"
    c = await boot(embedder, tmp_path)
    agents = [Agent(f"agent-{i}", c.memory) for i in range(2)]
    rng = random.Random(7)
    try:
        await _to_dual_write(c, target)
        for _ in range(30):
            await agents[0].step(rng)
    finally:
        await shutdown(c)
    pg.halt()
    started = time.monotonic()
    c = await boot(embedder, tmp_path)  # used to fail: "cannot serve: postgresql:... cannot connect"
    try:
        serving_after = time.monotonic() - started
        assert await _health(c) == health_pb2.HealthCheckResponse.SERVING
        for a in agents:
            a.memory = c.memory
        for _ in range(60):
            await agents[1].step(rng)  # acknowledged by the primary; owed to the new store
        st = await status(c)
        assert st.phase == apb.DUAL_WRITE and "StoreUnavailable" in st.secondary_unreachable
        assert st.repair_queue_depth > 0 and st.counters.secondary_skipped > 0
        print(f"serving from the primary {serving_after:.2f} s after start, with the secondary down")
        pg.resume()
        st = await wait_for(c, lambda s: s.secondary_unreachable == "" and s.repair_queue_depth == 0, 60)
        assert st.phase == apb.DUAL_WRITE
        result = await run_verify(c)
        assert result.differences == 0, [(d.key, d.primary[:80], d.secondary[:80]) for d in result.samples]
    finally:
        await shutdown(c)
    await _both_hold_what_agents_were_told(tmp_path, target, embedder, agents)


async def test_an_outage_of_the_new_store_during_dual_write_pauses_and_resumes_with_the_stock_policy(
        embedder: BatchingEmbedder, tmp_path: Path, pg: PostgresServer) -> None:
    """The stock policy used to roll back for a 5-10 s outage, and the next start copied everything again."""
    target = f"{pg.dsn}?schema=outage_dw"
    c = await boot(embedder, tmp_path)  # policies/default.yaml
    agents = [Agent(f"agent-{i}", c.memory) for i in range(3)]
    crowd = Crowd(agents, pause=0.005)
    try:
        await _to_dual_write(c, target)
        await c.admin.SetReadRouting(apb.SetReadRoutingRequest(read_fraction=0.5, shadow_sample_rate=1.0),
                                     metadata=AUTH)
        copied = (await status(c)).backfill.done
        crowd.start()
        await asyncio.sleep(0.5)
        pg.halt()
        st = await wait_for(c, lambda s: s.secondary_unreachable != "", 20)
        # Agents keep writing and reading through the outage (3 s here; MEMSHIFT_TEST_OUTAGE_SECONDS for longer).
        await asyncio.sleep(float(os.environ.get("MEMSHIFT_TEST_OUTAGE_SECONDS", "3")))
        pg.resume()
        await wait_for(c, lambda s: s.secondary_unreachable == "", 30)
        await asyncio.sleep(0.5)
        await crowd.finish()
        st = await wait_for(c, lambda s: s.repair_queue_depth == 0, 60)
        assert st.phase == apb.DUAL_WRITE, st.rolled_back  # held, not rolled back
        assert st.backfill.done == copied  # nothing copied again
        assert (await run_verify(c)).differences == 0
        history = [h.reason for h in (await c.admin.GetHistory(apb.GetHistoryRequest(), metadata=AUTH)).changes]
        assert any(r.startswith("new store unreachable") for r in history)
        assert any(r.startswith("new store reachable again after") for r in history)
    finally:
        crowd.stop.set()
        await shutdown(c)
    await _both_hold_what_agents_were_told(tmp_path, target, embedder, agents)


async def test_with_the_primary_unreachable_the_proxy_starts_not_serving_and_serves_once_it_answers(
        embedder: BatchingEmbedder, tmp_path: Path, pg: PostgresServer) -> None:
    primary = f"{pg.dsn}?schema=primary_down"
    c = await boot(embedder, tmp_path, store=primary)
    await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope="s", entities=[pb.Entity(name="a", entity_type="t")]))
    await shutdown(c)
    pg.halt()
    c = await boot(embedder, tmp_path, store=primary)
    try:
        assert await _health(c) == health_pb2.HealthCheckResponse.NOT_SERVING
        st = await status(c)  # the admin API answers
        assert st.primary_unreachable and st.phase == apb.NOT_STARTED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.memory.OpenNodes(pb.OpenNodesRequest(scope="s", names=["a"]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        pg.resume()
        for _ in range(100):
            if await _health(c) == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.1)
        assert await _health(c) == health_pb2.HealthCheckResponse.SERVING
        graph = await c.memory.OpenNodes(pb.OpenNodesRequest(scope="s", names=["a"]))
        assert [e.name for e in graph.entities] == ["a"]
        assert not (await status(c)).primary_unreachable
    finally:
        await shutdown(c)


async def test_an_outage_during_the_backfill_holds_the_copy_and_resumes_it(
        embedder: BatchingEmbedder, tmp_path: Path, pg: PostgresServer) -> None:
    target = f"{pg.dsn}?schema=outage_dm"
    c = await boot(embedder, tmp_path)
    try:
        await seed(c, 300)
        await c.admin.StartMigration(apb.StartMigrationRequest(target=target, batch_size=20, workers=2,
                                                               rate_limit=150), metadata=AUTH)
        await wait_for(c, lambda s: s.backfill.done >= 40, 30)
        pg.halt()
        st = await wait_for(c, lambda s: s.secondary_unreachable != "", 20)
        await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope="during", entities=[
            pb.Entity(name="x", entity_type="t", observations=["written while the new store was out"])]))
        backfill = c.server.engine.backfill
        await until(lambda: backfill.holds > 0)  # the copy has stopped for the outage, at its checkpoint
        held = (await status(c)).backfill.done
        await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope="during", entities=[
            pb.Entity(name="y", entity_type="t", observations=["and another"])]))  # a turn for a copy that ran on
        st = await status(c)
        assert st.backfill.done == held and not st.backfill.complete and st.phase == apb.DATA_MIGRATION
        pg.resume()
        st = await wait_for(c, lambda s: s.backfill.complete and s.repair_queue_depth == 0, 60)
        assert st.phase == apb.DATA_MIGRATION and st.secondary_unreachable == ""
        result = await run_verify(c)
        assert result.differences == 0, [d.key for d in result.samples]
    finally:
        await shutdown(c)


async def test_a_store_holding_only_some_scopes_that_is_down_at_start_holds_up_only_those_scopes(
        embedder: BatchingEmbedder, tmp_path: Path, pg: PostgresServer) -> None:
    """A pilot scope moved to PostgreSQL; the proxy restarts while PostgreSQL is down: it is SERVING (the default
    store is up), every other scope is served, the pilot's calls answer UNAVAILABLE until PostgreSQL is back."""
    target = f"{pg.dsn}?schema=placed_down"
    c = await boot(embedder, tmp_path)
    for scope in ("pilot", "other"):
        await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope=scope, entities=[
            pb.Entity(name="a", entity_type="t", observations=[f"in {scope}"])]))
    await c.admin.StartMigration(apb.StartMigrationRequest(target=target, scopes=["pilot"]), metadata=AUTH)
    await wait_for(c, lambda s: s.backfill.complete)
    for phase in (apb.DATA_MIGRATION, apb.DUAL_WRITE, apb.COMPLETED):
        await c.admin.Advance(apb.AdvanceRequest(expected_phase=phase), metadata=AUTH)
    await shutdown(c)
    pg.halt()
    c = await boot(embedder, tmp_path)
    try:
        assert await _health(c) == health_pb2.HealthCheckResponse.SERVING
        assert not (await status(c)).primary_unreachable
        other = await c.memory.OpenNodes(pb.OpenNodesRequest(scope="other", names=["a"]))
        assert [e.name for e in other.entities] == ["a"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.memory.OpenNodes(pb.OpenNodesRequest(scope="pilot", names=["a"]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        pg.resume()
        for _ in range(100):
            try:
                pilot = await c.memory.OpenNodes(pb.OpenNodesRequest(scope="pilot", names=["a"]))
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        assert [o for e in pilot.entities for o in e.observations] == ["in pilot"]
    finally:
        pg.resume_if_halted()
        await shutdown(c)
