"""The read ramp: which fraction of reads the secondary serves, stepping up only while the policy passes.

A step is taken when its analysis interval has elapsed and every rule that can act (rollback or pause; alert rules
are a dry run) has enough samples and passes. A rule without enough samples holds the ramp: missing data is never
a pass. A breach stops the ramp (the policy's own action decides what else happens).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from policies.rules import Action, RuleResult, Verdict


@dataclass(frozen=True, slots=True)
class RampSchedule:
    steps: tuple[float, ...]  # read fractions, ascending, each in (0, 1]
    interval_seconds: float


class RampMove(StrEnum):
    HOLD = "hold"
    ADVANCE = "advance"
    STOP = "stop"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class RampDecision:
    move: RampMove
    fraction: float  # the fraction to serve after this decision
    reason: str


def decide(schedule: RampSchedule, step: int, step_started_at: float, now: float,
           results: list[RuleResult]) -> RampDecision:
    """`step` is the index of the step being served (its fraction is live since `step_started_at`)."""
    current = schedule.steps[step]
    blocking = [r for r in results if r.rule.action is not Action.ALERT]
    if breached := [r for r in blocking if r.verdict is Verdict.BREACH]:
        names = ", ".join(r.rule.name for r in breached)
        return RampDecision(RampMove.STOP, current, f"policy breached ({names}) at {current:.0%}")
    if step == len(schedule.steps) - 1:
        return RampDecision(RampMove.DONE, current, f"ramp complete at {current:.0%}")
    if now - step_started_at < schedule.interval_seconds:
        left = schedule.interval_seconds - (now - step_started_at)
        return RampDecision(RampMove.HOLD, current, f"analysing {current:.0%} for {left:.0f}s more")
    if waiting := [r for r in blocking if r.verdict is Verdict.NO_DATA]:
        detail = ", ".join(f"{r.rule.name} {r.samples}/{r.rule.min_samples}" for r in waiting)
        return RampDecision(RampMove.HOLD, current, f"not enough samples to judge {current:.0%}: {detail}")
    if not blocking:
        return RampDecision(RampMove.HOLD, current, "no rule can judge this phase; step up by hand")
    nxt = schedule.steps[step + 1]
    return RampDecision(RampMove.ADVANCE, nxt, f"{current:.0%} passed the policy; serving {nxt:.0%}")
