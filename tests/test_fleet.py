"""A fleet: three proxy processes share one PostgreSQL control store and migrate together (docs/design.md, Fleet).

Agents write through all three; the migration is driven through one admin endpoint; the backfill leader is killed
mid-way and another proxy continues from the checkpoint; the run ends with Verify at zero differences and the new
store holding exactly what every agent was told. The same with a chosen set of scopes: the placement change at cutover
reaches every proxy, and the scope left out is never copied.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path

import grpc
import pytest

from adapters.embedder import BatchingEmbedder
from adapters.postgres import PostgresBackend
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import memory_pb2 as pb
from proxy.engine.control import MigrationState, Phase
from proxy.engine.control_pg import PostgresControlStore
from tests.fleet import AUTH, acknowledged, start_proxy, status, stop_all, wait_serving
from tests.test_migration_e2e import Agent, graph_of

_runs = itertools.count()
LEASE = 2.0


@pytest.mark.parametrize("selected", [(), ("seed", "agent-1", "agent-2")], ids=["every-scope", "chosen-scopes"])
async def test_fleet_migrates_with_the_backfill_leader_killed_midway(
        embedder: BatchingEmbedder, servers: dict[str, str], tmp_path: Path, selected: tuple[str, ...]) -> None:
    run = next(_runs)
    pg = servers["postgres"]
    old, new = f"{pg}?schema=fleet{run}_old", f"{pg}?schema=fleet{run}_new"
    control_spec = f"{pg}?schema=fleet{run}_control"
    proxies = [start_proxy(i, tmp_path, old, control_spec, LEASE) for i in (1, 2, 3)]
    control = PostgresControlStore(control_spec, old, lease_seconds=LEASE)
    stop = asyncio.Event()
    agents = [Agent(f"agent-{p.node_id}", p.memory) for p in proxies]
    halted: set[int] = set()

    async def work(i: int) -> None:
        rng = random.Random(i)
        while not stop.is_set() and i not in halted:
            await agents[i].step(rng)
            await asyncio.sleep(0.005)

    workers: list[asyncio.Task[None]] = []
    try:
        await wait_serving(proxies)
        await control.open()
        for start in range(0, 1200, 100):  # 1,200 entities to copy, written through every proxy
            p = proxies[start // 100 % 3]
            await p.memory.CreateEntities(pb.CreateEntitiesRequest(scope="seed", entities=[
                pb.Entity(name=f"s{i:04d}", entity_type="fact", observations=[f"seed fact {i}"])
                for i in range(start, start + 100)]))
        workers = [asyncio.create_task(work(i)) for i in range(3)]
        await asyncio.sleep(0.3)

        admin = proxies[0].admin
        delays = []  # from the admin call's reply (the change is committed) to every proxy's acknowledgement
        await admin.StartMigration(apb.StartMigrationRequest(target=new, batch_size=100, rate_limit=300,
                                                             scopes=selected), metadata=AUTH)
        state = await control.load()
        delays.append(await acknowledged(control, state.revision, proxies))

        # Wait for the leader to be mid-way, then kill it without warning.
        deadline = time.monotonic() + 60
        while True:
            st = await status(proxies[0])
            leaders = [m for m in st.proxies if m.leader]
            if leaders and st.backfill.done >= 600:
                break
            assert time.monotonic() < deadline, st
            await asyncio.sleep(0.05)
        leader = next(p for p in proxies if leaders[0].node.endswith(f"-{p.node_id}"))
        halted.add(proxies.index(leader))
        await workers[proxies.index(leader)]  # its agent stops first: every write it made was acknowledged
        done_at_kill = (await control.load()).backfill_done
        killed_at = time.monotonic()
        leader.kill()
        survivors = [p for p in proxies if p.alive]

        # Another proxy takes over from the checkpoint, within about one lease.
        takeover = None
        while True:
            st = await status(survivors[0])
            new_leaders = [m for m in st.proxies if m.leader and m.live]
            if new_leaders and takeover is None:
                takeover = time.monotonic() - killed_at
            if st.backfill.complete:
                break
            assert time.monotonic() - killed_at < 120, st
            await asyncio.sleep(0.05)
        assert takeover is not None  # how soon is printed below; speed belongs in bench/fleet.py
        assert not any(leaders[0].node == m.node and m.live for m in st.proxies)
        # Continued from the checkpoint, not from zero: the copy counted each page about once.
        listed = 0
        primary = PostgresBackend(old, embedder)
        await primary.open()
        try:
            after = None
            while True:
                page = await primary.list_records(after, 1000, tombstones=True)
                listed += len(page.records)
                if page.next_after is None:
                    break
                after = page.next_after
        finally:
            await primary.close()
        assert done_at_kill >= 600
        assert st.backfill.done < listed + 300, (st.backfill.done, listed)

        admin = survivors[0].admin
        await admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
        delays.append(await acknowledged(control, (await control.load()).revision, survivors))
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        deadline = time.monotonic() + 60
        while (await status(survivors[0])).repair_queue_depth:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        result = None
        async for progress in admin.Verify(apb.VerifyRequest(), metadata=AUTH):
            result = progress
        assert result is not None and result.done and result.differences == 0, list(result.samples)
        await admin.Advance(apb.AdvanceRequest(expected_phase=apb.DUAL_WRITE), metadata=AUTH)
        delays.append(await acknowledged(control, (await control.load()).revision, survivors))
        for p in survivors:  # every proxy routes the moved scopes to the new store now
            st = await status(p)
            assert st.phase == apb.COMPLETED
            assert sorted(e.scope for e in st.placement.placed) == sorted(selected)
        print(f"\nphase change acknowledged by every proxy in {', '.join(f'{d * 1000:.0f} ms' for d in delays)};"
              f" backfill takeover {takeover:.2f} s after the leader died")
    finally:
        stop.set()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await stop_all(proxies)
        await control.close()
    assert (await control_state_after(control_spec, old)).phase == Phase.COMPLETED

    direct, stayed = PostgresBackend(new, embedder), PostgresBackend(old, embedder)
    await direct.open()
    await stayed.open()
    try:
        for agent in agents:
            moved = not selected or agent.scope in selected
            ents, rels = await graph_of(direct if moved else stayed, agent.scope)
            assert ents == agent.entities and rels == agent.relations
            if not moved:
                assert (await direct.count(agent.scope)).total == 0  # left out: never copied
        assert len((await graph_of(direct, "seed"))[0]) == 1200
    finally:
        await direct.close()
        await stayed.close()


async def control_state_after(spec: str, primary: str) -> MigrationState:
    control = PostgresControlStore(spec, primary)
    await control.open()
    try:
        return await control.load()
    finally:
        await control.close()


async def test_a_proxy_cut_off_from_the_control_store_refuses_writes(
        servers: dict[str, str], tmp_path: Path) -> None:
    """Its lease lapses: UNAVAILABLE, saying why, until it is back in touch."""
    run = next(_runs)
    pg = servers["postgres"]
    control_spec = f"{pg}?schema=lapse{run}_control"
    [proxy] = [start_proxy(9, tmp_path, f"{pg}?schema=lapse{run}_store", control_spec, 1.0)]
    control = PostgresControlStore(control_spec, "", lease_seconds=1.0)
    try:
        await wait_serving([proxy])
        await control.open()
        ok = pb.CreateEntitiesRequest(scope="s", entities=[pb.Entity(name="a", entity_type="t")])
        await proxy.memory.CreateEntities(ok)
        # Lock the proxies table: its heartbeats block, so its lease runs out while the process keeps running.
        async with control._p().acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE proxies IN ACCESS EXCLUSIVE MODE")
            await asyncio.sleep(1.5)
            try:
                await proxy.memory.CreateEntities(ok, timeout=5)
                raise AssertionError("a proxy whose lease lapsed accepted a write")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                assert "lease lapsed" in (exc.details() or "")
        deadline = time.monotonic() + 10
        while True:  # caught up again: writes flow
            try:
                await proxy.memory.CreateEntities(ok, timeout=5)
                break
            except grpc.aio.AioRpcError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
    finally:
        await stop_all([proxy])
        await control.close()


async def test_a_fleet_starting_together_on_a_fresh_database_opens_every_store(
        embedder: BatchingEmbedder, servers: dict[str, str]) -> None:
    """Sidecars start at once: each creates the same schemas (`IF NOT EXISTS` alone races in PostgreSQL and fails
    one of them with a unique violation)."""
    pg = servers["postgres"]
    tag = f"{random.randrange(16**8):08x}"
    controls = [PostgresControlStore(f"{pg}?schema=race_control_{tag}", "sqlite:///unused") for _ in range(6)]
    stores = [PostgresBackend(f"{pg}?schema=race_store_{tag}", embedder) for _ in range(6)]
    await asyncio.gather(*(c.open() for c in controls), *(s.open() for s in stores))
    try:
        assert {(await c.load()).revision for c in controls} == {0}
        assert [await s.count() for s in stores] == [await stores[0].count()] * 6
    finally:
        await asyncio.gather(*(c.close() for c in controls), *(s.close() for s in stores))
