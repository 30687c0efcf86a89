"""Reads a policy file (YAML) into typed settings, with errors that name the file and the field to fix."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from adapters.errors import PolicyError
from policies.comparators import CompareSettings
from policies.numbers import problem
from policies.ramp import RampSchedule
from policies.rules import Action, Metric, Policy, Rule

PHASES = ("DataMigration", "DualWrite", "Completed")
DAY = 86_400.0
MAX_NUMBER = 1e12  # a bound for figures with no natural one (a latency threshold in ms): finite, never reached


@dataclass(frozen=True, slots=True)
class ShadowSettings:
    max_concurrency: int = 32
    timeout_seconds: float = 2.0


@dataclass(frozen=True, slots=True)
class PolicyFile:
    policy: Policy
    compare: CompareSettings
    shadow: ShadowSettings
    ramp: RampSchedule


class _Fields:
    """Typed access to one mapping of the file; every error says where."""

    def __init__(self, where: str, raw: Any, known: set[str]) -> None:
        if not isinstance(raw, Mapping):
            raise PolicyError(f"{where}: must be a mapping, got {type(raw).__name__}")
        if unknown := sorted(set(map(str, raw)) - known):
            raise PolicyError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        self.where, self.raw = where, raw

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def number(self, key: str, default: float | None = None, *, low: float = 0.0, high: float = MAX_NUMBER,
               above_low: bool = False) -> float:
        value = self.raw.get(key, default)
        if value is None:
            raise PolicyError(f"{self._path(key)}: is required")
        if (why := problem(value, low, high, above_low=above_low)) is not None:
            raise PolicyError(f"{self._path(key)}: {why}")
        return float(value)

    def integer(self, key: str, default: int | None = None, *, low: int = 0, high: int = 1_000_000_000) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(f"{self._path(key)}: must be a whole number, got {value!r}")
        if not low <= value <= high:
            raise PolicyError(f"{self._path(key)}: is {value}, must be in [{low}, {high}]")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str | None = None) -> str:
        value = self.raw.get(key, default)
        if value not in options:
            raise PolicyError(f"{self._path(key)}: is {value!r}, must be one of: {', '.join(options)}")
        return str(value)

    def strings(self, key: str) -> list[str]:
        value = self.raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise PolicyError(f"{self._path(key)}: must be a list of non-empty strings")
        return value

    def sub(self, key: str, known: set[str]) -> _Fields:
        return _Fields(self._path(key), self.raw.get(key, {}), known)


def _rule(f: _Fields) -> Rule:
    name = f.raw.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{f.where}.name: must be a non-empty string")
    metric = Metric(f.choice("metric", tuple(m.value for m in Metric)))
    high = 1.0 if metric is not Metric.ADDED_P99_MS else MAX_NUMBER
    phases = f.strings("phases")
    for i, p in enumerate(phases):
        if p not in PHASES:
            raise PolicyError(f"{f.where}.phases[{i}]: is {p!r}, must be one of: {', '.join(PHASES)}")
    return Rule(name=name, metric=metric, threshold=f.number("threshold", high=high),
                window_seconds=f.number("window_seconds", low=0.0, high=DAY, above_low=True),
                min_samples=f.integer("min_samples", low=1), consecutive=f.integer("consecutive", 1, low=1),
                action=Action(f.choice("action", tuple(a.value for a in Action))), phases=frozenset(phases))


def parse(raw: Any, where: str = "policy") -> PolicyFile:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: must be a mapping of settings at the top, got {type(raw).__name__}")
    try:
        top = _Fields("", raw, {"evaluate_every_seconds", "shadow", "compare", "ramp", "rules"})
        shadow_f = top.sub("shadow", {"max_concurrency", "timeout_seconds"})
        shadow = ShadowSettings(shadow_f.integer("max_concurrency", 32, low=1, high=10_000),
                                shadow_f.number("timeout_seconds", 2.0, high=600.0, above_low=True))
        c = top.sub("compare", {"noise_fields", "search_top_k", "search_min_overlap", "search_min_rank_agreement",
                                "search_tie_epsilon"})
        compare = CompareSettings(frozenset(c.strings("noise_fields")), c.integer("search_top_k", 10, low=1),
                                  c.number("search_min_overlap", 0.8, high=1.0),
                                  c.number("search_min_rank_agreement", 0.8, high=1.0),
                                  c.number("search_tie_epsilon", 1e-3, high=2.0))
        r = top.sub("ramp", {"steps", "interval_seconds"})
        ramp = ramp_schedule(r.raw.get("steps", [0.01, 0.05, 0.25, 0.5, 1.0]),
                             r.number("interval_seconds", 300.0, high=DAY, above_low=True), f"{r.where}.steps")
        rules_raw = top.raw.get("rules")
        if not isinstance(rules_raw, list) or not rules_raw:
            raise PolicyError("rules: must be a non-empty list")
        known = {"name", "metric", "threshold", "window_seconds", "min_samples", "consecutive", "action", "phases"}
        rules = tuple(_rule(_Fields(f"rules[{i}]", item, known)) for i, item in enumerate(rules_raw))
        names = [rule.name for rule in rules]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise PolicyError(f"rules: the name {dupes[0]!r} is used twice")
        policy = Policy(rules, top.number("evaluate_every_seconds", 5.0, high=3600.0, above_low=True))
    except PolicyError as exc:
        raise PolicyError(f"{where}: {exc}") from None
    return PolicyFile(policy, compare, shadow, ramp)


def ramp_schedule(steps: Any, interval_seconds: float, where: str = "ramp.steps") -> RampSchedule:
    if not isinstance(steps, list | tuple) or not steps:
        raise PolicyError(f"{where}: must be a non-empty list of fractions")
    if (why := problem(interval_seconds, 0.0, DAY, above_low=True)) is not None:
        raise PolicyError(f"interval_seconds: {why}")
    out: list[float] = []
    for i, s in enumerate(steps):
        if problem(s, 0.0, 1.0, above_low=True) is not None:
            raise PolicyError(f"{where}[{i}]: is {s!r}, must be a fraction in (0, 1]")
        if out and s <= out[-1]:
            raise PolicyError(f"{where}[{i}]: is {s}, steps must rise ({out[-1]} before it)")
        out.append(float(s))
    return RampSchedule(tuple(out), interval_seconds)


def load(path: str | Path | None = None) -> PolicyFile:
    """The policy at `path`, or the packaged default."""
    if path is None:
        text = resources.files("policies").joinpath("default.yaml").read_text(encoding="utf-8")
        return parse(yaml.safe_load(text), "policies/default.yaml")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
    return parse(raw, str(path))
