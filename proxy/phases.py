"""The migration's stages and the one table of what an operator (or the policy) may do in each. Every phase change and
every step that depends on the phase asks `check`; error messages list what the table allows; whether the new store
is being written is `writes_secondary`, here alone. Pure: no I/O.

A stage is the persisted phase with Completed split in two by its rollback window: right after cutover the old store
is still written (the state's `secondary` is set) and a rollback is still possible; once the window closes, it is a
plain Completed from which the next migration may start.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from proxy.control import Phase
from proxy.errors import IllegalTransition


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
