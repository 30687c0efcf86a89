"""Scope by scope, as an operator moves memory: two sets of scopes moved one after the other from the embedded store
to PostgreSQL over real gRPC while agents write to every scope; the second set rolled back from its rollback window.
Every scope ends on exactly one store holding exactly what its agent was acknowledged, and the scopes never selected
were never copied anywhere."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder
from adapters.postgres import PostgresBackend
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import memory_pb2 as pb
from tests.cluster import AUTH, Cluster, boot, run_verify, seed, shutdown, status, wait_for
from tests.test_migration_e2e import Agent, graph_of

_schemas = itertools.count()


@dataclass
class TimedAgent(Agent):
    """An agent that also keeps when each of its calls ended and how long it took."""

    calls: list[tuple[float, float]] = field(default_factory=list)

    async def step(self, rng: random.Random) -> None:
        started = time.perf_counter()
        await super().step(rng)
        self.calls.append((time.perf_counter(), time.perf_counter() - started))


async def _work(agent: TimedAgent, stop: asyncio.Event, seed_: int) -> None:
    rng = random.Random(seed_)
    while not stop.is_set():
        await agent.step(rng)
        await asyncio.sleep(0.005)


def _p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) >= 2 else float("nan")


async def _accepted(call: Callable[[], Awaitable[apb.MigrationStatus]]) -> apb.MigrationStatus:
    """An operator's step taken again while it is refused for writes still being copied (cutover, and a rollback
    from the window, wait for an empty repair queue, which agents writing flat out may keep filling for a while)."""
    for _ in range(20):
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            waiting = any(w in str(err.details()) for w in ("pending", "still being copied"))
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION or not waiting:
                raise
            await asyncio.sleep(0.5)
    return await call()


async def _move(c: Cluster, request: apb.StartMigrationRequest) -> apb.MigrationStatus:
    """Start, backfill, DualWrite with a clean Verify, cutover: the migration up to its rollback window."""
    st = await c.admin.StartMigration(request, metadata=AUTH)
    assert st.phase == apb.DATA_MIGRATION
    await wait_for(c, lambda s: s.backfill.complete)
    await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
    await asyncio.sleep(0.3)
    await wait_for(c, lambda s: s.repair_queue_depth == 0)
    checked = await run_verify(c)
    assert checked.differences == 0
    return await _accepted(lambda: c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DUAL_WRITE), metadata=AUTH))


async def test_two_sets_moved_to_postgres_one_rolled_back_while_agents_write_everywhere(
        embedder: BatchingEmbedder, servers: dict[str, str], tmp_path: Path) -> None:
    pg = f"{servers['postgres']}?schema=place{next(_schemas)}_{tmp_path.name[-8:].replace('-', '_')}"
    c = await boot(embedder, tmp_path)
    direct_pg = PostgresBackend(pg, embedder)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        teams = [TimedAgent(f"team-a{i}", c.memory) for i in (1, 2)]
        solos = [TimedAgent(f"solo-{x}", c.memory) for x in "xy"]
        others = [TimedAgent(f"other-{i}", c.memory) for i in (1, 2)]
        everyone = teams + solos + others
        rng = random.Random(3)
        for agent in everyone:
            for _ in range(30):
                await agent.step(rng)
        crowd_from = time.perf_counter()
        tasks = [asyncio.create_task(_work(a, stop, i)) for i, a in enumerate(everyone)]
        await asyncio.sleep(2.0)
        moving_from = time.perf_counter()

        # A selection on two stores, or naming something that is no scope, is refused and changes nothing.
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await c.admin.StartMigration(apb.StartMigrationRequest(target=pg, scopes=["solo-x", "no scope"]),
                                         metadata=AUTH)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "scopes[1]" in str(bad.value.details())
        assert (await status(c)).phase == apb.NOT_STARTED

        # The first set, by prefix, all the way: its placement now says PostgreSQL.
        await _move(c, apb.StartMigrationRequest(target=pg, scope_prefixes=["team-a"], batch_size=50))
        st = await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.COMPLETED), metadata=AUTH)
        assert st.phase == apb.COMPLETED and not st.secondary
        assert [(p.scope, p.prefix) for p in st.placement.placed] == [("team-a", True)]
        assert st.placement.default_store.endswith("old.db")

        # The second set, by name, to the same store, which already serves the first: rolled back from its window.
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await c.admin.StartMigration(apb.StartMigrationRequest(target=pg, scopes=["solo-x", "team-a1"]),
                                         metadata=AUTH)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "two stores" in str(bad.value.details())
        st = await _move(c, apb.StartMigrationRequest(target=pg, scopes=["solo-x", "solo-y"], batch_size=50))
        assert st.phase == apb.COMPLETED and st.selection.scopes == ["solo-x", "solo-y"]
        assert {p.scope for p in st.placement.placed} == {"team-a", "solo-x", "solo-y"}
        counted = await c.admin.GetStatus(apb.GetStatusRequest(count_stores=True), metadata=AUTH)
        assert [s.scope for s in counted.selected] == ["solo-x", "solo-y"]
        await asyncio.sleep(0.5)  # writes in the window: on PostgreSQL, mirrored to the embedded store
        st = await _accepted(lambda: c.admin.Rollback(apb.RollbackRequest(reason="drill: solo scopes back"),
                                                      metadata=AUTH))
        assert st.phase == apb.ROLLED_BACK
        assert [(p.scope, p.prefix) for p in st.placement.placed] == [("team-a", True)]
        moved_until = time.perf_counter()
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)

        # Every scope: its store holds exactly what its agent was acknowledged, and the API serves it from there.
        old = EmbeddedBackend(tmp_path / "old.db", embedder)
        await old.open()
        await direct_pg.open()
        for agent in everyone:
            home = direct_pg if agent in teams else old
            assert await graph_of(home, agent.scope) == (agent.entities, agent.relations), agent.scope
        for agent in others:  # never selected: never copied
            assert (await direct_pg.count(agent.scope)).total == 0
        counted = await c.admin.GetStatus(apb.GetStatusRequest(count_stores=True), metadata=AUTH)
        per_store = {s.store.split("?")[0].rsplit("/", 1)[-1]: (s.scopes, s.records) for s in counted.stores}
        old_records = sum([(await old.count(a.scope)).total for a in solos + others])
        pg_records = sum([(await direct_pg.count(a.scope)).total for a in teams])
        assert per_store["old.db"] == (4, old_records)
        assert list(per_store.values())[1] == (2, pg_records)
        await old.close()

        history = (await c.admin.GetHistory(apb.GetHistoryRequest(), metadata=AUTH)).changes
        assert [h.figures.get("scopes") for h in history if h.to_phase == apb.DATA_MIGRATION != h.from_phase] == [
            "team-a*", "solo-x, solo-y"]
        assert history[-1].reason == "drill: solo scopes back" and history[-1].figures["scopes"] == "solo-x, solo-y"

        # What the unselected scopes paid: their write latency before and while the two sets moved.
        before = [d for a in others for t, d in a.calls if crowd_from <= t < moving_from]
        during = [d for a in others for t, d in a.calls if moving_from <= t <= moved_until]
        print(f"\nunselected scopes' writes: before p50 {_p(before, 50):.1f} ms p99 {_p(before, 99):.1f} ms "
              f"({len(before)} calls); while two sets moved p50 {_p(during, 50):.1f} ms p99 {_p(during, 99):.1f} ms "
              f"({len(during)} calls)")
        assert during  # they kept writing the whole time
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await direct_pg.close()
        await shutdown(c)


async def test_the_operator_moves_scopes_from_a_file_and_a_prefix_with_the_cli(
        embedder: BatchingEmbedder, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli.main import main
    c = await boot(embedder, tmp_path)
    base = ["admin", "--admin-target", f"127.0.0.1:{c.server.admin_port}", "--token", c.server.admin_token]

    async def cli(*args: str) -> tuple[int, str]:
        code = await asyncio.to_thread(main, [*base, *args])
        return code, capsys.readouterr().out

    try:
        for scope in ("a1", "team-1", "team-2", "other"):
            await seed(c, 20, scope)
        listed = tmp_path / "scopes.txt"
        listed.write_text("# the pilot agent\na1\n\n")
        with pytest.raises(SystemExit, match="--scopes-from: cannot read"):
            await cli("start", "--to", c.target, "--scopes-from", str(tmp_path / "missing.txt"))
        code, out = await cli("start", "--to", c.target, "--scopes-from", str(listed), "--scope-prefix", "team-")
        assert code == 0 and "moving     a1, team-* (every other scope stays where it is)" in out
        await wait_for(c, lambda s: s.backfill.complete)
        assert (await cli("advance"))[0] == 0
        code, out = await cli("placement")
        assert "moving     a1, team-* (DualWrite)" in out
        assert "  team-1: 40 records on the source, 40 on the target" in out
        assert (await cli("advance"))[0] == 0
        code, out = await cli("placement")
        lines = out.splitlines()
        assert lines[0].startswith("default    sqlite:///") and lines[0].endswith("old.db")
        assert lines[1].startswith("prefix     team-* -> ") and lines[1].endswith("new.db")
        assert lines[2].startswith("scope      a1 -> ") and lines[2].endswith("new.db")
        assert lines[3].endswith("old.db: 1 scopes, 40 records")
        assert lines[4].endswith("new.db: 3 scopes, 120 records")
        code, out = await cli("status")
        assert "placement  default " in out and "2 placed elsewhere" in out

        # A backup takes each scope from the store that serves it: the old store's stale copies of the moved scopes
        # are left out, and what was written since the move (on the new store only) is in.
        await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope="a1", entities=[
            pb.Entity(name="after-the-move", entity_type="seed", observations=["written on the new store"])]))
        per_scope: dict[str, int] = {}
        names: set[str] = set()
        async for chunk in c.admin.ExportRecords(apb.ExportRecordsRequest(), metadata=AUTH):
            for line in chunk.lines:
                body = json.loads(line)
                if body.get("kind") in ("entity", "observation", "relation"):
                    per_scope[body["scope"]] = per_scope.get(body["scope"], 0) + 1
                    names.add(body.get("name", ""))
        assert per_scope == {"a1": 42, "team-1": 40, "team-2": 40, "other": 40}
        assert "after-the-move" in names
    finally:
        await shutdown(c)
