"""Shadow-read comparators: does the secondary's answer say what the primary's does? (docs/design.md, Shadow reads)

Pure functions over domain objects, one per read operation. Graph reads compare as sets, because stores return
entities and relations in different orders and that is not a difference a user would notice. Fields named as noise
(`metadata.<key>` for one metadata key, or `entity_type`/`observations`/`metadata` for a whole field) are ignored on
both sides. Semantic search compares the top-k by overlap and pairwise rank agreement against thresholds: two stores
rarely rank near-ties identically, and a strict equality check would page someone for floating-point noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from adapters.model import Entity, Graph, GraphPage, Relation, SearchResult

_ENTITY_FIELDS = frozenset({"entity_type", "observations", "metadata"})


@dataclass(frozen=True, slots=True)
class CompareSettings:
    noise_fields: frozenset[str] = frozenset()
    search_top_k: int = 10
    search_min_overlap: float = 0.8  # |top-k(primary) ∩ top-k(secondary)| / the larger top-k
    search_min_rank_agreement: float = 0.8  # share of common pairs ordered alike
    search_tie_epsilon: float = 1e-3  # scores closer than this on the primary are ties: any order agrees


@dataclass(frozen=True, slots=True)
class Comparison:
    match: bool
    detail: str = ""  # what differs, for the mismatch sample; empty on a match
    figures: Mapping[str, float] = field(default_factory=dict)


MATCH = Comparison(True)


def _metadata(meta: Mapping[str, str], noise: frozenset[str]) -> tuple[tuple[str, str], ...]:
    if "metadata" in noise:
        return ()
    return tuple(sorted((k, v) for k, v in meta.items() if f"metadata.{k}" not in noise))


def entity_fingerprint(e: Entity, noise: frozenset[str]) -> tuple[Any, ...]:
    return (
        e.name,
        None if "entity_type" in noise else e.entity_type,
        None if "observations" in noise else frozenset(e.observations),
        _metadata(e.metadata, noise),
    )


def relation_fingerprint(r: Relation, noise: frozenset[str]) -> tuple[Any, ...]:
    return (r.source, r.relation_type, r.target, _metadata(r.metadata, noise))


def _set_difference(kind: str, mine: set[Any], theirs: set[Any]) -> list[str]:
    out = []
    if missing := mine - theirs:
        out.append(f"{len(missing)} {kind} only on the primary (e.g. {_first(missing)})")
    if extra := theirs - mine:
        out.append(f"{len(extra)} {kind} only on the secondary (e.g. {_first(extra)})")
    return out


def _first(items: set[Any]) -> str:
    return repr(min(items, key=repr))


def _compare_sets(entities: tuple[Iterable[Entity], Iterable[Entity]],
                  relations: tuple[Iterable[Relation], Iterable[Relation]], noise: frozenset[str]) -> Comparison:
    pe = {entity_fingerprint(e, noise) for e in entities[0]}
    se = {entity_fingerprint(e, noise) for e in entities[1]}
    pr = {relation_fingerprint(r, noise) for r in relations[0]}
    sr = {relation_fingerprint(r, noise) for r in relations[1]}
    problems = _set_difference("entities", pe, se) + _set_difference("relations", pr, sr)
    return Comparison(not problems, "; ".join(problems))


def compare_graph(primary: Graph, secondary: Graph, settings: CompareSettings) -> Comparison:
    """SearchNodes and OpenNodes: the same entities and relations, in any order."""
    if primary == secondary:  # the common case, and far cheaper than building sets
        return MATCH
    return _compare_sets((primary.entities, secondary.entities), (primary.relations, secondary.relations),
                         settings.noise_fields)


def compare_page(primary: GraphPage, secondary: GraphPage, settings: CompareSettings) -> Comparison:
    """ReadGraph: one page each. Page tokens are store-specific (noise); the contents compare as sets, and whether
    more pages follow must agree."""
    if primary == secondary:
        return MATCH
    result = _compare_sets((primary.entities, secondary.entities), (primary.relations, secondary.relations),
                           settings.noise_fields)
    if (primary.next_cursor is None) != (secondary.next_cursor is None):
        more = "the primary" if primary.next_cursor is not None else "the secondary"
        return Comparison(False, "; ".join(filter(None, [result.detail, f"only {more} has more pages"])))
    return result


def _rank_agreement(mine: list[tuple[str, float]], theirs: list[str], epsilon: float) -> float:
    """Share of pairs of common hits that both stores order alike; pairs the primary scores within `epsilon` of
    each other are ties and agree in either order."""
    position = {name: i for i, name in enumerate(theirs)}
    common = [(name, score) for name, score in mine if name in position]
    pairs = agreed = 0
    for i in range(len(common)):
        for j in range(i + 1, len(common)):
            pairs += 1
            (a, sa), (b, sb) = common[i], common[j]
            if abs(sa - sb) <= epsilon or position[a] < position[b]:
                agreed += 1
    return 1.0 if pairs == 0 else agreed / pairs


def compare_search(primary: SearchResult, secondary: SearchResult, settings: CompareSettings) -> Comparison:
    """SemanticSearch: top-k overlap and rank agreement against thresholds; common hits must hold the same
    entity (a silently altered record is a mismatch even when it ranks the same)."""
    if primary == secondary:  # same hits, same scores, same order
        return MATCH
    k = settings.search_top_k
    mine = [(h.entity.name, h.score) for h in primary.results[:k]]
    theirs = [h.entity.name for h in secondary.results[:k]]
    larger = max(len(mine), len(theirs))
    common = {n for n, _ in mine} & set(theirs)
    overlap = 1.0 if larger == 0 else len(common) / larger
    agreement = _rank_agreement(mine, theirs, settings.search_tie_epsilon)
    figures = {"overlap": overlap, "rank_agreement": agreement}
    problems = []
    if overlap < settings.search_min_overlap:
        problems.append(f"top-{k} overlap {overlap:.2f} < {settings.search_min_overlap:.2f}")
    if agreement < settings.search_min_rank_agreement:
        problems.append(f"rank agreement {agreement:.2f} < {settings.search_min_rank_agreement:.2f}")
    noise = settings.noise_fields
    p_hits = {h.entity.name: entity_fingerprint(h.entity, noise) for h in primary.results[:k]}
    s_hits = {h.entity.name: entity_fingerprint(h.entity, noise) for h in secondary.results[:k]}
    altered = sorted(n for n in common if p_hits[n] != s_hits[n])
    if altered:
        problems.append(f"{len(altered)} common hits differ in content (e.g. {altered[0]!r})")
    return Comparison(not problems, "; ".join(problems), figures)
