"""The migration's stages and the one table of what an operator (or the policy) may do in each. Every phase change and
every step that depends on the phase asks `check`; error messages list what the table allows; whether the new store
is being written is `writes_secondary`, here alone. Pure: no I/O.

A stage is the persisted phase with Completed split in two by its rollback window: right after cutover the old store
is still written (the state's `secondary` is set) and a rollback is still possible; once the window closes, it is a
plain Completed from which the next migration may start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from enum import StrEnum
from typing import Any

from adapters.errors import IllegalTransition
from proxy.engine.control import MigrationState, Phase
from proxy.engine.placement import Moved
from proxy.engine.placement import moves as placement_moves


class Stage(StrEnum):
    NOT_STARTED = "NotStarted"
    DATA_MIGRATION = "DataMigration"
    DUAL_WRITE = "DualWrite"
    WINDOW = "Completed, rollback window open"
    COMPLETED = "Completed"
    ROLLED_BACK = "RolledBack"


class Step(StrEnum):
    """What can be asked of a migration; the value is how an error message says it."""

    START = "start a migration"
    ADVANCE = "advance"
    ROLLBACK = "roll back"
    PAUSE = "pause the backfill"
    RESUME = "resume the backfill"
    ROUTE_READS = "serve reads from the new store"
    RAMP = "ramp reads onto the new store"


# (stage, step) -> the stage it leads to. Absent: not allowed. Steps that keep the stage are listed too, so that
# "what can I do now" has one answer.
TABLE: Mapping[tuple[Stage, Step], Stage] = {
    (Stage.NOT_STARTED, Step.START): Stage.DATA_MIGRATION,
    (Stage.DATA_MIGRATION, Step.PAUSE): Stage.DATA_MIGRATION,
    (Stage.DATA_MIGRATION, Step.RESUME): Stage.DATA_MIGRATION,
    (Stage.DATA_MIGRATION, Step.ADVANCE): Stage.DUAL_WRITE,  # once the backfill is complete
    (Stage.DATA_MIGRATION, Step.ROLLBACK): Stage.ROLLED_BACK,
    (Stage.DUAL_WRITE, Step.ROUTE_READS): Stage.DUAL_WRITE,
    (Stage.DUAL_WRITE, Step.RAMP): Stage.DUAL_WRITE,
    (Stage.DUAL_WRITE, Step.ADVANCE): Stage.WINDOW,  # cutover, once no repair is pending
    (Stage.DUAL_WRITE, Step.ROLLBACK): Stage.ROLLED_BACK,
    (Stage.WINDOW, Step.ADVANCE): Stage.COMPLETED,  # closes the window early
    (Stage.WINDOW, Step.ROLLBACK): Stage.ROLLED_BACK,  # back to the old store, once it has every write
    (Stage.COMPLETED, Step.START): Stage.DATA_MIGRATION,
    (Stage.ROLLED_BACK, Step.START): Stage.DATA_MIGRATION,
}

_SECONDARY_WRITTEN = frozenset({Stage.DATA_MIGRATION, Stage.DUAL_WRITE, Stage.WINDOW})


# The phase a stage is saved as: the table writes it (`apply`), nothing else does.
PHASE_OF: Mapping[Stage, Phase] = {Stage.NOT_STARTED: Phase.NOT_STARTED, Stage.DATA_MIGRATION: Phase.DATA_MIGRATION,
                                   Stage.DUAL_WRITE: Phase.DUAL_WRITE, Stage.WINDOW: Phase.COMPLETED,
                                   Stage.COMPLETED: Phase.COMPLETED, Stage.ROLLED_BACK: Phase.ROLLED_BACK}


def stage(phase: Phase, secondary: str) -> Stage:
    if phase == Phase.COMPLETED:
        return Stage.WINDOW if secondary else Stage.COMPLETED
    return Stage(phase.value)


def writes_secondary(phase: Phase, secondary: str) -> bool:
    """Whether every write also goes to the other store (the new one, or the old one in the rollback window)."""
    return bool(secondary) and stage(phase, secondary) in _SECONDARY_WRITTEN


def allowed(at: Stage) -> list[Step]:
    return [step for (st, step) in TABLE if st == at]


def check(phase: Phase, secondary: str, step: Step, shown: str = "") -> Stage:
    """The stage `step` leads to from here, or IllegalTransition saying where the migration is (`shown`: the phase
    as the caller would describe it, e.g. with when and why it was rolled back) and what it can do instead."""
    at = stage(phase, secondary)
    to = TABLE.get((at, step))
    if to is None:
        can = ", ".join(f"{s.value} (to {TABLE[(at, s)].value})" if TABLE[(at, s)] != at else s.value
                        for s in allowed(at))
        raise IllegalTransition(f"cannot {step.value}: the migration is in {shown or at.value}; from there it can: "
                                f"{can or 'nothing'}")
    return to


def apply(state: MigrationState, step: Step, shown: str = "", **changes: Any) -> MigrationState:
    """The state `step` leads to: the phase from the table, the other fields from `changes` (never `phase`). The
    result must be in the stage the table names (a cutover sets the old store as `secondary`, closing the window
    clears it); a step that would land elsewhere is a bug in the caller, not an operator's error."""
    if "phase" in changes:
        raise TypeError("the phase table writes the phase; pass the other fields only")
    to = check(state.phase, state.secondary, step, shown)
    new = replace(state, phase=PHASE_OF[to], **changes)
    landed = stage(new.phase, new.secondary)
    if landed != to:
        raise AssertionError(f"{step.value} from {stage(state.phase, state.secondary).value} must land in "
                             f"{to.value}, not {landed.value}")
    return new


# --- questions about a state, each answered here once ---------------------------------------------------------------
def backfilling(s: MigrationState) -> bool:
    """The backfill is still to run or running: DataMigration, with the copy not complete."""
    return s.phase == Phase.DATA_MIGRATION and not s.backfill_complete


def other_store_written(s: MigrationState) -> bool:
    """Writes of the moved scopes also go to the other store (the new one, or the old one in the rollback window)."""
    return writes_secondary(s.phase, s.secondary)


def stage_of(s: MigrationState) -> Stage:
    return stage(s.phase, s.secondary)


def in_window(s: MigrationState) -> bool:
    """Cut over, with the old store still written: a rollback is still possible."""
    return stage(s.phase, s.secondary) == Stage.WINDOW


def moves(s: MigrationState, scope: str) -> bool:
    """Whether a write to `scope` goes to both stores: the migration selected the scope, and the other store is
    still being written. Every other scope pays nothing for the migration."""
    return other_store_written(s) and placement_moves(s.start_placement, s.selection, s.source, scope)


def moved(s: MigrationState) -> Moved:
    """Which scopes the migration moves, fixed now (for a Verify that may outlive the rollback window)."""
    return Moved(s.start_placement, s.selection, s.source)
