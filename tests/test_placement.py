"""The placement's rules (proxy.engine.placement), over random placements and selections: a cutover moves exactly the
scopes the migration selected from its source store, and every other scope keeps its store."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder
from adapters.errors import InvalidInput
from adapters.records import EntityRecord, Kind, RecordKey, RecordPage
from proxy.engine.placement import (
    MAX_SELECTED,
    Moved,
    Placement,
    Selection,
    after_cutover,
    moves,
    selection,
    source_of,
    walk_from,
)
from proxy.engine.verify import verify

STORES = ["sqlite:///a.db", "sqlite:///b.db", "postgresql://c"]
# Every scope of up to three letters over a small alphabet: prefixes of one another, so longest-prefix rules and
# exact entries overlap in every way.
UNIVERSE = ["".join(p) for n in (1, 2, 3) for p in itertools.product("ab-", repeat=n) if p[0] != "-"]
names = st.sampled_from(UNIVERSE)
stores = st.sampled_from(STORES)
placements = st.builds(Placement, stores, st.dictionaries(names, stores, max_size=5),
                       st.dictionaries(names, stores, max_size=5))
selections = st.builds(lambda n, p: Selection(tuple(dict.fromkeys(n)), tuple(dict.fromkeys(p))),
                       st.lists(names, max_size=3), st.lists(names, max_size=2))


@given(placements, selections, stores)
def test_a_cutover_moves_exactly_the_selected_scopes_of_the_source_and_no_other(
        start: Placement, chosen: Selection, target: str) -> None:
    try:
        source = source_of(start, chosen)
    except InvalidInput as exc:
        assert exc.field == "scopes"
        shown = {start.store_of(n) for n in chosen.names} | {start.prefix_store(p) for p in chosen.prefixes}
        assert len(shown) > 1  # refused only when the selection spans stores
        return
    if target == source:
        return
    after = after_cutover(start, chosen, source, target)
    moved = [s for s in UNIVERSE if moves(start, chosen, source, s)]
    for scope in UNIVERSE:
        if scope in moved:
            assert after.store_of(scope) == target, scope
        else:
            assert after.store_of(scope) == start.store_of(scope), scope
    for name in chosen.names:  # a named scope is always moved: it was on the source, or the start was refused
        assert name in moved
    if chosen.everything:
        assert after.default == target


@given(placements, selections, stores)
def test_moving_the_same_scopes_back_restores_where_every_scope_lives(
        start: Placement, chosen: Selection, target: str) -> None:
    try:
        source = source_of(start, chosen)
    except InvalidInput:
        return
    if target == source:
        return
    there = after_cutover(start, chosen, source, target)
    moved = [s for s in UNIVERSE if moves(start, chosen, source, s)]
    try:
        back_from = source_of(there, chosen)
    except InvalidInput:  # a prefix whose scopes now straddle both stores: moved back by name instead
        return
    assert back_from == target or not moved or not chosen.names
    if back_from != target:
        return
    back = after_cutover(there, chosen, target, source)
    for scope in moved:  # every scope that went is back; the rest is the first property again
        assert moves(there, chosen, target, scope)
        assert back.store_of(scope) == source


PARTS = {Kind.ENTITY: [("x",), ("y",)], Kind.OBSERVATION: [("x", "t")], Kind.RELATION: [("x", "r", "y")]}
KEYS: list[RecordKey] = sorted((k, s, p) for k in Kind for s in UNIVERSE for p in PARTS[k])


@given(selections, st.integers(1, 7))
def test_a_backfill_jumping_over_unselected_scopes_still_reads_every_selected_record_in_order(
        chosen: Selection, size: int) -> None:
    """The backfill's walk as `proxy.engine.backfill` runs it: read a page after the resume point, keep the selected
    records, resume at `walk_from` of the page's last key. It must see every selected record, in order, once."""
    selected = [k for k in KEYS if chosen.matches(k[1])]
    seen: list[RecordKey] = []
    cursor: RecordKey | None = None
    pages = 0
    while True:
        start = walk_from(chosen, cursor)
        if cursor is not None and start is None:
            break
        page = [k for k in KEYS if start is None or k > start][:size]
        seen += [k for k in page if chosen.matches(k[1])]
        pages += 1
        if len(page) < size:
            break
        cursor = walk_from(chosen, page[-1])
        if cursor is None:
            break
        assert cursor >= page[-1]  # never backwards
    assert seen == selected
    if not chosen.everything:  # what it reads beyond the selection is bounded by one page per jump
        assert pages <= len(selected) // size + 2 * (len(chosen.names) + len(chosen.prefixes)) * len(Kind) + 2


def test_a_selection_names_the_scope_or_prefix_to_fix() -> None:
    with pytest.raises(InvalidInput) as bad:
        selection(["agent-1", "bad scope"], [])
    assert bad.value.field == "scopes[1]"
    with pytest.raises(InvalidInput) as bad:
        selection([], ["team-", ""])
    assert bad.value.field == "scope_prefixes[1]"
    with pytest.raises(InvalidInput) as bad:
        selection([f"s{i}" for i in range(MAX_SELECTED + 1)], [])
    assert bad.value.field == "scopes" and "at most" in bad.value.problem
    assert selection(["a", "a", "b"], ["t-"]) == Selection(("a", "b"), ("t-",))


def test_a_selection_on_two_stores_is_refused_naming_both() -> None:
    p = Placement("sqlite:///a.db", {"x": "postgresql://c"})
    with pytest.raises(InvalidInput) as bad:
        source_of(p, Selection(("y", "x")))
    assert "scope 'y'" in bad.value.problem and "scope 'x'" in bad.value.problem
    assert source_of(p, Selection(("x",))) == "postgresql://c"
    assert source_of(p, Selection((), ("t",))) == "sqlite:///a.db"


def test_a_longer_prefix_and_an_own_entry_win_over_a_shorter_prefix_and_the_default() -> None:
    p = Placement("d", {"team-a1": "own"}, {"team-": "short", "team-a": "long"})
    assert [p.store_of(s) for s in ("x", "team-b", "team-a2", "team-a1")] == ["d", "short", "long", "own"]
    assert p.stores() == ["d", "short", "long", "own"]


class CountingStore:
    """A real store that counts the records its `list_records` hands out (what a walk over it read)."""

    def __init__(self, inner: EmbeddedBackend) -> None:
        self._inner, self.listed = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def list_records(self, after: RecordKey | None, limit: int, tombstones: bool = False) -> RecordPage:
        page = await self._inner.list_records(after, limit, tombstones)
        self.listed += len(page.records)
        return page


async def test_verify_of_a_selection_compares_and_reads_only_the_selected_scopes(
        embedder: BatchingEmbedder, tmp_path: Path) -> None:
    """The scopes around the selected one differ between the stores (the target serves other scopes of its own):
    Verify of the selection finds nothing, and it does not read them either."""
    stores = [EmbeddedBackend(tmp_path / f"{n}.db", embedder) for n in ("old", "new")]
    for store in stores:
        await store.open()
    try:
        selected = [EntityRecord("m-sel", f"n{i:03d}", "t", 1 + i, 1 + i) for i in range(300)]
        for i, store in enumerate(stores):
            around = [EntityRecord(s, f"n{j:03d}", f"t{i}", 1 + j, 1 + j) for s in ("a-other", "z-other")
                      for j in range(300)]
            await store.apply(selected + around)
        old, new = CountingStore(stores[0]), CountingStore(stores[1])
        only = Moved(Placement("old"), Selection(("m-sel",)), "old")
        report = [r async for r in verify(old, new, batch=100, only=only)][-1]  # type: ignore[arg-type]
        assert report.done
        assert (report.compared, report.differences) == (300, 0)
        assert set(report.per_scope) == {"m-sel"}
        everything = [r async for r in verify(stores[0], stores[1], batch=100)][-1]
        assert everything.differences == 600  # what the selection left alone
        # Each walk read the selected scope and at most one page past it, not the 600 records around it.
        assert old.listed <= 300 + 100 and new.listed <= 300 + 100, (old.listed, new.listed)
    finally:
        for store in stores:
            await store.close()
