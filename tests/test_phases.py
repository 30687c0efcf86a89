"""One table of what a migration may do in each stage (`proxy.engine.phases`), and an engine that consults it: every
step the table refuses is refused over the admin API with FAILED_PRECONDITION naming what the table allows instead,
and every step it allows leads where the table says."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.base import Backend
from adapters.embedder import BatchingEmbedder
from adapters.errors import Conflict, IllegalTransition
from memshift.v1 import admin_pb2 as apb
from proxy.engine.backends import backend_for
from proxy.engine.clock import HybridClock
from proxy.engine.control import MigrationOptions, MigrationState, Phase, SqliteControlStore
from proxy.engine.migration import MigrationEngine
from proxy.engine.phases import TABLE, Stage, Step, allowed, apply, check, stage, writes_secondary
from tests.cluster import AUTH, Cluster, seed, status, wait_for


@given(phase=st.sampled_from(Phase), secondary=st.sampled_from(["", "sqlite:///new.db"]),
       step=st.sampled_from(Step))
def test_check_follows_the_table_and_names_what_is_allowed(phase: Phase, secondary: str, step: Step) -> None:
    at = stage(phase, secondary)
    assert at.value.startswith(phase.value)  # a stage is its phase, Completed told apart by the window
    if (at, step) in TABLE:
        assert check(phase, secondary, step) == TABLE[(at, step)]
    else:
        with pytest.raises(IllegalTransition) as refused:
            check(phase, secondary, step, shown=f"{phase.value} (as shown)")
        message = str(refused.value)
        assert message.startswith(f"cannot {step.value}: the migration is in {phase.value} (as shown)")
        assert all(s.value in message for s in allowed(at))
    assert writes_secondary(phase, secondary) == (bool(secondary) and at in (
        Stage.DATA_MIGRATION, Stage.DUAL_WRITE, Stage.WINDOW))


# The legal paths, written out here from docs/design.md's phase table and docs/migration.md, not read from the code:
# the table in proxy.engine.phases must say exactly this.
LEGAL = {
    ("NotStarted", "start a migration"): "DataMigration",
    ("DataMigration", "pause the backfill"): "DataMigration",
    ("DataMigration", "resume the backfill"): "DataMigration",
    ("DataMigration", "advance"): "DualWrite",
    ("DataMigration", "roll back"): "RolledBack",
    ("DualWrite", "serve reads from the new store"): "DualWrite",
    ("DualWrite", "ramp reads onto the new store"): "DualWrite",
    ("DualWrite", "advance"): "Completed, rollback window open",
    ("DualWrite", "roll back"): "RolledBack",
    ("Completed, rollback window open", "advance"): "Completed",
    ("Completed, rollback window open", "roll back"): "RolledBack",
    ("Completed", "start a migration"): "DataMigration",
    ("RolledBack", "start a migration"): "DataMigration",
}


def test_the_table_allows_exactly_the_legal_paths() -> None:
    assert {(at.value, step.value): to.value for (at, step), to in TABLE.items()} == LEGAL


@given(phase=st.sampled_from(Phase), secondary=st.sampled_from(["", "sqlite:///new.db"]),
       step=st.sampled_from(Step))
def test_a_step_lands_where_the_table_says_and_only_the_table_writes_the_phase(
        phase: Phase, secondary: str, step: Step) -> None:
    state = MigrationState(phase=phase, secondary=secondary)
    at = stage(phase, secondary)
    with pytest.raises(TypeError, match="the phase table writes the phase"):
        apply(state, step, phase=Phase.DUAL_WRITE)
    if (at.value, step.value) not in LEGAL:
        with pytest.raises(IllegalTransition):
            apply(state, step)
        return
    wanted = LEGAL[(at.value, step.value)]
    # The fields a step sets besides the phase decide which side of the window it lands on.
    changes = {"secondary": "" if wanted == "Completed" else (secondary or "sqlite:///new.db")}
    new = apply(state, step, **changes)
    assert stage(new.phase, new.secondary).value == wanted
    if wanted == "Completed, rollback window open":
        with pytest.raises(AssertionError, match="must land in"):  # a cutover that forgot the old store
            apply(state, step, secondary="")


def test_every_stage_has_a_way_on() -> None:
    """No stage is a dead end, and every stage but the first is reached by some step."""
    for at in Stage:
        assert allowed(at), at
    reached = set(TABLE.values())
    assert reached == set(Stage) - {Stage.NOT_STARTED}


PHASE_OF = {apb.NOT_STARTED: Phase.NOT_STARTED, apb.DATA_MIGRATION: Phase.DATA_MIGRATION,
            apb.DUAL_WRITE: Phase.DUAL_WRITE, apb.COMPLETED: Phase.COMPLETED, apb.ROLLED_BACK: Phase.ROLLED_BACK}


def _steps(c: Cluster, phase: int) -> dict[Step, Callable[[], Awaitable[Any]]]:
    """Each step as an operator asks for it over the admin API."""
    a = c.admin
    return {
        Step.START: lambda: a.StartMigration(apb.StartMigrationRequest(target=c.target), metadata=AUTH),
        Step.ADVANCE: lambda: a.Advance(apb.AdvanceRequest(expected_phase=phase), metadata=AUTH),  # type: ignore[arg-type]
        Step.ROLLBACK: lambda: a.Rollback(apb.RollbackRequest(reason="trying"), metadata=AUTH),
        Step.PAUSE: lambda: a.PauseBackfill(apb.PauseBackfillRequest(reason="trying"), metadata=AUTH),
        Step.RESUME: lambda: a.ResumeBackfill(apb.ResumeBackfillRequest(), metadata=AUTH),
        Step.ROUTE_READS: lambda: a.SetReadRouting(apb.SetReadRoutingRequest(read_fraction=0.5), metadata=AUTH),
        Step.RAMP: lambda: a.SetReadRouting(apb.SetReadRoutingRequest(ramp=True, ramp_steps=[0.5, 1.0],
                                                                      ramp_interval_seconds=3600), metadata=AUTH),
    }


async def _refuses_what_the_table_refuses(c: Cluster) -> Stage:
    st_ = await status(c)
    secondary = st_.secondary
    at = stage(PHASE_OF[st_.phase], secondary)
    for step, ask in _steps(c, st_.phase).items():
        if (at, step) in TABLE:
            continue
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ask()
        details = refused.value.details() or ""
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (at, step, details)
        assert all(s.value in details for s in allowed(at)), (at, step, details)
        after = await status(c)
        assert (after.phase, after.secondary) == (st_.phase, secondary)  # refused: nothing changed
    return at


async def test_the_engine_refuses_every_step_the_table_refuses(cluster: Cluster) -> None:
    """Walked through every stage a migration passes, with each illegal step tried at each."""
    c = cluster
    await seed(c, 60)
    assert await _refuses_what_the_table_refuses(c) == Stage.NOT_STARTED
    await c.admin.StartMigration(apb.StartMigrationRequest(target=c.target, rate_limit=5), metadata=AUTH)
    assert await _refuses_what_the_table_refuses(c) == Stage.DATA_MIGRATION
    await c.admin.Rollback(apb.RollbackRequest(reason="again, faster"), metadata=AUTH)
    assert await _refuses_what_the_table_refuses(c) == Stage.ROLLED_BACK
    await c.admin.StartMigration(apb.StartMigrationRequest(target=c.target), metadata=AUTH)
    await wait_for(c, lambda s: s.backfill.complete)
    await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
    assert await _refuses_what_the_table_refuses(c) == Stage.DUAL_WRITE
    await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DUAL_WRITE), metadata=AUTH)
    assert await _refuses_what_the_table_refuses(c) == Stage.WINDOW
    await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.COMPLETED), metadata=AUTH)
    assert await _refuses_what_the_table_refuses(c) == Stage.COMPLETED


class RacingControl:
    """The real control store; when armed, "another proxy" saves `race(state)` just before this proxy's next save,
    as a backfill checkpoint or a phase change of another proxy would land between a read and a write."""

    def __init__(self, inner: SqliteControlStore) -> None:
        self.inner = inner
        self.race: Callable[[MigrationState], MigrationState] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def save(self, state: MigrationState, expected_revision: int, durable: bool = True) -> MigrationState:
        if self.race is not None:
            race, self.race = self.race, None
            current = await self.inner.load()
            await self.inner.save(race(current), current.revision)
        return await self.inner.save(state, expected_revision, durable)


async def test_an_operators_step_survives_a_checkpoint_landing_first_but_not_a_phase_change(
        embedder: BatchingEmbedder, tmp_path: Path) -> None:
    """A rollback asked while another proxy's backfill checkpoint lands first is still taken (the migration is where
    the operator saw it); one overtaken by another proxy's phase change is a Conflict (ABORTED), not a guess."""
    async def open_store(spec: str) -> Backend:
        store = backend_for(spec, embedder)
        await store.open()
        return store

    a, b = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    control = RacingControl(SqliteControlStore(tmp_path / "control.db", initial_primary=a))
    engine = MigrationEngine(control, open_store, HybridClock(1), background=False)  # type: ignore[arg-type]
    await engine.start()
    try:
        await engine.start_migration(b, MigrationOptions(), "test")
        control.race = lambda s: replace(s, backfill_done=s.backfill_done + 1)  # a checkpoint
        await engine.rollback("operator's call", "test")
        assert engine.state.phase == Phase.ROLLED_BACK and (await control.load()).phase == Phase.ROLLED_BACK

        await engine.start_migration(b, MigrationOptions(), "test")
        control.race = lambda s: replace(s, phase=Phase.ROLLED_BACK)  # another proxy's rollback
        with pytest.raises(Conflict):
            await engine.rollback("operator's call", "test")
    finally:
        await engine.stop()
