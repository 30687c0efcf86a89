"""The invariant of docs/design.md, under random interleavings (hypothesis RuleBasedStateMachine).

Client writes and deletes, backfill batches, a secondary that fails or stalls (a wrapper around the real store),
proxy restarts from the control store, phase changes and rollbacks, and migrations of a random selection of scopes
(every scope, one, or a prefix; moved back and forth between the two stores), in any order. At every quiescent point
(writes stopped, faults cleared, backfill finished, repair queue drained) `verify(primary, secondary)` over the
scopes the migration moves must find zero differences, and every scope's store (its placement) must hold exactly
what a plain model of MCP semantics says was acknowledged in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from adapters.base import Backend
from adapters.embedder import BatchingEmbedder, SentenceTransformerModel
from adapters.errors import EntityNotFound, InvalidInput, PhaseUnknown, RepairNotRecorded, StoreUnavailable
from adapters.model import Entity, ObservationAddition, ObservationDeletion, Relation
from adapters.records import Kind
from proxy.engine import phases
from proxy.engine.backends import backend_for
from proxy.engine.clock import EPOCH_MS, HybridClock
from proxy.engine.control import MigrationOptions, Phase, SqliteControlStore
from proxy.engine.migration import IllegalTransition, MigrationEngine
from proxy.engine.placement import EVERYTHING, Selection, source_of
from proxy.engine.verify import verify
from proxy.routing import ops
from tests.cluster import until

SCOPES = ["s1", "s2"]
NAMES = ["a", "b", "c"]
TEXTS = ["likes tea", "plays chess", "owns a cat"]
SELECTIONS = [EVERYTHING, Selection(("s1",)), Selection(("s2",)), Selection(("s1", "s2")), Selection((), ("s",))]
API_WRITES = {"create_entities", "create_relations", "add_observations", "delete_entities",
              "delete_observations", "delete_relations"}
WRITE_METHODS = API_WRITES | {"apply", "load", "replace_if"}
READ_METHODS = {"get_records", "export_page", "list_records", "child_keys", "get_vectors"}


@dataclass
class Faults:
    mode: str = "ok"  # ok | fail | stall
    reads_fail: bool = False  # reads of the store (a repair's, a backfill's when it is the primary) fail too
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # stalled writes wait here until released
    # A stall only makes sense where the engine does not wait: the scope's write goes to the new store alongside.
    is_secondary: Any = lambda scope: True
    held: frozenset[str] = frozenset()  # methods (reads too) that wait for the gate whatever the mode
    holding: int = 0  # calls waiting at the gate now


class FaultyStore:
    """A real store whose writes can be made to fail (before touching it) or stall past the dual-write grace."""

    def __init__(self, inner: Backend, faults: Faults) -> None:
        self._inner, self._faults = inner, faults

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name in READ_METHODS and self._faults.reads_fail:
            async def unreadable(*args: Any, **kwargs: Any) -> Any:
                raise StoreUnavailable("injected read failure")
            return unreadable
        if name not in WRITE_METHODS and name not in self._faults.held:
            return attr

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            if name in self._faults.held:
                self._faults.holding += 1
                try:
                    await self._faults.gate.wait()
                finally:
                    self._faults.holding -= 1
            if self._faults.mode == "fail":
                raise StoreUnavailable("injected failure")
            # Held past the engine's grace, landing whenever the test says.
            if self._faults.mode == "stall" and name in API_WRITES and self._faults.is_secondary(args[0]):
                await self._faults.gate.wait()
            return await attr(*args, **kwargs)

        return guarded


CONTROL_METHODS = {"load", "save", "record", "enqueue_repairs", "due_repairs", "repaired", "repair_failed",
                   "repair_depth", "repair_scopes", "carry_over_repairs"}


class FlakyControl(SqliteControlStore):
    """The real control store, which can be made to fail every call before touching it ("down"), or to lose the
    answer of a call that did its work ("answers_lost": a PostgreSQL connection dropped as the commit returned)."""

    mode = "ok"

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name not in CONTROL_METHODS or object.__getattribute__(self, "mode") == "ok":
            return attr
        mode = object.__getattribute__(self, "mode")

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            if mode == "down":
                raise sqlite3.OperationalError("injected: the control store is unreachable")
            await attr(*args, **kwargs)
            raise sqlite3.OperationalError("injected: the connection dropped before the answer came")

        return flaky


@dataclass
class Model:
    """MCP memory-server semantics, as plainly as possible: what was acknowledged to clients."""

    entities: dict[tuple[str, str], tuple[str, set[str]]] = field(default_factory=dict)
    relations: set[tuple[str, str, str, str]] = field(default_factory=set)


_EMBEDDER: BatchingEmbedder | None = None


def shared_embedder() -> BatchingEmbedder:
    global _EMBEDDER
    if _EMBEDDER is None:
        _EMBEDDER = BatchingEmbedder(SentenceTransformerModel())
    return _EMBEDDER


class MigrationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="memshift-sm-"))
        self.a, self.b = f"sqlite:///{self.dir}/a.db", f"sqlite:///{self.dir}/b.db"
        self.faults = Faults()
        self.a_faults = Faults()  # the other store: only ever holds a call (a write racing a migration's start)
        self.skew_ms = 0  # how far this proxy's clock runs from the true time (another machine after a restart)
        self.faults.is_secondary = lambda scope: (self.engine is not None and self.engine.state.primary != self.b
                                                  and phases.moves(self.engine.state, scope))
        self.model = Model()
        self.engine: MigrationEngine | None = None
        self.control: FlakyControl | None = None

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _open(self, spec: str) -> Backend:
        store = backend_for(spec, shared_embedder())
        await store.open()
        return FaultyStore(store, self.faults if spec == self.b else self.a_faults)  # type: ignore[return-value]

    def _faults_of(self, spec: str) -> Faults:
        return self.faults if spec == self.b else self.a_faults

    async def _boot(self) -> None:
        shared_embedder()  # loaded before the engine opens stores, as the server does
        self.control = FlakyControl(self.dir / "control.db", initial_primary=self.a)
        # No resync margin: going back to a target after a rollback copies only what changed, and the invariant
        # checks that this loses nothing in any interleaving.
        skew = self.skew_ms
        clock = HybridClock(1, wall_ms=lambda: time.time_ns() // 1_000_000 - EPOCH_MS + skew)
        self.engine = MigrationEngine(self.control, self._open, clock, secondary_grace=0.03,
                                      background=False, resync_margin_ms=0)
        await self.engine.start()

    @initialize(data=st.data(), seed_writes=st.integers(0, 12),
                start_in=st.sampled_from(["NotStarted", "DataMigration", "DualWrite", "Completed"]))
    def boot(self, data: st.DataObject, seed_writes: int, start_in: str) -> None:
        """Some memory first, then straight to a random phase, so every phase gets its share of the chaos."""
        self.run(self._boot())
        for _ in range(seed_writes):
            self._random_write(data)
        if start_in == "NotStarted":
            return
        self.run(self.eng.start_migration(self.b, MigrationOptions(batch_size=data.draw(st.sampled_from([1, 4, 50])),
                                                                   workers=data.draw(st.integers(1, 3)),
                                                                   mirror_seconds=600), "test",
                                          data.draw(st.sampled_from(SELECTIONS))))
        if start_in == "DataMigration":
            return
        self.backfill_all()
        self.run(self.eng.advance(Phase.DATA_MIGRATION, "test"))
        if start_in == "Completed":
            self.run(self.eng.advance(Phase.DUAL_WRITE, "test"))

    def teardown(self) -> None:
        try:
            if self.engine is not None:
                self.quiesce_and_check()  # every run ends at a quiescent point
        finally:
            self._close()

    def _close(self) -> None:
        async def down() -> None:
            if self.engine is not None:
                await self.engine.stop()
            if self.control is not None:
                await self.control.close()
            await shared_embedder().close()  # its worker task lives on this machine's loop

        self.run(down())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def eng(self) -> MigrationEngine:
        assert self.engine is not None
        return self.engine

    # --- client writes (each checked against the model) -------------------------------------------------------
    def _write(self, op: Any) -> tuple[bool, Any]:
        """(applied, answer). A failing primary means the caller got an error: nothing was acknowledged. A write
        answered `RepairNotRecorded` (the control store was out) reached the decisive store: applied, no answer."""
        try:
            return True, self.run(self.eng.writer.write(op)).answer
        except RepairNotRecorded:
            assert self.control is not None and self.control.mode != "ok"
            event("a write answered RepairNotRecorded")
            return True, None
        except PhaseUnknown:  # refused before touching a store: a state change's outcome is not known yet
            assert self.control is not None and self.control.mode != "ok"
            return False, None
        except StoreUnavailable:
            return False, None

    def create_entity(self, scope: str, name: str, etype: str, obs: set[str]) -> None:
        self._created(scope, name, etype, obs, *self._write(ops.CreateEntities(scope, [Entity(name, etype,
                                                                                              tuple(sorted(obs)))])))

    def _created(self, scope: str, name: str, etype: str, obs: set[str], ok: bool, answer: Any) -> None:
        if not ok:
            return
        exists = (scope, name) in self.model.entities
        assert answer is None or [e.name for e in answer] == ([] if exists else [name])
        if not exists:
            self.model.entities[(scope, name)] = (etype, set(obs))

    def add_observation(self, scope: str, name: str, text: str) -> None:
        try:
            ok, answer = self._write(ops.AddObservations(scope, [ObservationAddition(name, (text,))]))
        except EntityNotFound:
            assert (scope, name) not in self.model.entities
            return
        if not ok:
            return
        assert (scope, name) in self.model.entities
        added = text not in self.model.entities[(scope, name)][1]
        assert answer is None or answer[0].contents == ((text,) if added else ())
        self.model.entities[(scope, name)][1].add(text)

    def delete_observation(self, scope: str, name: str, text: str) -> None:
        if not self._write(ops.DeleteObservations(scope, [ObservationDeletion(name, (text,))]))[0]:
            return
        if (scope, name) in self.model.entities:
            self.model.entities[(scope, name)][1].discard(text)

    def delete_entity(self, scope: str, name: str) -> None:
        if not self._write(ops.DeleteEntities(scope, [name]))[0]:
            return
        self.model.entities.pop((scope, name), None)
        self.model.relations = {r for r in self.model.relations if r[0] != scope or name not in (r[1], r[3])}

    def relate(self, scope: str, src: str, dst: str) -> None:
        ok, answer = self._write(ops.CreateRelations(scope, [Relation(src, dst, "knows")]))
        if not ok:
            return
        key = (scope, src, "knows", dst)
        assert answer is None or len(answer) == (0 if key in self.model.relations else 1)
        self.model.relations.add(key)

    def unrelate(self, scope: str, src: str, dst: str) -> None:
        if not self._write(ops.DeleteRelations(scope, [Relation(src, dst, "knows")]))[0]:
            return
        self.model.relations.discard((scope, src, "knows", dst))

    @rule(data=st.data(), n=st.integers(1, 3))
    def client_writes(self, data: st.DataObject, n: int) -> None:
        for _ in range(n):
            self._random_write(data)

    def _random_write(self, data: st.DataObject) -> None:
        scope, name = data.draw(st.sampled_from(SCOPES)), data.draw(st.sampled_from(NAMES))
        kind = data.draw(st.sampled_from(["create", "create", "observe", "unobserve", "delete", "relate", "relate",
                                          "unrelate"]))
        text, other = data.draw(st.sampled_from(TEXTS)), data.draw(st.sampled_from(NAMES))
        if kind == "create":
            self.create_entity(scope, name, data.draw(st.sampled_from(["person", "robot"])),
                               data.draw(st.sets(st.sampled_from(TEXTS))))
        elif kind == "observe":
            self.add_observation(scope, name, text)
        elif kind == "unobserve":
            self.delete_observation(scope, name, text)
        elif kind == "delete":
            self.delete_entity(scope, name)
        elif kind == "relate":
            self.relate(scope, name, other)
        else:
            self.unrelate(scope, name, other)

    # --- the operator, the background, the weather ---------------------------------------------------------------
    @rule(mode=st.sampled_from(["ok", "fail", "stall"]))
    def secondary_weather(self, mode: str) -> None:
        self.faults.mode = mode

    @rule(mode=st.sampled_from(["ok", "down", "answers_lost"]))
    def control_weather(self, mode: str) -> None:
        """The control store fails every call, or does the work and loses the answer."""
        assert self.control is not None
        self.control.mode = mode

    def _control_may_fail(self) -> contextlib.AbstractContextManager[object]:
        """A step of the operator's or the background's fails when the control store does, and only then."""
        return contextlib.suppress(sqlite3.Error) if self.control is not None and self.control.mode != "ok" \
            else contextlib.nullcontext()

    @rule(failing=st.booleans())
    def secondary_reads(self, failing: bool) -> None:
        """Reads of b fail (an outage of reads only). While b is the primary, the backfill cannot read and waits:
        that is right, so a whole copy (`backfill_all`) first ends the fault, as an operator would wait for it."""
        self.faults.reads_fail = failing

    @rule(data=st.data(), n=st.integers(1, 4))
    def writes_racing_the_backfill_and_repairs(self, data: st.DataObject, n: int) -> None:
        """Client writes while the backfill and the repair queue run as production runs them (tasks on the same
        loop): each write's turn of the loop lets them move on between and during the writes."""
        done = asyncio.Event()

        async def repairing() -> None:
            # Ends on its own flag, not by cancellation: Python 3.11's wait_for (the gate's) can swallow a
            # cancellation that arrives as its inner wait completes, and the loop would then run forever.
            while not done.is_set():
                with contextlib.suppress(StoreUnavailable, sqlite3.Error, PhaseUnknown):
                    await self.eng.keeper.certain()
                    await self.eng.repairs.repair_once()
                await asyncio.sleep(0)

        background = [self.loop.create_task(self.eng.backfill.run()), self.loop.create_task(repairing())]
        try:
            for _ in range(n):
                self._random_write(data)
        finally:
            done.set()
            background[0].cancel()
            self.run(self._ended(background))

    @rule(data=st.data(), turns=st.integers(0, 12), chosen=st.sampled_from(SELECTIONS))
    def a_write_racing_the_start(self, data: st.DataObject, turns: int, chosen: Selection) -> None:
        """A write to a scope's store alone is still in flight (held at the store) when a migration of that scope
        starts: the copy must wait for it before it fixes its watermark, or the write would be neither dual-written
        nor copied."""
        scope, name = data.draw(st.sampled_from(SCOPES)), data.draw(st.sampled_from(NAMES))
        if phases.moves(self.eng.state, scope):
            return  # already moving: its writes go to both stores
        faults = self._faults_of(self.eng.state.placement.store_of(scope))
        faults.held = frozenset({"create_entities"})
        writing = self.loop.create_task(self.eng.writer.write(
            ops.CreateEntities(scope, [Entity(name, "person", ("raced the start",))])))
        try:
            self.run(until(lambda: faults.holding == 1))
            self.start_migration(data.draw(st.sampled_from([1, 3, 50])), data.draw(st.integers(1, 3)), chosen)
            self.run(self._backfill_for(turns))  # the copy waits for the write (solo_done)
        finally:
            faults.held = frozenset()
            faults.gate.set()
            try:
                ok, answer = True, self.run(writing).answer
            except RepairNotRecorded:
                ok, answer = True, None
            except (StoreUnavailable, PhaseUnknown):
                ok, answer = False, None
            faults.gate = asyncio.Event()
        self._created(scope, name, "person", {"raced the start"}, ok, answer)

    @rule()
    def release_stalled(self) -> None:
        """Writes held by a stalled secondary land now, late, in whatever state the stores have reached."""
        self.faults.gate.set()
        self.run(until(lambda: self.eng.writer.late_in_flight == 0))
        self.faults.gate = asyncio.Event()

    async def _backfill_for(self, turns: int | None) -> None:
        """The production backfill (`run_backfill`: read-ahead, several batches applied at once, checkpoints in
        order) for `turns` turns of the event loop, or until it is done or the new store is out; then cancelled, as
        a pause, a restart or a lost leadership cancels it, with batches possibly mid-flight."""
        task = asyncio.ensure_future(self.eng.backfill.run())
        turn = 0
        while not task.done() and (turns is None or turn < turns) and self.eng.outage.current is None:
            await asyncio.sleep(0.001 if turns is not None else 0.005)
            turn += 1
        task.cancel()
        await self._ended([task])

    async def _ended(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Wait for cancelled background work to end; one that does not is a hang, shown with where it waits."""
        finished, _ = await asyncio.wait(tasks, timeout=30)
        if len(finished) < len(tasks):
            out = io.StringIO()
            for t in asyncio.all_tasks(self.loop):
                t.print_stack(file=out)
            raise AssertionError("background work did not end when cancelled:\n" + out.getvalue())

    @rule(turns=st.integers(1, 12))
    def backfill_some(self, turns: int) -> None:
        self.run(self._backfill_for(turns))

    @rule()
    def backfill_all(self) -> None:
        self.faults.reads_fail = False
        assert self.control is not None
        self.control.mode = "ok"  # a whole copy needs its checkpoints: it waits for the control store
        if phases.backfilling(self.eng.state):
            self.run(self._backfill_for(None))

    @rule()
    def repair_batch(self) -> None:
        """One pass of the repair loop as `RepairQueue.run` makes it."""
        with self._control_may_fail(), contextlib.suppress(PhaseUnknown):
            self.run(self.eng.keeper.certain())
            self.run(self.eng.repairs.repair_once())

    @rule(skew_ms=st.sampled_from([0, 0, -60_000, -2_000, 2_000, 60_000]))
    def restart_proxy(self, skew_ms: int) -> None:
        """The proxy restarts, possibly as another machine whose clock runs behind or ahead of the one before: its
        versions must still order after what is stored, and the copy's watermark must still cover every write."""
        self.skew_ms = skew_ms
        assert self.control is not None
        self.control.mode = "ok"  # back for the stop (which records what it kept in memory) and the start
        self.run(self.eng.stop())
        assert self.control is not None
        self.run(self.control.close())
        self.run(self._boot())

    @rule(batch=st.sampled_from([1, 3, 50]), workers=st.integers(1, 3), chosen=st.sampled_from(SELECTIONS))
    def start_migration(self, batch: int, workers: int, chosen: Selection) -> None:
        try:
            source = source_of(self.eng.state.placement, chosen)
        except InvalidInput:  # the selected scopes live on both stores: refused, whatever the phase
            source = ""
        target = self.a if source == self.b else self.b
        try:
            self.run(self.eng.start_migration(target, MigrationOptions(batch_size=batch, workers=workers,
                                                                       mirror_seconds=600), "test", chosen))
        except sqlite3.Error:
            assert self.control is not None and self.control.mode != "ok"
        except IllegalTransition:
            assert self.eng.state.phase not in (Phase.NOT_STARTED, Phase.ROLLED_BACK) or not source
        except InvalidInput:
            assert not source
        else:
            assert source
            event(f"migrated {chosen.shown()}")

    @rule()
    def advance(self) -> None:
        before = self.eng.state.phase
        with contextlib.suppress(IllegalTransition), self._control_may_fail():
            self.run(self.eng.advance(before, "test"))

    @rule()
    def rollback(self) -> None:
        with contextlib.suppress(IllegalTransition), self._control_may_fail():
            self.run(self.eng.rollback("chaos", "test"))

    # --- the invariant -------------------------------------------------------------------------------------------
    @precondition(lambda self: self.engine is not None)
    @rule()
    def quiesce_and_check(self) -> None:
        assert self.control is not None
        self.control.mode = "ok"
        self.run(self.eng.keeper.certain())  # the repair loop's next pass reads the state again
        self.faults.mode = "ok"
        self.faults.reads_fail = False
        self.release_stalled()
        eng = self.eng
        event(f"checked in {eng.state.phase.value}")
        if eng.stores.secondary is not None:
            self.backfill_all()
            assert self.run(eng.repairs.drain(within=30)) == 0
            if eng.state.phase != Phase.DATA_MIGRATION or eng.state.backfill_complete:
                async def diff() -> list[object]:
                    samples: list[object] = []
                    assert eng.stores.secondary is not None
                    async for report in verify(eng.stores.primary, eng.stores.secondary, only=phases.moved(eng.state)):
                        samples = list(report.samples)
                    return samples

                differences = self.run(diff())
                assert differences == [], f"in {eng.state.phase.value}: {differences}"
                self.run(self._same_deletions())

    async def _same_deletions(self) -> None:
        """What Verify does not look at: deletions. Over the moved scopes, a key is live on both stores or on
        neither (a tombstone and no record at all are the same), and an entity's purge point, which decides which
        of its children may ever come back, is the same on both."""
        eng = self.eng
        assert eng.stores.secondary is not None
        moved = phases.moved(eng.state)

        async def held(store: Backend) -> dict[Any, tuple[bool, int]]:
            out: dict[Any, tuple[bool, int]] = {}
            after = None
            while True:
                page = await store.export_page(after, 500, vectors=False)
                for r in page.records:
                    if moved(r.scope):
                        out[r.key] = (not r.deleted, getattr(r, "purged", 0))
                if page.next_after is None:
                    return out
                after = page.next_after

        mine, theirs = await held(eng.stores.primary), await held(eng.stores.secondary)
        for key in mine.keys() | theirs.keys():
            a, b = mine.get(key, (False, 0)), theirs.get(key, (False, 0))
            assert a == b, f"{key}: primary {a}, secondary {b} (live, purge point)"

    @invariant()
    def every_scope_has_one_store_and_it_holds_what_was_acknowledged(self) -> None:
        if self.engine is None:
            return
        for scope in SCOPES:  # a scope being moved is decided by the migration's primary, in every stage
            if self.eng.stores.secondary is not None and phases.moves(self.eng.state, scope):
                assert self.eng.stores.store_for(scope) is self.eng.stores.primary

        async def graph() -> tuple[dict[tuple[str, str], tuple[str, set[str]]], set[tuple[str, str, str, str]]]:
            ents: dict[tuple[str, str], tuple[str, set[str]]] = {}
            rels: set[tuple[str, str, str, str]] = set()
            for scope in SCOPES:
                page = await self.eng.stores.store_for(scope).read_graph(scope, None, 1000)
                ents.update({(scope, e.name): (e.entity_type, set(e.observations)) for e in page.entities})
                rels.update((scope, r.source, r.relation_type, r.target) for r in page.relations)
            return ents, rels

        ents, rels = self.run(graph())
        assert ents == self.model.entities
        assert rels == self.model.relations


MigrationMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_migration_invariant = MigrationMachine.TestCase


@pytest.mark.slow
class TestMigrationInvariantLong(MigrationMachine.TestCase):  # type: ignore[name-defined,misc]
    settings = settings(max_examples=2000, stateful_step_count=60, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])


@contextlib.asynccontextmanager
async def faulty_primary_engine(tmp_path: Path) -> AsyncIterator[tuple[MigrationEngine, Faults, str]]:
    """An engine driven step by step (no background work) whose primary, an embedded store, is wrapped in the fault
    injector; yields it, the faults and the spec of the store to migrate to."""
    a, b = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    primary_faults = Faults()

    async def open_store(spec: str) -> Backend:
        store = backend_for(spec, shared_embedder())
        await store.open()
        return FaultyStore(store, primary_faults) if spec == a else store  # type: ignore[return-value]

    control = SqliteControlStore(tmp_path / "control.db", initial_primary=a)
    engine = MigrationEngine(control, open_store, HybridClock(3), background=False)
    await engine.start()
    try:
        yield engine, primary_faults, b
    finally:
        await engine.stop()
        await control.close()


async def test_a_repair_never_copies_the_primary_from_before_a_write_over_the_secondary_from_after_it(
        tmp_path: Path) -> None:
    """A dual write lands on the secondary first and on the primary later (here the primary is held). A repair of
    the same key running in between must not copy the primary's older record over the secondary's newer one: the
    write's two halves agree, so nothing would queue the key again, and the stores would differ for good."""
    async with faulty_primary_engine(tmp_path) as (engine, primary_faults, b):
        await engine.start_migration(b, MigrationOptions(), "test")
        await engine.backfill.run()  # the production loop, to the end of the copy
        await engine.writer.write(ops.CreateEntities("s", [Entity("alice", "person", ("likes tea",))]))
        key = (Kind.ENTITY, "s", ("alice",))
        await engine.repairs.enqueue([key])  # a repair of alice is due (as after any refused write)
        primary_faults.mode = "stall"
        deleting = asyncio.ensure_future(engine.writer.write(ops.DeleteEntities("s", ["alice"])))
        secondary = engine.stores.secondary
        assert secondary is not None
        while not (await secondary.get_records([key]))[0].deleted:  # noqa: ASYNC110 - the secondary has the delete ...
            await asyncio.sleep(0.005)
        repairing = asyncio.ensure_future(engine.repairs.repair_once())  # ... the primary does not yet
        await asyncio.sleep(0.05)
        primary_faults.mode = "ok"
        primary_faults.gate.set()
        await deleting
        await repairing
        assert await engine.repairs.drain() == 0
        assert await engine.stores.primary.get_records([key]) == await secondary.get_records([key])
        assert (await secondary.get_records([key]))[0].deleted


async def test_a_write_waits_while_a_repair_holds_its_scope_and_a_write_elsewhere_does_not(tmp_path: Path) -> None:
    """A repair compares both stores and replaces what differs, expecting each key at the version it read. A write
    to the same scope meanwhile would move keys under it, so writes to a scope being repaired wait at the gate
    until the repair is done; writes to every other scope go straight through."""
    async with faulty_primary_engine(tmp_path) as (engine, primary_faults, b):
        alice, bob = (Kind.ENTITY, "s", ("alice",)), (Kind.ENTITY, "t", ("bob",))
        await engine.writer.write(ops.CreateEntities("s", [Entity("alice", "person", ())]))
        await engine.writer.write(ops.CreateEntities("t", [Entity("bob", "person", ())]))
        await engine.start_migration(b, MigrationOptions(), "test")
        await engine.backfill.run()  # the production loop, to the end of the copy
        secondary = engine.stores.secondary
        assert secondary is not None
        await engine.repairs.enqueue([alice])
        primary_faults.held = frozenset({"get_records"})  # the repair reads the primary first, and is held there
        repairing = asyncio.ensure_future(engine.repairs.repair_once())
        await until(lambda: primary_faults.holding == 1)  # the repair is held, reading the primary
        assert not repairing.done()
        writing = asyncio.ensure_future(
            engine.writer.write(ops.AddObservations("s", [ObservationAddition("alice", ("likes tea",))])))
        elsewhere = await asyncio.wait_for(
            engine.writer.write(ops.AddObservations("t", [ObservationAddition("bob", ("plays chess",))])), 10)
        assert elsewhere.answer == (ObservationAddition("bob", ("plays chess",)),)
        await until(lambda: engine.gate.writes_held == 1)  # the write to the repaired scope waits at the gate
        assert not writing.done()
        for store in (engine.stores.primary, secondary):  # held before touching either store
            assert (await store.open_nodes("s", ["alice"])).entities[0].observations == ()
        primary_faults.held = frozenset()
        primary_faults.gate.set()
        assert await asyncio.wait_for(repairing, 10) == 1
        await asyncio.wait_for(writing, 10)
        assert await engine.repairs.drain() == 0
        for store in (engine.stores.primary, secondary):
            assert (await store.open_nodes("s", ["alice"])).entities[0].observations == ("likes tea",)
        assert await engine.stores.primary.get_records([alice, bob]) == await secondary.get_records([alice, bob])


@pytest.mark.parametrize("queued_first", ["relation", "entity"])
async def test_a_repair_restores_a_relation_the_secondary_purged_under_a_delete_the_primary_refused(
        tmp_path: Path, queued_first: str) -> None:
    """The primary refuses a relation's delete and then its endpoint's delete; the secondary applied both (so its
    entity tombstone purges the relation). Repairing must give the secondary the primary's relation back, whichever
    key is repaired first: a relation fixed while the secondary still holds the entity's tombstone would be refused
    by the purge, and the stores would differ for good (found by the long stateful run, where the secondary then
    became the primary and an acknowledged relation was gone)."""
    async with faulty_primary_engine(tmp_path) as (engine, primary_faults, b):
        await engine.writer.write(ops.CreateEntities("s", [Entity("alice", "person", ()), Entity("bob", "person", ())]))
        await engine.writer.write(ops.CreateRelations("s", [Relation("bob", "alice", "knows")]))
        await engine.start_migration(b, MigrationOptions(), "test")
        await engine.backfill.run()  # the production loop, to the end of the copy
        primary_faults.mode = "fail"
        refused = [ops.DeleteRelations("s", [Relation("bob", "alice", "knows")]), ops.DeleteEntities("s", ["alice"])]
        for op in refused if queued_first == "relation" else refused[::-1]:
            with pytest.raises(StoreUnavailable):
                await engine.writer.write(op)
        primary_faults.mode = "ok"
        secondary = engine.stores.secondary
        assert secondary is not None
        assert (await secondary.read_graph("s", None, 100)).relations == ()  # the secondary applied both deletes
        assert await engine.repairs.drain() == 0
        graph = await engine.stores.primary.read_graph("s", None, 100)
        assert graph.relations == (Relation("bob", "alice", "knows"),)  # nothing was acknowledged: all still there
        assert await secondary.read_graph("s", None, 100) == graph
        assert [r async for r in verify(engine.stores.primary, secondary)][-1].differences == 0


class SlowSaves(SqliteControlStore):
    """The real control store whose state writes take a while, as a busy PostgreSQL's do."""

    async def save(self, state: Any, expected_revision: int, durable: bool = True) -> Any:
        await asyncio.sleep(0.1)
        return await super().save(state, expected_revision, durable)


async def test_a_change_cancelled_during_its_save_does_not_make_the_next_change_conflict(tmp_path: Path) -> None:
    """A backfill cancelled (a pause, a restart, a lost leadership) while its checkpoint is being written: the write
    still lands. The next change on this proxy must start from that revision; seen in the long stateful run as a
    rollback failing with `state is at revision 10, expected 9` against this proxy's own checkpoint."""
    a, b = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"

    async def open_store(spec: str) -> Backend:
        store = backend_for(spec, shared_embedder())
        await store.open()
        return store

    control = SlowSaves(tmp_path / "control.db", initial_primary=a)
    engine = MigrationEngine(control, open_store, HybridClock(3), background=False)
    await engine.start()
    try:
        await engine.start_migration(b, MigrationOptions(), "test")
        pausing = asyncio.ensure_future(engine.pause_backfill("test"))
        await asyncio.sleep(0.02)  # inside the save
        pausing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pausing
        await engine.rollback("operator", "test")  # raised Conflict before the cancelled save was waited for
        assert (await control.load()).phase == Phase.ROLLED_BACK
        assert (await control.load()).paused  # the cancelled change landed, and the rollback kept it
    finally:
        await engine.stop()
        await control.close()
