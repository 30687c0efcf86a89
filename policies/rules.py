"""The rollback policy: rules over sliding windows, evaluated without I/O (docs/design.md, Shadow reads and rollback).

The proxy feeds `Observations` (shadow comparisons, secondary outcomes, latencies) and calls `evaluate` on a timer;
this module only decides. Three outcomes per rule, never two: a rule with fewer samples in its window than its
`min_samples` says NO_DATA, which neither passes nor fails it — a quiet night must not roll a migration back, and
must not let a ramp step through unexamined either (the complaint Argo Rollouts and Flagger users have about
missing data). A breach fires the rule's action only after `consecutive` breaching evaluations in a row; a NO_DATA
evaluation leaves the streak where it was.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class Metric(StrEnum):
    MISMATCH_RATE = "mismatch_rate"  # mismatching shadow comparisons / comparisons
    ERROR_RATE = "error_rate"  # failed secondary calls (shadow reads, served reads, dual-writes) / calls
    ADDED_P99_MS = "added_p99_ms"  # secondary p99 minus primary p99 over the same shadowed reads, milliseconds


class Action(StrEnum):
    ROLLBACK = "rollback"
    PAUSE = "pause"  # stop the read ramp and the backfill until an operator resumes
    ALERT = "alert"  # dry run: log, event and history only


class Verdict(StrEnum):
    PASS = "pass"
    BREACH = "breach"
    NO_DATA = "no-data"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    metric: Metric
    threshold: float  # breached when the metric is strictly above it
    window_seconds: float
    min_samples: int
    consecutive: int = 1
    action: Action = Action.ROLLBACK
    phases: frozenset[str] = frozenset()  # phases the rule applies in; empty = every phase with shadow reads


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    evaluate_every_seconds: float = 5.0

    def longest_window(self) -> float:
        return max((r.window_seconds for r in self.rules), default=0.0)


@dataclass(frozen=True, slots=True)
class RuleResult:
    rule: Rule
    verdict: Verdict
    value: float  # the metric over the window; NaN with NO_DATA
    samples: int
    streak: int  # consecutive breaches so far, this one included
    fired: bool  # the streak reached `consecutive`: the action is due

    def figures(self) -> dict[str, float | int | str]:
        return {"rule": self.rule.name, "metric": self.rule.metric.value, "value": round(self.value, 6),
                "threshold": self.rule.threshold, "samples": self.samples, "window_seconds": self.rule.window_seconds,
                "consecutive": self.streak}


class Observations:
    """Timestamped samples per metric, kept for the longest window (and at most `cap` each, oldest dropped)."""

    def __init__(self, keep_seconds: float, cap: int = 200_000) -> None:
        self.keep_seconds = keep_seconds
        self._compared: deque[tuple[float, bool]] = deque(maxlen=cap)  # (t, mismatch)
        self._secondary: deque[tuple[float, bool]] = deque(maxlen=cap)  # (t, error)
        self._latency: deque[tuple[float, float, float]] = deque(maxlen=cap)  # (t, primary s, secondary s)

    def comparison(self, t: float, mismatch: bool) -> None:
        self._compared.append((t, mismatch))

    def secondary_call(self, t: float, error: bool) -> None:
        self._secondary.append((t, error))

    def latency_pair(self, t: float, primary_seconds: float, secondary_seconds: float) -> None:
        self._latency.append((t, primary_seconds, secondary_seconds))

    def clear(self) -> None:
        for q in (self._compared, self._secondary, self._latency):
            q.clear()

    def prune(self, now: float) -> None:
        horizon = now - self.keep_seconds
        for q in (self._compared, self._secondary, self._latency):
            while q and q[0][0] < horizon:
                q.popleft()

    def measure(self, metric: Metric, since: float) -> tuple[float, int]:
        """(value, samples) of a metric over samples taken at or after `since`."""
        if metric is Metric.ADDED_P99_MS:
            pairs = [(p, s) for t, p, s in self._latency if t >= since]
            if not pairs:
                return float("nan"), 0
            arr = np.asarray(pairs)
            added = float(np.percentile(arr[:, 1], 99) - np.percentile(arr[:, 0], 99)) * 1000.0
            return added, len(pairs)
        source = self._compared if metric is Metric.MISMATCH_RATE else self._secondary
        flags = [bad for t, bad in source if t >= since]
        if not flags:
            return float("nan"), 0
        return sum(flags) / len(flags), len(flags)


def evaluate(policy: Policy, observations: Observations, now: float, phase: str,
             streaks: Mapping[str, int]) -> list[RuleResult]:
    """Every rule that applies in `phase`, judged over its window ending at `now`. `streaks` holds each rule's
    consecutive breaches from the previous evaluation (the caller keeps it, and resets a rule's after acting)."""
    out = []
    for rule in policy.rules:
        if rule.phases and phase not in rule.phases:
            continue
        value, samples = observations.measure(rule.metric, now - rule.window_seconds)
        before = streaks.get(rule.name, 0)
        if samples < rule.min_samples:
            verdict, streak = Verdict.NO_DATA, before
        elif value > rule.threshold:
            verdict, streak = Verdict.BREACH, before + 1
        else:
            verdict, streak = Verdict.PASS, 0
        out.append(RuleResult(rule, verdict, value, samples, streak,
                              fired=verdict is Verdict.BREACH and streak >= rule.consecutive))
    return out


def streaks_after(results: Iterable[RuleResult]) -> dict[str, int]:
    """The streaks to pass to the next evaluation: a fired rule starts over."""
    return {r.rule.name: 0 if r.fired else r.streak for r in results}


def most_severe(results: Iterable[RuleResult]) -> RuleResult | None:
    """The fired rule whose action is the strongest (rollback > pause > alert), or None."""
    order = {Action.ROLLBACK: 0, Action.PAUSE: 1, Action.ALERT: 2}
    fired = [r for r in results if r.fired]
    return min(fired, key=lambda r: order[r.rule.action]) if fired else None
