"""One table of what a migration may do in each stage (`proxy.phases`), and an engine that consults it: every step the
table refuses is refused over the admin API with FAILED_PRECONDITION naming what the table allows instead, and every
step it allows leads where the table says."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memshift.v1 import admin_pb2 as apb
from proxy.control import Phase
from proxy.errors import IllegalTransition
from proxy.phases import TABLE, Stage, Step, allowed, check, stage, writes_secondary
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
