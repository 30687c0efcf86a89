"""The rollback policy at work: evaluates `policies.rules` on a timer and applies what it decides.

Every `evaluate_every_seconds` while a migration has a secondary, the guard judges each rule over its window. The
most severe rule that fired acts — `rollback` rolls the migration back, `pause` stops the read ramp and the backfill,
`alert` only reports — and every rule that fired is recorded in the phase history with its figures, logged, and
emitted as an OpenTelemetry event. The read ramp steps from here too, only while the policy passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from adapters.errors import IllegalTransition
from policies.loader import PolicyFile
from policies.ramp import RampMove, RampSchedule, decide
from policies.rules import Action, Metric, Observations, RuleResult, Verdict, evaluate, most_severe, streaks_after
from proxy.engine.control import Phase
from proxy.engine.migration import MigrationEngine

log = logging.getLogger("memshift.policy")
ACTOR = "memshift-policy"


def describe(r: RuleResult) -> str:
    if r.rule.metric is Metric.ADDED_P99_MS:
        value, limit = f"{r.value:.4g}ms", f"{r.rule.threshold:g}ms"
    else:  # a rate
        value, limit = f"{r.value:.4%}", f"{r.rule.threshold:.4%}"
    return (f"rule {r.rule.name}: {r.rule.metric.value} {value} > {limit} over {r.rule.window_seconds:g}s "
            f"({r.samples} samples, {r.streak} evaluations in a row)")


class PolicyGuard:
    def __init__(self, engine: MigrationEngine, policy: PolicyFile, observations: Observations,
                 clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self.policy = policy
        self._observations = observations
        self._clock = clock
        self._streaks: dict[str, int] = {}
        # Rules whose alert or pause already fired in the current breach episode: recorded once, not every
        # `consecutive` evaluations, until the rule passes again.
        self._episode: set[str] = set()
        self._migration_id = engine.state.migration_id
        self.last: tuple[RuleResult, ...] = ()
        self.evaluations = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="policy")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.policy.policy.evaluate_every_seconds)
            try:
                await self.evaluate_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("policy evaluation failed")

    async def evaluate_once(self) -> list[RuleResult]:
        """One evaluation and whatever it decides; returns the rule results (also kept in `last`)."""
        engine = self._engine
        state = engine.state
        now = self._clock()
        self.evaluations += 1
        if state.migration_id != self._migration_id:  # a new migration starts with a clean slate
            self._migration_id = state.migration_id
            self._streaks.clear()
            self._episode.clear()
            self._observations.clear()
        if engine.stores.secondary is None or engine.outage.current is not None:
            # Nothing to judge, or an outage of the new store: that holds the migration (proxy.engine.outage); it is not
            # evidence against the store, and the ramp does not move while nothing reaches it.
            self.last = ()
            return []
        self._observations.prune(now)
        results = evaluate(self.policy.policy, self._observations, now, state.phase.value, self._streaks)
        self._streaks = streaks_after(results)
        self.last = tuple(results)
        self._episode -= {r.rule.name for r in results if r.verdict is Verdict.PASS}
        strongest = most_severe(results)
        for r in results:
            if r.fired and r is not strongest and r.rule.name not in self._episode:
                self._episode.add(r.rule.name)
                await self._report(r, Action.ALERT)  # a weaker rule that fired too is still on record
        if strongest is not None and (strongest.rule.action is Action.ROLLBACK
                                      or strongest.rule.name not in self._episode):
            if strongest.rule.action is not Action.ROLLBACK:
                self._episode.add(strongest.rule.name)
            await self._act(strongest)
        if engine.state.phase == Phase.DUAL_WRITE and engine.state.ramp_step >= 0:
            await self._ramp(results, now)
        return results

    async def _report(self, r: RuleResult, action: Action) -> None:
        reason = f"{action.value}: {describe(r)}"
        figures = {**r.figures(), "action": action.value}
        log.warning("policy rule fired", extra={"action": action.value, **r.figures()})
        self._engine.telemetry.policy_event(action.value, r.rule.name, r.figures())
        if action is Action.ALERT:
            await self._engine.keeper.note(ACTOR, reason, figures)

    async def _act(self, r: RuleResult) -> None:
        action = r.rule.action
        await self._report(r, action)
        figures = {**r.figures(), "action": action.value}
        if action is Action.ROLLBACK:
            try:
                await self._engine.rollback(describe(r), ACTOR, figures)
            except IllegalTransition as exc:  # e.g. writes still being copied back after cutover: try again
                log.error("policy rollback refused; retrying next evaluation", extra={"error": str(exc)})
                self._streaks[r.rule.name] = r.rule.consecutive - 1
        elif action is Action.PAUSE:
            await self._engine.policy_pause(describe(r), figures)

    async def _ramp(self, results: list[RuleResult], now: float) -> None:
        s = self._engine.state
        schedule = RampSchedule(s.ramp_steps, s.ramp_interval)
        decision = decide(schedule, s.ramp_step, s.ramp_step_started_at, now, results)
        if decision.move is RampMove.ADVANCE:
            log.info("read ramp step", extra={"fraction": decision.fraction, "reason": decision.reason})
            await self._engine.ramp_to(s.ramp_step + 1, decision.reason,
                                       {"read_fraction": decision.fraction, "step": s.ramp_step + 1})
        elif decision.move is RampMove.STOP:
            log.warning("read ramp stopped", extra={"reason": decision.reason})
            await self._engine.ramp_note(decision.reason, stop=True)
            await self._engine.keeper.note(ACTOR, f"read ramp stopped: {decision.reason}",
                                           {"read_fraction": s.read_fraction})
        elif decision.move is RampMove.DONE:
            await self._engine.ramp_note(decision.reason, stop=True)
            await self._engine.keeper.note(ACTOR, decision.reason, {"read_fraction": s.read_fraction})
        else:
            await self._engine.ramp_note(decision.reason)
