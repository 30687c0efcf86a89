"""How the placement looks in numbers: scopes and live records per store, and per scope a migration moves.

Counting reads every store's per-scope counts (one query on the SQL stores, a walk on the others), so it runs when
an operator asks (`memshift admin placement`, `GetStatus` with `count_stores`), never on the status a watch polls.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.export import scope_counts
from adapters.specs import redact, scrub
from proxy.engine import phases
from proxy.engine.migration import MigrationEngine

MAX_SCOPES_SHOWN = 1000  # selected scopes listed one by one; the per-store totals count them all


@dataclass(frozen=True, slots=True)
class StoreCount:
    store: str  # redacted spec
    scopes: int
    records: int
    error: str = ""


@dataclass(frozen=True, slots=True)
class ScopeCount:
    scope: str
    source_records: int
    target_records: int


async def count_placement(engine: MigrationEngine) -> tuple[list[StoreCount], list[ScopeCount]]:
    """Per store of the placement: the scopes routed to it and their records (a copy a store still holds of a scope
    placed elsewhere is not counted); per scope the current migration moves: its records on both stores."""
    s = engine.state
    placed = s.placement.stores()
    counted: dict[str, dict[str, int]] = {}
    stores: list[StoreCount] = []
    for spec in s.named_stores():
        try:
            counted[spec] = await scope_counts(engine.stores.opened(spec))
        except Exception as exc:
            if spec in placed:
                stores.append(StoreCount(redact(spec), 0, 0, scrub(f"{type(exc).__name__}: {exc}")[:300]))
            continue
        if spec in placed:
            mine = {scope: n for scope, n in counted[spec].items() if s.placement.store_of(scope) == spec}
            stores.append(StoreCount(redact(spec), len(mine), sum(mine.values())))
    selected: list[ScopeCount] = []
    if s.secondary:
        source, target = s.source, s.secondary if s.source == s.primary else s.primary  # cutover swaps the two
        moved = phases.moved(engine.state)
        names = sorted({scope for spec in (source, target) for scope in counted.get(spec, {}) if moved(scope)})
        selected = [ScopeCount(scope, counted.get(source, {}).get(scope, 0), counted.get(target, {}).get(scope, 0))
                    for scope in names[:MAX_SCOPES_SHOWN]]
    return stores, selected
