"""Each part of the migration engine built alone, on a real control store (SQLite) and real stores (the embedded
store), with no engine around it: the keeper of the state, the repair queue, the dual writer, the backfill and a
fleet member's adoption. What a part does here is what it does inside the engine, since the engine only wires them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from adapters.base import Backend
from adapters.embedder import BatchingEmbedder
from adapters.errors import Conflict, IllegalTransition, RepairNotRecorded
from adapters.model import Entity
from adapters.records import Kind
from memshift.v1 import admin_pb2 as apb
from proxy.cli.admin import render
from proxy.engine import phases
from proxy.engine.adoption import FleetAdoption
from proxy.engine.backends import backend_for
from proxy.engine.backfill import Backfill
from proxy.engine.clock import EPOCH_MS, HybridClock, later
from proxy.engine.control import MigrationOptions, Phase, SqliteControlStore
from proxy.engine.dual_write import DualWriter
from proxy.engine.gate import ScopeGate
from proxy.engine.keeper import StateKeeper
from proxy.engine.migration import MigrationEngine
from proxy.engine.outage import OutageWatch
from proxy.engine.phases import Step
from proxy.engine.placement import Placement
from proxy.engine.repair import Counters, RepairQueue
from proxy.engine.stores import OpenStores
from proxy.engine.strain import WriteStrain
from proxy.routing.ops import CreateEntities
from proxy.runtime.telemetry import Telemetry
from tests.cluster import until


class Refusing:
    """A real store whose writes fail while `refuse` is set (before touching it)."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.refuse = inner, False
        self.delay = 0.0  # seconds an agent's write (`create_entities`) waits first: a store slowed down

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in {"create_entities", "apply", "load", "replace_if"}:
            return attr

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.refuse:
                raise RuntimeError("injected: this store refuses writes")
            if name == "create_entities" and self.delay:
                await asyncio.sleep(self.delay)
            return await attr(*args, **kwargs)

        return guarded


@dataclass
class Parts:
    dir: Path
    control: ControlOut
    keeper: StateKeeper
    stores: OpenStores
    gate: ScopeGate
    outage: OutageWatch
    counters: Counters
    old: str
    new: str
    opened: dict[str, Backend]
    clock: HybridClock = field(default_factory=lambda: HybridClock(1))

    async def start(self) -> None:
        """DataMigration from the old store to the new, taken through the keeper as the engine's start does."""
        await self.stores.get(self.new)
        s = self.keeper.state
        async with self.keeper.lock:
            await self.keeper.apply(Step.START, "test", "start", {}, primary=self.old, secondary=self.new,
                                    source=self.old, start_placement=s.placement, migration_id=s.migration_id + 1,
                                    options=MigrationOptions(batch_size=7), backfill_total=0)


@pytest.fixture
async def parts(embedder: BatchingEmbedder, tmp_path: Path) -> AsyncIterator[Parts]:
    old, new = f"sqlite:///{tmp_path}/old.db", f"sqlite:///{tmp_path}/new.db"
    control = ControlOut(tmp_path / "control.db", initial_primary=old)
    opened: dict[str, Backend] = {}

    async def open_store(spec: str) -> Backend:
        store = backend_for(spec, embedder)
        await store.open()
        opened[spec] = Refusing(store)  # type: ignore[assignment]
        return opened[spec]

    keeper = StateKeeper(control)
    await keeper.load()
    stores = OpenStores(keeper, open_store)
    await stores.get(old)

    async def probe() -> None:
        return None

    async def changed(*_: Any) -> None:
        return None

    p = Parts(tmp_path, control, keeper, stores, ScopeGate(), OutageWatch(probe, changed), Counters(), old, new,
              opened)
    yield p
    await stores.close(1.0)
    await control.close()


async def names(store: Backend, scope: str) -> set[str]:
    return {e.name for e in (await store.read_graph(scope, None, 1000)).entities}


# --- the keeper ---------------------------------------------------------------------------------------------------
async def test_the_keeper_takes_steps_through_the_table_and_loses_a_race_to_another_proxy(parts: Parts) -> None:
    keeper = parts.keeper
    with pytest.raises(IllegalTransition, match="cannot advance: the migration is in NotStarted"):
        keeper.next(Step.ADVANCE)
    await parts.start()
    assert keeper.state.phase == Phase.DATA_MIGRATION and phases.backfilling(keeper.state)
    assert [h.reason for h in await keeper.history()][:1] == ["start"]
    # Another proxy on the same control store saves first: this one's save is a Conflict, and it holds the winner.
    other = StateKeeper(parts.control)
    await other.load()
    async with other.lock:
        await other.save(replace(other.state, paused=True))
    with pytest.raises(Conflict):
        async with keeper.lock:
            await keeper.save(replace(keeper.state, read_fraction=0.5))
    assert keeper.state.paused and keeper.state.read_fraction == 0.0
    seen: list[bool] = []
    keeper.watch(lambda s: seen.append(s.paused))
    async with keeper.lock:
        await keeper.save(replace(keeper.state, paused=False))
    assert seen == [True, False]  # a watcher sees the state it joined at, then every state taken on


class ControlOut(SqliteControlStore):
    """The real control store, whose repair queue and saves fail while `out` is set (after `delay` seconds)."""

    out = False
    delay = 0.0

    async def enqueue_repairs(self, migration_id: int, keys: list[Any]) -> None:
        if self.out:
            raise sqlite3.OperationalError("injected: the control store is unreachable")
        await super().enqueue_repairs(migration_id, keys)

    async def save(self, state: Any, expected_revision: int, durable: bool = True) -> Any:
        if self.out:
            await asyncio.sleep(self.delay)
            raise sqlite3.OperationalError("injected: the control store is unreachable")
        return await super().save(state, expected_revision, durable)


async def test_a_cancelled_save_that_then_fails_still_ends_in_the_cancellation(tmp_path: Path) -> None:
    """A backfill cancelled during a checkpoint whose save then failed went on copying (and sleeping between
    retries) forever: the keeper turned the cancellation into the save's error. The cancelled caller must end."""
    control = ControlOut(tmp_path / "control.db", initial_primary="sqlite:///a.db")
    keeper = StateKeeper(control)
    await keeper.load()
    control.out, control.delay = True, 0.2
    saving = asyncio.ensure_future(keeper.save(replace(keeper.state, paused=True)))
    await asyncio.sleep(0.05)  # inside the save
    saving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await saving
    assert (await control.load()).revision == keeper.state.revision == 0  # nothing was saved
    await control.close()


# --- the dual writer and the repair queue ------------------------------------------------------------------------
async def test_a_write_whose_repair_cannot_be_recorded_is_not_answered_done_and_its_keys_are_kept(
        parts: Parts) -> None:
    """The new store refused a dual write and the control store cannot record the key it now owes: the caller is
    told UNAVAILABLE (the write is on the decisive store, but a proxy dying now would leave the new store without it
    and nothing would know), the key waits in memory with its scope's reads on the decisive store, and the next
    repair pass records it and repairs it once the control store is back."""
    repairs = RepairQueue(parts.keeper, parts.stores, parts.gate, parts.outage, parts.counters)
    writer = DualWriter(parts.keeper, parts.stores, repairs, parts.gate, parts.outage, parts.clock,
                        parts.counters, Telemetry())
    await parts.start()
    new = parts.opened[parts.new]
    new.refuse = True  # type: ignore[attr-defined]
    parts.control.out = True
    with pytest.raises(RepairNotRecorded) as told:
        await writer.write(CreateEntities("s", [Entity("owed", "t")]))
    assert told.value.code == "UNAVAILABLE" and "retry" in told.value.detail()
    assert "OperationalError" in str(told.value) and "unreachable" not in str(told.value)  # no driver text
    assert await names(parts.opened[parts.old], "s") == {"owed"}  # on the decisive store
    assert repairs.owed == 1 and repairs.scope_pending("s")
    with pytest.raises(sqlite3.OperationalError):
        await repairs.repair_once()  # still out: kept
    assert repairs.owed == 1 and repairs.scope_pending("s")
    parts.control.out = False
    new.refuse = False  # type: ignore[attr-defined]
    assert await repairs.drain(within=30) == 0
    assert repairs.owed == 0 and not repairs.scope_pending("s")
    assert await names(new, "s") == {"owed"}


async def test_the_dual_writer_writes_both_stores_and_queues_what_the_new_one_refused(parts: Parts) -> None:
    repairs = RepairQueue(parts.keeper, parts.stores, parts.gate, parts.outage, parts.counters)
    writer = DualWriter(parts.keeper, parts.stores, repairs, parts.gate, parts.outage, HybridClock(7),
                        parts.counters, Telemetry())
    await writer.write(CreateEntities("s", [Entity("before", "t")]))  # no migration: the old store alone
    await parts.start()
    await writer.write(CreateEntities("s", [Entity("both", "t")]))
    parts.opened[parts.new].refuse = True  # type: ignore[attr-defined]
    await writer.write(CreateEntities("s", [Entity("owed", "t")]))  # acknowledged from the old store
    old, new = parts.opened[parts.old], parts.opened[parts.new]
    assert await names(old, "s") == {"before", "both", "owed"}
    assert await names(new, "s") == {"both"}
    assert repairs.scope_pending("s") and await repairs.depth() == 1 and parts.counters.secondary_failures == 1
    # The repair queue settles it from the decisive store once the new one takes writes again.
    parts.opened[parts.new].refuse = False  # type: ignore[attr-defined]
    assert await repairs.drain(within=30) == 0
    assert await names(new, "s") == {"both", "owed"} and not repairs.scope_pending("s")


@pytest.mark.parametrize("target", [2.0, 0.0])
async def test_the_copy_rests_while_agents_writes_are_slower_than_the_target_allows(parts: Parts,
                                                                                   target: float) -> None:
    """Agents' writes, timed by the dual writer, slow down while the backfill runs: the copy rests between pages
    (shown in its progress), and runs at full speed again once they are fast; with the target 0 it never rests."""
    strain = WriteStrain(target)
    repairs = RepairQueue(parts.keeper, parts.stores, parts.gate, parts.outage, parts.counters)
    writer = DualWriter(parts.keeper, parts.stores, repairs, parts.gate, parts.outage, HybridClock(7),
                        parts.counters, Telemetry(), strain=strain)
    old = parts.opened[parts.old]
    await old.create_entities("s", [Entity(f"e{i:04d}", "t", (f"fact {i}",)) for i in range(800)], 1)
    await old.create_entities("warm", [Entity("up", "t")], 2)  # a first write's costs, not timed
    for i in range(40):  # the agents' latency with no bulk work running
        await writer.write(CreateEntities("quiet", [Entity(f"q{i}", "t")]))
    await parts.start()
    async with parts.keeper.lock:  # held at first, so the agents' slow writes are seen before the first page
        await parts.keeper.save(replace(parts.keeper.state, paused=True))
    backfill = Backfill(parts.keeper, parts.stores, parts.gate, parts.outage, Telemetry(), parts.clock,
                        strain=strain)
    old.delay = 0.05  # type: ignore[attr-defined]  # every write now takes far longer than twice what it did
    rested = 0.0

    async def agent() -> None:
        nonlocal rested
        for i in itertools.count():
            await writer.write(CreateEntities("agents", [Entity(f"a{i}", "t")]))
            rested = max(rested, backfill.progress().rest)

    writing = asyncio.ensure_future(agent())
    try:
        backfill.start()
        await until(lambda: backfill.holds > 0 and strain.strain().busy_writes >= 10)
        async with parts.keeper.lock:
            await parts.keeper.save(replace(parts.keeper.state, paused=False))
        if target:
            await until(lambda: strain.pause > 0)
            assert backfill.progress().rest == strain.pause
            old.delay = 0.0  # type: ignore[attr-defined]  # agents fast again: the rest falls back to nothing
            await until(lambda: strain.pause == 0 or parts.keeper.state.backfill_complete)
        await until(lambda: parts.keeper.state.backfill_complete)
    finally:
        writing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writing
    assert (rested > 0) == bool(target)
    assert await names(parts.opened[parts.new], "s") == await names(old, "s")


async def test_the_repair_queue_alone_reconciles_a_queued_key_from_the_decisive_store(parts: Parts) -> None:
    repairs = RepairQueue(parts.keeper, parts.stores, parts.gate, parts.outage, parts.counters, interval=0.01)
    await parts.start()
    old, new = parts.opened[parts.old], parts.opened[parts.new]
    await old.create_entities("r", [Entity("only-old", "t", ("x",))], 5)
    await new.create_entities("r", [Entity("only-new", "t")], 6)  # a write the old store refused
    await repairs.enqueue([(Kind.ENTITY, "r", ("only-old",)), (Kind.ENTITY, "r", ("only-new",))])
    loop = asyncio.ensure_future(repairs.run())  # the loop production schedules
    try:
        await until(lambda: _empty(repairs))
    finally:
        loop.cancel()
    assert await names(new, "r") == {"only-old"} and parts.counters.repairs_done == 2


async def _empty(repairs: RepairQueue) -> bool:
    return await repairs.depth() == 0


# --- the backfill ------------------------------------------------------------------------------------------------
async def test_the_backfill_alone_copies_what_the_old_store_held_and_checkpoints(parts: Parts) -> None:
    old = parts.opened[parts.old]
    for i in range(30):
        await old.create_entities(f"b{i % 3}", [Entity(f"e{i:02d}", "t", (f"fact {i}",))], i + 1)
    await parts.start()
    backfill = Backfill(parts.keeper, parts.stores, parts.gate, parts.outage, Telemetry(), parts.clock)
    backfill.start()  # scheduled as in production: a task of its own
    assert backfill.running
    await until(lambda: parts.keeper.state.backfill_complete)
    new = parts.opened[parts.new]
    for scope in ("b0", "b1", "b2"):
        assert await names(new, scope) == await names(old, scope)
    s = parts.keeper.state
    assert s.backfill_done >= 60 and s.backfill_cursor is None  # 30 entities and their observations
    saved = await parts.control.load()
    assert saved.backfill_complete and saved.revision == s.revision  # the checkpoints are in the control store


async def test_the_copys_end_shows_its_step_until_the_indexes_are_built(parts: Parts) -> None:
    """Once every page is copied, status says what the new store is doing (settling what the loads left, then
    building its indexes, which may take minutes on a large store) instead of an ETA of zero, from the saved
    state any proxy of a fleet reads; complete clears it."""
    old = parts.opened[parts.old]
    await old.create_entities("s", [Entity(f"e{i}", "t", (f"fact {i}",)) for i in range(10)], 1)
    await parts.start()
    new = await parts.stores.get(parts.new)
    building, release = asyncio.Event(), asyncio.Event()
    inner = new.inner  # type: ignore[attr-defined]
    built = inner.build_indexes

    async def slow_build() -> None:
        building.set()
        await release.wait()
        await built()

    inner.build_indexes = slow_build
    backfill = Backfill(parts.keeper, parts.stores, parts.gate, parts.outage, Telemetry(), parts.clock)
    backfill.start()
    async with asyncio.timeout(60):
        await building.wait()
    shown = await parts.control.load()
    assert (shown.backfill_step, shown.backfill_complete) == ("indexing", False)
    progress = backfill.progress()
    assert progress.step == "indexing" and progress.done == progress.total and not progress.complete
    status = apb.MigrationStatus(phase=apb.DATA_MIGRATION, backfill=apb.BackfillProgress(
        done=progress.done, total=progress.total, step=progress.step))
    assert "building the new store's indexes" in render(status)
    release.set()
    await until(lambda: parts.keeper.state.backfill_complete)
    assert parts.keeper.state.backfill_step == "" and backfill.progress().step == ""


async def test_the_backfill_holds_while_the_state_is_paused(parts: Parts) -> None:
    old = parts.opened[parts.old]
    await old.create_entities("p", [Entity(f"e{i}", "t") for i in range(20)], 1)
    await parts.start()
    async with parts.keeper.lock:
        await parts.keeper.save(replace(parts.keeper.state, paused=True))
    backfill = Backfill(parts.keeper, parts.stores, parts.gate, parts.outage, Telemetry(), parts.clock)
    run = asyncio.ensure_future(backfill.run())
    await until(lambda: backfill.holds > 0)  # it reads the pause before any page
    assert parts.keeper.state.backfill_done == 0 and not run.done()
    async with parts.keeper.lock:
        await parts.keeper.save(replace(parts.keeper.state, paused=False))  # it follows the state, untold
    async with asyncio.timeout(60):
        await run
    assert parts.keeper.state.backfill_complete


async def test_the_backfill_never_reads_what_agents_write_after_it_started(parts: Parts) -> None:
    """The copy fixes its watermark when it starts; what agents write after that reaches the new store by dual
    write, so the copy does not read it again: with agents writing new keys (past the copy's cursor) the copy reads
    exactly the records that were there, ends, and the new store still holds everything."""
    old = parts.opened[parts.old]
    await old.create_entities("w", [Entity(f"a{i:02d}", "t", (f"fact {i}",)) for i in range(40)], parts.clock.now())
    await parts.start()
    new = parts.opened[parts.new]
    repairs = RepairQueue(parts.keeper, parts.stores, parts.gate, parts.outage, parts.counters)
    writer = DualWriter(parts.keeper, parts.stores, repairs, parts.gate, parts.outage, parts.clock,
                        parts.counters, Telemetry())
    backfill = Backfill(parts.keeper, parts.stores, parts.gate, parts.outage, Telemetry(), parts.clock)
    backfill.start()
    await until(lambda: parts.keeper.state.copy_until > 0)
    async with parts.keeper.lock:  # held mid-copy while the agents write
        await parts.keeper.save(replace(parts.keeper.state, paused=True))
    await until(lambda: backfill.holds > 0)
    assert not parts.keeper.state.backfill_complete
    for i in range(60):  # new keys, after every key the copy has yet to read
        await writer.write(CreateEntities("w", [Entity(f"z{i:02d}", "t", (f"later {i}",))]))
    async with parts.keeper.lock:
        await parts.keeper.save(replace(parts.keeper.state, paused=False))
    await until(lambda: parts.keeper.state.backfill_complete)
    s = parts.keeper.state
    assert (s.backfill_done, s.backfill_copied, s.backfill_total) == (80, 80, 80)  # 40 entities, 40 observations
    assert await names(new, "w") == await names(old, "w") and len(await names(new, "w")) == 100
    assert await repairs.depth() == 0  # every later write reached the new store by dual write


# --- a fleet member's adoption -----------------------------------------------------------------------------------
async def test_adoption_takes_another_proxys_state_opens_its_stores_and_stops_an_unwanted_backfill(
        parts: Parts) -> None:
    repairs = RepairQueue(parts.keeper, parts.stores, parts.gate, parts.outage, parts.counters)
    backfill = Backfill(parts.keeper, parts.stores, parts.gate, parts.outage, Telemetry(), parts.clock, scheduled=False)
    adoption = FleetAdoption(parts.keeper, parts.stores, repairs, backfill)
    other = StateKeeper(parts.control)
    await other.load()
    async with other.lock:
        await other.apply(Step.START, "other proxy", "start", {}, primary=parts.old, secondary=parts.new,
                          source=parts.old, start_placement=Placement(parts.old), migration_id=1)
    assert await adoption.adopt(await parts.control.load())
    assert parts.keeper.state.phase == Phase.DATA_MIGRATION
    assert parts.stores.secondary is not None  # the new store the state names was opened
    assert not await adoption.adopt(await parts.control.load())  # not newer: not news
    async with other.lock:
        await other.save(replace(other.state, backfill_complete=True))
        await other.apply(Step.ROLLBACK, "other proxy", "drill", {})
    assert await adoption.adopt(await parts.control.load())
    assert parts.keeper.state.phase == Phase.ROLLED_BACK and parts.stores.secondary is None


async def test_a_proxy_restarted_with_its_clock_behind_stamps_above_a_rollbacks_resync_point(
        embedder: BatchingEmbedder, tmp_path: Path) -> None:
    """After a rollback the state keeps the point from which a migration back to the old target copies again; a
    proxy restarted on a clock a minute behind must stamp its writes above it, or the next migration back takes them
    for writes the target already had and never copies them (the stateful test found it)."""
    a = f"sqlite:///{tmp_path}/a.db"

    async def open_store(spec: str) -> Backend:
        store = backend_for(spec, embedder)
        await store.open()
        return store

    control = SqliteControlStore(tmp_path / "control.db", initial_primary=a)
    keeper = StateKeeper(control)
    point = later(HybridClock(1).now(), 30_000)  # a rollback's resync point, stamped by a clock running ahead
    async with keeper.lock:
        await keeper.save(replace(keeper.state if keeper.state.revision else await keeper.load(),
                                  resync_target=f"sqlite:///{tmp_path}/b.db", resync_version=point))
    behind = HybridClock(1, wall_ms=lambda: time.time_ns() // 1_000_000 - EPOCH_MS - 60_000)
    engine = MigrationEngine(control, open_store, behind, background=False)
    await engine.start()
    try:
        assert behind.now() > point
    finally:
        await engine.stop()
        await control.close()
