"""The pure decisions in policies/: comparators, rules over windows, the ramp, the policy file loader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.errors import PolicyError
from adapters.model import Entity, Graph, GraphPage, Relation, ScoredEntity, SearchResult
from policies.comparators import CompareSettings, compare_graph, compare_page, compare_search
from policies.loader import load, parse
from policies.pacing import (
    FLOOR,
    MIN_BUSY,
    MIN_QUIET,
    PAUSE_MAX,
    PAUSE_STEP,
    REST_PER_WORK,
    PageTiming,
    Strain,
    next_page_size,
    next_pause,
)
from policies.ramp import RampMove, RampSchedule, decide
from policies.rules import Action, Metric, Observations, Policy, Rule, Verdict, evaluate, most_severe, streaks_after
from proxy.routing.shadow import sampled

names = st.text(alphabet="abcdef", min_size=1, max_size=4)
entities = st.builds(Entity, name=names, entity_type=st.sampled_from(["person", "place"]),
                     observations=st.lists(st.text(alphabet="xyz ", max_size=6), max_size=3).map(tuple),
                     metadata=st.dictionaries(st.sampled_from(["updated_at", "source"]), st.text(max_size=3),
                                              max_size=2))
relations = st.builds(Relation, source=names, target=names, relation_type=st.sampled_from(["knows", "near"]))
graphs = st.builds(lambda es, rs: Graph(tuple({e.name: e for e in es}.values()),
                                        tuple({r.key: r for r in rs}.values())),
                   st.lists(entities, max_size=6), st.lists(relations, max_size=6))
NOISY = CompareSettings(noise_fields=frozenset({"metadata.updated_at"}))


@given(graphs, st.randoms())
def test_graph_reads_compare_as_sets(g: Graph, rnd: object) -> None:
    shuffled_e, shuffled_r = list(g.entities), list(g.relations)
    rnd.shuffle(shuffled_e)  # type: ignore[attr-defined]
    rnd.shuffle(shuffled_r)  # type: ignore[attr-defined]
    other = Graph(tuple(shuffled_e), tuple(shuffled_r))
    assert compare_graph(g, other, CompareSettings()).match


@given(graphs.filter(lambda g: bool(g.entities)), st.sampled_from(["drop", "observation", "type", "noise", "source"]))
def test_graph_compare_catches_real_changes_and_ignores_noise(g: Graph, change: str) -> None:
    first = g.entities[0]
    if change == "drop":
        altered = Graph(g.entities[1:], g.relations)
    elif change == "observation":
        altered = Graph((Entity(first.name, first.entity_type, (*first.observations, "tampered!"), first.metadata),
                         *g.entities[1:]), g.relations)
    elif change == "type":
        altered = Graph((Entity(first.name, "other", first.observations, first.metadata), *g.entities[1:]),
                        g.relations)
    else:
        key = "updated_at" if change == "noise" else "source"
        meta = {**first.metadata, key: "changed-value"}
        altered = Graph((Entity(first.name, first.entity_type, first.observations, meta), *g.entities[1:]),
                        g.relations)
    result = compare_graph(g, altered, NOISY)
    changed_noise_only = change == "noise"
    unchanged = change == "source" and first.metadata.get("source") == "changed-value"
    assert result.match == (changed_noise_only or unchanged), result.detail
    if not result.match:
        assert "only on the primary" in result.detail or "only on the secondary" in result.detail


def test_page_compare_ignores_tokens_but_not_whether_more_follow() -> None:
    e = (Entity("a", "t"),)
    assert compare_page(GraphPage(e, (), "tok-1"), GraphPage(e, (), "tok-other"), CompareSettings()).match
    result = compare_page(GraphPage(e, (), "tok"), GraphPage(e, (), None), CompareSettings())
    assert not result.match and "more pages" in result.detail


def _hits(*pairs: tuple[str, float]) -> SearchResult:
    return SearchResult(tuple(ScoredEntity(Entity(n, "t"), s) for n, s in pairs), ())


def test_search_compare_tolerates_near_ties_but_not_reordering_or_missing_hits() -> None:
    base = _hits(("a", 0.9), ("b", 0.8), ("c", 0.8000001), ("d", 0.5))
    assert compare_search(base, _hits(("a", 0.9), ("c", 0.8), ("b", 0.8), ("d", 0.5)), CompareSettings()).match
    reversed_ = compare_search(base, _hits(("d", 0.9), ("c", 0.8), ("b", 0.7), ("a", 0.5)), CompareSettings())
    assert not reversed_.match and "rank agreement" in reversed_.detail
    missing = compare_search(base, _hits(("a", 0.9), ("x", 0.8), ("y", 0.7), ("z", 0.5)), CompareSettings())
    assert not missing.match and "overlap 0.25" in missing.detail
    altered = SearchResult((ScoredEntity(Entity("a", "t", ("changed",)), 0.9), *base.results[1:]), ())
    result = compare_search(base, altered, CompareSettings())
    assert not result.match and "differ in content" in result.detail
    assert compare_search(_hits(), _hits(), CompareSettings()).match


@given(st.lists(st.tuples(names, st.floats(0, 1)), unique_by=lambda p: p[0], max_size=12))
def test_search_compare_is_reflexive(pairs: list[tuple[str, float]]) -> None:
    ranked = sorted(pairs, key=lambda p: -p[1])
    assert compare_search(_hits(*ranked), _hits(*ranked), CompareSettings()).match


def _rule(**kw: object) -> Rule:
    base: dict[str, object] = dict(name="r", metric=Metric.MISMATCH_RATE, threshold=0.1, window_seconds=10,
                                   min_samples=5, consecutive=2, action=Action.ROLLBACK)
    return Rule(**{**base, **kw})  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.lists(st.tuples(st.floats(0, 20), st.booleans()), max_size=40), st.integers(0, 3),
       st.integers(1, 10), st.integers(1, 3))
def test_rules_judge_only_with_enough_samples(samples: list[tuple[float, bool]], streak: int, min_samples: int,
                                              consecutive: int) -> None:
    obs = Observations(keep_seconds=100)
    for t, bad in sorted(samples):
        obs.comparison(t, bad)
    rule = _rule(min_samples=min_samples, consecutive=consecutive)
    [r] = evaluate(Policy((rule,)), obs, now=20, phase="DualWrite", streaks={"r": streak})
    in_window = [bad for t, bad in samples if t >= 10]
    assert r.samples == len(in_window)
    if len(in_window) < min_samples:  # no data: neither pass nor fail, and the streak is kept as it was
        assert r.verdict is Verdict.NO_DATA and r.streak == streak and not r.fired
    else:
        rate = sum(in_window) / len(in_window)
        assert math.isclose(r.value, rate)
        assert r.verdict is (Verdict.BREACH if rate > 0.1 else Verdict.PASS)
        assert r.streak == (streak + 1 if rate > 0.1 else 0)
        assert r.fired == (r.verdict is Verdict.BREACH and streak + 1 >= consecutive)
    assert streaks_after([r])["r"] == (0 if r.fired else r.streak)


def test_added_latency_is_secondary_p99_minus_primary_p99_in_ms() -> None:
    obs = Observations(keep_seconds=100)
    for i in range(100):
        obs.latency_pair(1.0, 0.010, 0.010 + (0.2 if i >= 95 else 0.0))
    [r] = evaluate(Policy((_rule(metric=Metric.ADDED_P99_MS, threshold=100, min_samples=50),)), obs, 2.0,
                   "DualWrite", {})
    assert r.verdict is Verdict.BREACH and 150 < r.value < 210


def test_rules_apply_only_in_their_phases_and_the_strongest_action_wins() -> None:
    obs = Observations(keep_seconds=100)
    for _ in range(10):
        obs.comparison(1.0, True)
        obs.secondary_call(1.0, True)
    rules = (_rule(name="m", phases=frozenset({"DualWrite"}), consecutive=1, action=Action.ALERT),
             _rule(name="e", metric=Metric.ERROR_RATE, consecutive=1, action=Action.PAUSE))
    during_backfill = evaluate(Policy(rules), obs, 2.0, "DataMigration", {})
    assert [r.rule.name for r in during_backfill] == ["e"]
    both = evaluate(Policy(rules), obs, 2.0, "DualWrite", {})
    strongest = most_severe(both)
    assert strongest is not None and strongest.rule.name == "e"


def _result(verdict: Verdict, action: Action = Action.ROLLBACK) -> object:
    from policies.rules import RuleResult
    return RuleResult(_rule(action=action), verdict, 0.0, 10, 0, False)


@given(st.integers(0, 3), st.floats(0, 100), st.lists(st.sampled_from(list(Verdict)), min_size=1, max_size=4),
       st.lists(st.sampled_from(list(Action)), min_size=4, max_size=4))
def test_ramp_steps_only_when_every_acting_rule_passes(step: int, elapsed: float, verdicts: list[Verdict],
                                                       actions: list[Action]) -> None:
    schedule = RampSchedule((0.01, 0.05, 0.25, 0.5, 1.0), interval_seconds=30)
    results = [_result(v, a) for v, a in zip(verdicts, actions, strict=False)]
    d = decide(schedule, step, 0.0, elapsed, results)  # type: ignore[arg-type]
    acting = [v for v, a in zip(verdicts, actions, strict=False) if a is not Action.ALERT]
    if d.move is RampMove.ADVANCE:
        assert acting and all(v is Verdict.PASS for v in acting) and elapsed >= 30
        assert d.fraction == schedule.steps[step + 1]
    if Verdict.BREACH in acting:
        assert d.move is RampMove.STOP
    if Verdict.NO_DATA in acting or elapsed < 30:
        assert d.move is not RampMove.ADVANCE


def test_sampling_is_deterministic_and_close_to_the_rate() -> None:
    keys = [f"q{i}" for i in range(20000)]
    picked = [k for k in keys if sampled("scope", k, 0.25, "shadow")]
    assert picked == [k for k in keys if sampled("scope", k, 0.25, "shadow")]
    assert 0.23 < len(picked) / len(keys) < 0.27
    assert not sampled("s", "q", 0.0, "x") and sampled("s", "q", 1.0, "x")


def test_default_policy_file_loads_with_the_documented_defaults() -> None:
    p = load()
    rules = {r.name: r for r in p.policy.rules}
    assert rules["mismatch-rate"].threshold == 0.001 and rules["secondary-error-rate"].threshold == 0.01
    assert rules["added-p99-latency"].threshold == 100 and rules["added-p99-latency"].action is Action.PAUSE
    assert p.ramp.steps == (0.01, 0.05, 0.25, 0.5, 1.0)


RULE = {"name": "m", "metric": "mismatch_rate", "threshold": 0.01, "window_seconds": 60, "min_samples": 10,
        "action": "rollback"}


@pytest.mark.parametrize(("raw", "message"), [
    ({"rules": [{**RULE, "metric": "vibes"}]}, "rules[0].metric: is 'vibes', must be one of"),
    ({"rules": [{**RULE, "threshold": -1}]}, "rules[0].threshold: is -1, must be in [0, 1]"),
    ({"rules": [{**RULE, "threshold": 2}]}, "rules[0].threshold: is 2, must be in [0, 1]"),
    ({"rules": [{**RULE, "threshold": float("nan")}]}, "rules[0].threshold: is nan, must be a finite number"),
    ({"rules": [{**RULE, "metric": "added_p99_ms", "threshold": float("inf")}]},
     "rules[0].threshold: is inf, must be a finite number"),
    ({"rules": [{**RULE, "window_seconds": float("inf")}]}, "rules[0].window_seconds: is inf, must be a finite"),
    ({"rules": [RULE], "evaluate_every_seconds": float("inf")}, "evaluate_every_seconds: is inf, must be a finite"),
    ({"rules": [RULE], "ramp": {"interval_seconds": float("nan")}}, "ramp.interval_seconds: is nan"),
    ({"rules": [RULE], "shadow": {"timeout_seconds": 1e308}}, "shadow.timeout_seconds: is 1e+308, must be in (0, 600]"),
    ({"rules": [{**RULE, "min_samples": 0}]}, "rules[0].min_samples: is 0, must be in [1, "),
    ({"rules": [{**RULE, "action": "panic"}]}, "rules[0].action: is 'panic'"),
    ({"rules": [{**RULE, "phases": ["Sometime"]}]}, "rules[0].phases[0]: is 'Sometime'"),
    ({"rules": [{**RULE, "windw_seconds": 5}]}, "rules[0]: unknown field 'windw_seconds'"),
    ({"rules": [RULE, RULE]}, "the name 'm' is used twice"),
    ({"rules": []}, "rules: must be a non-empty list"),
    ({"rules": [RULE], "ramp": {"steps": [0.5, 0.2]}}, "ramp.steps[1]: is 0.2, steps must rise"),
    ({"rules": [RULE], "shadow": {"max_concurrency": "many"}}, "shadow.max_concurrency: must be a whole number"),
    (["not", "a", "mapping"], "must be a mapping"),
])
def test_bad_policy_files_say_what_to_fix(raw: object, message: str) -> None:
    with pytest.raises(PolicyError, match=r"^my\.yaml: ") as err:
        parse(raw, "my.yaml")
    assert message in str(err.value)


def test_unreadable_or_invalid_yaml_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [unclosed")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load(bad)


# --- the backfill's page size (policies.pacing) -------------------------------------------------------------------

timings = st.builds(PageTiming, size=st.integers(1, 20_000), seconds=st.floats(0, 60, allow_nan=False),
                    target_seconds=st.floats(0.001, 1), ceiling=st.integers(1, 20_000))


@given(timings)
def test_a_page_size_stays_between_the_floor_and_the_operators_batch_size(t: PageTiming) -> None:
    size = next_page_size(t)
    assert min(FLOOR, t.ceiling) <= size <= t.ceiling


@given(timings)
def test_a_slow_page_never_makes_the_next_one_bigger_and_a_fast_one_never_smaller(t: PageTiming) -> None:
    """The locks a page holds are what agents wait for: a page over its time shrinks the next (down to the floor),
    one well under it grows the next (up to the ceiling), at most doubling."""
    size = min(max(next_page_size(t), 1), t.ceiling)
    current = min(t.size, t.ceiling)
    if t.seconds > t.target_seconds:
        assert size <= max(current, min(FLOOR, t.ceiling))
    if t.seconds * 2 < t.target_seconds:
        assert size >= min(current, t.ceiling)
    assert size <= max(2 * t.size, min(FLOOR, t.ceiling))


def test_page_size_converges_on_the_target_time_for_a_store_of_fixed_speed() -> None:
    """A store applying 4,000 records/s with a 25 ms target settles at about 100 records a page."""
    size = FLOOR
    for _ in range(20):
        size = next_page_size(PageTiming(size, size / 4000, 0.025, 500))
    assert 90 <= size <= 110


seconds = st.floats(0, 5, allow_nan=False)
strains = st.builds(Strain, quiet_p99=seconds, quiet_writes=st.integers(0, 2000), busy_p99=seconds,
                    busy_writes=st.integers(0, 500))


@given(st.floats(0, PAUSE_MAX), strains, st.sampled_from([0.0, 1.0, 1.5, 2.0, 5.0]), st.floats(0, 3))
def test_bulk_works_rest_stays_bounded_and_follows_the_agents(pause: float, s: Strain, target: float,
                                                              work: float) -> None:
    """The rest is never negative nor above PAUSE_MAX, nor (when it grows) above REST_PER_WORK times the page's own
    time, so bulk work keeps a third of its speed; it grows only while agents' p99 is over the target (on enough
    writes of both kinds), shrinks otherwise, and is nothing at all when the operator set the target to 0."""
    after = next_pause(pause, s, target, work)
    assert 0.0 <= after <= PAUSE_MAX
    cap = max(PAUSE_STEP, REST_PER_WORK * work)
    over = (target > 0 and s.quiet_writes >= MIN_QUIET and s.busy_writes >= MIN_BUSY
            and s.busy_p99 > target * s.quiet_p99)
    if target == 0:
        assert after == 0.0
    elif over:
        assert after <= cap and (after >= max(pause, PAUSE_STEP) or after in (PAUSE_MAX, cap))
    else:
        assert after <= pause


def test_the_rest_comes_back_to_nothing_once_agents_are_fast_again() -> None:
    """Doubling under strain reaches the ceiling in a few pages; once agents' p99 is back under the target the rest
    falls to nothing within a bounded number of pages, so a copy never stays slow for a spike long gone."""
    slow, fast = Strain(0.02, 500, 0.2, 50), Strain(0.02, 500, 0.03, 50)
    pause, pages = 0.0, 0
    while pause < PAUSE_MAX:
        pause, pages = next_pause(pause, slow, 2.0, 1.0), pages + 1
    assert pages <= 10
    assert next_pause(pause, slow, 2.0, 0.1) == 0.2  # never more than twice what the page itself took
    pages = 0
    while pause > 0:
        pause, pages = next_pause(pause, fast, 2.0, 1.0), pages + 1
    assert pages <= 30
