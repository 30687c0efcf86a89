"""A migration as an operator runs it: over real gRPC, admin API and all, while agents keep writing."""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from adapters.base import Backend
from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder
from adapters.records import Kind
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import admin_pb2_grpc, memory_pb2_grpc
from memshift.v1 import memory_pb2 as pb
from proxy.runtime.config import Config
from proxy.transports.server import MemshiftServer
from tests.cluster import AUTH, Cluster, boot, run_verify, seed, self_signed, shutdown, status, wait_for
from tests.conftest import ADMIN_TOKEN


@dataclass
class Agent:
    """A client that writes and deletes its own entities and remembers exactly what was acknowledged."""

    scope: str
    memory: memory_pb2_grpc.MemoryStub
    entities: dict[str, set[str]] = field(default_factory=dict)
    relations: set[tuple[str, str]] = field(default_factory=set)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    async def step(self, rng: random.Random) -> None:
        roll = rng.random()
        if roll < 0.45 or not self.entities:
            name = f"n{next(self.counter)}"
            obs = [f"{name} fact {rng.randint(0, 5)}"]
            await self.memory.CreateEntities(pb.CreateEntitiesRequest(scope=self.scope, entities=[
                pb.Entity(name=name, entity_type="note", observations=obs)]))
            self.entities[name] = set(obs)
        elif roll < 0.65:
            name = rng.choice(sorted(self.entities))
            text = f"extra {rng.randint(0, 3)}"
            await self.memory.AddObservations(pb.AddObservationsRequest(scope=self.scope, observations=[
                pb.ObservationAddition(entity_name=name, contents=[text])]))
            self.entities[name].add(text)
        elif roll < 0.8:
            a, b = rng.choice(sorted(self.entities)), rng.choice(sorted(self.entities))
            await self.memory.CreateRelations(pb.CreateRelationsRequest(scope=self.scope, relations=[
                pb.Relation(**{"from": a}, to=b, relation_type="links")]))
            self.relations.add((a, b))
        elif roll < 0.9:
            name = rng.choice(sorted(self.entities))
            await self.memory.DeleteEntities(pb.DeleteEntitiesRequest(scope=self.scope, entity_names=[name]))
            del self.entities[name]
            self.relations = {r for r in self.relations if name not in r}
        else:
            name = rng.choice(sorted(self.entities))
            if self.entities[name]:
                text = sorted(self.entities[name])[0]
                await self.memory.DeleteObservations(pb.DeleteObservationsRequest(scope=self.scope, deletions=[
                    pb.ObservationDeletion(entity_name=name, observations=[text])]))
                self.entities[name].discard(text)


@dataclass
class Crowd:
    """Agents writing at once until told to stop: `start()`, then `await finish()` (stops and waits for them)."""

    agents: list[Agent]
    pause: float = 0.0  # seconds between one agent's calls
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _work(self, agent: Agent, seed_: int) -> None:
        rng = random.Random(seed_)
        while not self.stop.is_set():
            await agent.step(rng)
            if self.pause:
                await asyncio.sleep(self.pause)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._work(a, i)) for i, a in enumerate(self.agents)]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def graph_of(store: Backend, scope: str) -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    ents: dict[str, set[str]] = {}
    rels: set[tuple[str, str]] = set()
    cursor = None
    while True:
        page = await store.read_graph(scope, cursor, 1000)
        ents.update({e.name: set(e.observations) for e in page.entities})
        rels.update((r.source, r.target) for r in page.relations)
        if page.next_cursor is None:
            return ents, rels
        cursor = page.next_cursor


async def test_full_migration_while_agents_write(cluster: Cluster, embedder: BatchingEmbedder) -> None:
    await seed(cluster, 400)
    agents = [Agent(f"agent-{i}", cluster.memory) for i in range(4)]
    crowd = Crowd(agents)
    crowd.start()
    await asyncio.sleep(0.3)
    st = await cluster.admin.StartMigration(apb.StartMigrationRequest(target=cluster.target, batch_size=40,
                                                                      reason="move to new.db"), metadata=AUTH)
    assert st.phase == apb.DATA_MIGRATION and st.backfill.total >= 400
    seen_progress = await wait_for(cluster, lambda s: s.backfill.done > 0)
    assert seen_progress.backfill.rate_per_second > 0
    await wait_for(cluster, lambda s: s.backfill.complete)
    await cluster.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
    await asyncio.sleep(0.3)
    st = await cluster.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DUAL_WRITE), metadata=AUTH)
    assert st.phase == apb.COMPLETED and st.primary.endswith("new.db") and st.rollback_window_seconds_left > 0
    await asyncio.sleep(0.3)
    await crowd.finish()
    assert sum(len(a.entities) for a in agents) > 20

    await wait_for(cluster, lambda s: s.repair_queue_depth == 0)
    result = await run_verify(cluster)
    assert result.differences == 0 and result.primary_records == result.secondary_records > 800

    # Read both stores directly: the new primary holds exactly what was acknowledged, and so does the old one.
    for name in ("new.db", "old.db"):
        direct = EmbeddedBackend(cluster.dir / name, embedder)
        await direct.open()
        for agent in agents:
            ents, rels = await graph_of(direct, agent.scope)
            assert ents == agent.entities, name
            assert rels == agent.relations, name
        assert len((await graph_of(direct, "seed"))[0]) == 400
        await direct.close()
    history = await cluster.admin.GetHistory(apb.GetHistoryRequest(), metadata=AUTH)
    assert [(h.from_phase, h.to_phase, h.actor) for h in history.changes if h.from_phase != h.to_phase] == [
        (apb.NOT_STARTED, apb.DATA_MIGRATION, "pytest"), (apb.DATA_MIGRATION, apb.DUAL_WRITE, "pytest"),
        (apb.DUAL_WRITE, apb.COMPLETED, "pytest")]
    # Between them, in DataMigration, what the copy recorded: its watermark, then its end with its figures. (That it
    # reads nothing stamped after the watermark is checked exactly in test_engine_parts: here the live count taken
    # at StartMigration leaves out tombstones and the writes made before dual-writing began, which it must copy.)
    notes = {h.reason.split(":")[0]: h for h in history.changes if h.from_phase == h.to_phase}
    assert notes["copy watermark fixed"].from_phase == apb.DATA_MIGRATION
    done = notes["backfill complete"].figures
    assert int(done["records_read"]) >= int(done["records_copied"]) > 400 and float(done["copy_seconds"]) > 0


async def test_restart_mid_backfill_resumes_from_the_checkpoint(embedder: BatchingEmbedder, tmp_path: Path) -> None:
    c = await boot(embedder, tmp_path)
    await seed(c, 600)
    records = 600 * 2  # an entity and its observation each
    await c.admin.StartMigration(apb.StartMigrationRequest(target=c.target, batch_size=50, rate_limit=400, workers=3),
                                 metadata=AUTH)
    before = await wait_for(c, lambda s: s.backfill.done >= 200)
    await shutdown(c)
    c = await boot(embedder, tmp_path)
    try:
        after = await status(c)
        assert after.phase == apb.DATA_MIGRATION
        assert after.backfill.done >= before.backfill.done  # the checkpoint survived the restart
        final = await wait_for(c, lambda s: s.backfill.complete)
        assert final.backfill.done == records  # every record copied exactly once: no restart from zero
        assert (await run_verify(c)).differences == 0
    finally:
        await shutdown(c)


async def test_the_backfill_rate_is_of_the_copy_itself_not_of_pauses_or_the_time_since(cluster: Cluster) -> None:
    """An operator reads the rate and ETA while a copy runs, while it is paused and after it ended: paused, neither
    drifts; ended, the rate is the one the copy ran at, not records over the time since it started."""
    await seed(cluster, 300)
    limit = 1000.0  # records/s: 600 records take about 0.6 s, long enough to pause in the middle
    await cluster.admin.StartMigration(apb.StartMigrationRequest(target=cluster.target, batch_size=50,
                                                                 rate_limit=limit), metadata=AUTH)
    started = asyncio.get_running_loop().time()
    await wait_for(cluster, lambda s: s.backfill.done >= 100)
    await cluster.admin.PauseBackfill(apb.PauseBackfillRequest(reason="test"), metadata=AUTH)
    held = await status(cluster)
    while True:  # the batch in flight when the pause came still lands and is checkpointed
        await asyncio.sleep(0.3)
        if (now := await status(cluster)).backfill.done == held.backfill.done:
            break
        held = now
    await asyncio.sleep(1.0)
    later = await status(cluster)
    assert not held.backfill.complete and held.backfill.rate_per_second > 0
    assert (later.backfill.done, later.backfill.rate_per_second, later.backfill.eta_seconds) == (
        held.backfill.done, held.backfill.rate_per_second, held.backfill.eta_seconds)
    await cluster.admin.ResumeBackfill(apb.ResumeBackfillRequest(), metadata=AUTH)
    done = await wait_for(cluster, lambda s: s.backfill.complete)
    wall = asyncio.get_running_loop().time() - started
    rate = done.backfill.rate_per_second
    # The copy was held for over 1.3 s of `wall` (less what the batch in flight at the pause still took): it copied
    # for less than wall - 1, so its rate is above done / (wall - 1), where counting the pause gives done / wall.
    # Nor is it above its limit: each batch is checkpointed only once its share of time at the limit has passed.
    assert done.backfill.done / (wall - 1.0) < rate <= limit
    await asyncio.sleep(1.0)
    assert (await status(cluster)).backfill.rate_per_second == rate


@pytest.mark.parametrize("phase", ["DataMigration", "DualWrite", "Completed"])
async def test_rollback_from_every_phase_keeps_everything(cluster: Cluster, embedder: BatchingEmbedder,
                                                          phase: str) -> None:
    await seed(cluster, 50)
    agent = Agent("agent-rb", cluster.memory)
    rng = random.Random(7)
    for _ in range(20):
        await agent.step(rng)
    await cluster.admin.StartMigration(apb.StartMigrationRequest(target=cluster.target), metadata=AUTH)
    if phase != "DataMigration":
        await wait_for(cluster, lambda s: s.backfill.complete)
        await cluster.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
    if phase == "Completed":
        await cluster.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DUAL_WRITE), metadata=AUTH)
    for _ in range(30):  # writes in the phase we roll back from
        await agent.step(rng)
    st = await cluster.admin.Rollback(apb.RollbackRequest(reason=f"drill from {phase}"), metadata=AUTH)
    assert st.phase == apb.ROLLED_BACK and st.primary.endswith("old.db")
    assert st.recent_history[-1].reason == f"drill from {phase}"
    for _ in range(10):  # and after
        await agent.step(rng)
    old = EmbeddedBackend(cluster.dir / "old.db", embedder)
    await old.open()
    assert await graph_of(old, agent.scope) == (agent.entities, agent.relations)
    await old.close()
    resp = await cluster.memory.OpenNodes(pb.OpenNodesRequest(scope=agent.scope, names=sorted(agent.entities)))
    assert {e.name for e in resp.entities} == set(agent.entities)


async def test_admin_needs_the_token_and_refuses_illegal_changes(cluster: Cluster) -> None:
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cluster.admin.GetStatus(apb.GetStatusRequest(), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DUAL_WRITE), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "NotStarted" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.admin.Rollback(apb.RollbackRequest(reason="x"), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "DataMigration" in (err.value.details() or "")  # says what is allowed
    for bad, field_ in ((dict(batch_size=-1), "batch_size"), (dict(batch_size=10_001), "batch_size"),
                        (dict(workers=17), "workers"), (dict(rate_limit=-1.0), "rate_limit"), (dict(), "target")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cluster.admin.StartMigration(apb.StartMigrationRequest(
                target=cluster.target if field_ != "target" else "", **bad), metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_ in (err.value.details() or "")
        assert (await status(cluster)).phase == apb.NOT_STARTED  # nothing started, nothing half-made
    await seed(cluster, 100)  # enough that a 1 record/s backfill is surely not done yet
    await cluster.admin.StartMigration(apb.StartMigrationRequest(target=cluster.target, rate_limit=1),
                                       metadata=AUTH)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "backfill" in (err.value.details() or "")
    st = await cluster.admin.PauseBackfill(apb.PauseBackfillRequest(reason="maintenance"), metadata=AUTH)
    assert st.backfill.paused
    st = await cluster.admin.ResumeBackfill(apb.ResumeBackfillRequest(), metadata=AUTH)
    assert not st.backfill.paused
    watch = cluster.admin.WatchStatus(apb.WatchStatusRequest(interval_seconds=0.1), metadata=AUTH)
    first = await anext(aiter(watch))
    assert first.phase == apb.DATA_MIGRATION
    watch.cancel()


async def test_tls_on_both_ports(embedder: BatchingEmbedder, tmp_path: Path) -> None:
    cert, key = await self_signed(tmp_path)
    config = Config(listen="127.0.0.1:0", mcp_listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/m.db", control=f"sqlite:///{tmp_path}/c.db",
                    admin_listen="127.0.0.1:0", admin_token=ADMIN_TOKEN, tls_cert_file=str(cert),
                    tls_key_file=str(key))
    server = MemshiftServer(config, embedder)
    await server.start()
    try:
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", creds) as ch:
            created = await memory_pb2_grpc.MemoryStub(ch).CreateEntities(pb.CreateEntitiesRequest(
                scope="tls", entities=[pb.Entity(name="x", entity_type="t")]))
            assert len(created.created) == 1
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.admin_port}", creds) as ch:
            st = await admin_pb2_grpc.MigrationAdminStub(ch).GetStatus(apb.GetStatusRequest(), metadata=AUTH)
            assert st.phase == apb.NOT_STARTED
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:  # plaintext is refused
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await memory_pb2_grpc.MemoryStub(ch).OpenNodes(pb.OpenNodesRequest(scope="tls", names=["x"]),
                                                               timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=1)


async def test_verify_reports_differences_and_repair_fixes_them(cluster: Cluster, embedder: BatchingEmbedder) -> None:
    await seed(cluster, 120)
    await cluster.admin.StartMigration(apb.StartMigrationRequest(target=cluster.target, batch_size=50), metadata=AUTH)
    await wait_for(cluster, lambda s: s.backfill.complete)
    # Damage the secondary behind the proxy's back, as a buggy store or an operator mistake would: s0010 vanishes.
    secondary = cluster.server.engine.stores.secondary
    assert secondary is not None
    key = (Kind.ENTITY, "seed", ("s0010",))
    await secondary.replace_if([(key, None, (await secondary.get_records([key]))[0].version)])
    found = await run_verify(cluster)
    assert found.differences == 2  # the entity, and its observation (listed only under a live entity)
    assert any("s0010" in d.key for d in found.samples)
    assert [s.scope for s in found.scopes] == ["seed"]
    status_after = await status(cluster)
    assert status_after.last_verify_differences == found.differences
    repaired = await run_verify(cluster, repair=True)  # queues them, waits for the repair, checks again
    assert repaired.repaired == found.differences and repaired.differences == 0 and repaired.in_flight == 0
    await wait_for(cluster, lambda s: s.repair_queue_depth == 0)
    assert (await run_verify(cluster)).differences == 0


class HeldSecondary:
    """A real store whose writes (and repairs) wait for a gate: a write in flight, as long as the test wants."""

    def __init__(self, inner: Backend) -> None:
        self._inner = inner
        self.gate = asyncio.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._inner, name)
        if name not in {"create_entities", "add_observations", "replace_if", "apply", "load"}:
            return attr

        async def held(*args: object, **kwargs: object) -> object:
            await self.gate.wait()
            return await attr(*args, **kwargs)  # type: ignore[operator]

        return held


async def test_verify_tells_writes_in_flight_from_divergence(embedder: BatchingEmbedder, tmp_path: Path) -> None:
    """A key a write is touching while Verify passes differs only for that moment: it is re-checked once the write
    settles and reported as in flight; it does not count, so --require-verify cannot fail at random."""
    held: dict[str, HeldSecondary] = {}

    def wrap(spec: str, store: Backend) -> Backend:
        if spec.endswith("new.db"):
            held["new"] = HeldSecondary(store)
            return held["new"]  # type: ignore[return-value]
        return store

    c = await boot(embedder, tmp_path, wrap_store=wrap)
    try:
        await seed(c, 50)
        await c.admin.StartMigration(apb.StartMigrationRequest(target=c.target, require_verify=True), metadata=AUTH)
        await wait_for(c, lambda s: s.backfill.complete)
        held["new"].gate.clear()  # the new store's writes stall: the next write is in flight there
        await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope="live", entities=[
            pb.Entity(name="moving", entity_type="t", observations=["written while verify runs"])]))
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, held["new"].gate.set)  # the write lands while Verify waits for it to settle
        result = await run_verify(c)
        assert result.differences == 0 and result.in_flight == 2, result  # the entity and its observation
        st = await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
        assert st.phase == apb.DUAL_WRITE  # require_verify was satisfied by the persistent count
    finally:
        held["new"].gate.set()
        await shutdown(c)


async def test_going_back_to_a_target_after_a_rollback_copies_only_what_changed(
        embedder: BatchingEmbedder, tmp_path: Path) -> None:
    cluster = await boot(embedder, tmp_path, resync_margin_seconds=0)  # one proxy: its own clock needs no margin
    try:
        await _back_to_the_same_target(cluster, embedder)
    finally:
        await shutdown(cluster)


async def _back_to_the_same_target(cluster: Cluster, embedder: BatchingEmbedder) -> None:
    await seed(cluster, 300)
    agent = Agent("agent-0", cluster.memory)
    rng = random.Random(5)
    await cluster.admin.StartMigration(apb.StartMigrationRequest(target=cluster.target, batch_size=50), metadata=AUTH)
    await wait_for(cluster, lambda s: s.backfill.complete)
    await cluster.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
    for _ in range(20):
        await agent.step(rng)
    await cluster.admin.Rollback(apb.RollbackRequest(reason="trying again later"), metadata=AUTH)
    for _ in range(30):  # the old store alone takes these, deletions included
        await agent.step(rng)
    st = await cluster.admin.StartMigration(apb.StartMigrationRequest(target=cluster.target, batch_size=50),
                                            metadata=AUTH)
    assert st.backfill.copying_changes_since_unix > 0
    st = await wait_for(cluster, lambda s: s.backfill.complete and s.repair_queue_depth == 0)
    assert st.backfill.done >= 300 + 20 and st.backfill.copied <= 60, st.backfill  # read all; wrote the changes
    result = await run_verify(cluster)
    assert result.differences == 0, [d.key for d in result.samples]
    history = [h.reason for h in (await cluster.admin.GetHistory(apb.GetHistoryRequest(), metadata=AUTH)).changes]
    assert any("copying only what changed since" in r for r in history)
    direct = EmbeddedBackend(cluster.dir / "new.db", embedder)
    await direct.open()
    try:
        assert await graph_of(direct, agent.scope) == (agent.entities, agent.relations)
    finally:
        await direct.close()
