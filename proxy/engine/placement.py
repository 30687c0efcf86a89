"""Which store serves each scope, and which scopes a migration moves (docs/placement.md). Pure: no I/O.

A `Placement` names a default store and any number of scopes or scope prefixes placed elsewhere; a scope is served
by its exact entry if it has one, else by its longest matching prefix, else by the default. It lives in the
migration state, so every change to it is a compare-and-set broadcast to the fleet like any phase change.

A `Selection` is what a migration moves: named scopes and scope prefixes, or (empty) every scope the default store
serves. The scopes a migration moves are fixed when it starts: those the selection matches that were then served by
the migration's source store. At cutover `after_cutover` places exactly those on the target; a rollback from the
rollback window puts back the placement the migration started from.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from adapters.errors import InvalidInput
from adapters.records import Kind, RecordKey
from proxy.routing.validation import SCOPE_RE

MAX_SELECTED = 10_000  # names and prefixes a selection may hold: it is saved with every change of the state


@dataclass(frozen=True, slots=True)
class Placement:
    default: str = ""  # store spec serving every scope not placed elsewhere
    scopes: Mapping[str, str] = field(default_factory=dict)  # scope -> store spec
    prefixes: Mapping[str, str] = field(default_factory=dict)  # scope prefix -> store spec

    def store_of(self, scope: str) -> str:
        if (spec := self.scopes.get(scope)) is not None:
            return spec
        return self.prefix_store(scope)

    def prefix_store(self, name: str) -> str:
        """The store of `name` by prefixes and default alone (for a prefix: where the scopes under it go unless a
        longer prefix or a scope of its own says otherwise)."""
        best = ""
        spec = self.default
        for prefix, where in self.prefixes.items():
            if name.startswith(prefix) and len(prefix) > len(best):
                best, spec = prefix, where
        return spec

    def stores(self) -> list[str]:
        """Every store the placement names, the default first."""
        return list(dict.fromkeys([self.default, *self.prefixes.values(), *self.scopes.values()]))

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Placement:
        return Placement(str(data.get("default", "")), {str(k): str(v) for k, v in data.get("scopes", {}).items()},
                         {str(k): str(v) for k, v in data.get("prefixes", {}).items()})


@dataclass(frozen=True)  # no slots: `_named` is computed once and kept on the instance
class Selection:
    """Scopes by name and by prefix; empty: every scope of the default store."""

    names: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    @functools.cached_property
    def _named(self) -> frozenset[str]:
        """The names as a set: every write of a migration asks `matches`, and a selection may name 10,000 scopes."""
        return frozenset(self.names)

    @property
    def everything(self) -> bool:
        return not self.names and not self.prefixes

    def matches(self, scope: str) -> bool:
        return self.everything or scope in self._named or any(scope.startswith(p) for p in self.prefixes)

    def shown(self) -> str:
        """For history, logs and status: what was selected, shortened past a few entries."""
        if self.everything:
            return "every scope of the default store"
        parts = [*self.names[:5], *(f"{p}*" for p in self.prefixes[:5])]
        more = len(self.names) + len(self.prefixes) - len(parts)
        return ", ".join(parts) + (f" and {more} more" if more > 0 else "")

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Selection:
        return Selection(tuple(str(n) for n in data.get("names", ())),
                         tuple(str(p) for p in data.get("prefixes", ())))


EVERYTHING = Selection()


def selection(names: Iterable[str], prefixes: Iterable[str]) -> Selection:
    """A selection as an operator asked for it: duplicates dropped, order kept, size bounded; InvalidInput names the
    field to fix: a scope or prefix the API's scope rule would refuse, or more than `MAX_SELECTED` of them."""
    picked = tuple(dict.fromkeys(names))
    starts = tuple(dict.fromkeys(prefixes))
    if len(picked) + len(starts) > MAX_SELECTED:
        raise InvalidInput("scopes", f"selects {len(picked) + len(starts)} scopes and prefixes; at most "
                           f"{MAX_SELECTED} (select by prefix to move more)")
    for field_name, values in (("scopes", picked), ("scope_prefixes", starts)):
        for i, value in enumerate(values):
            if not SCOPE_RE.fullmatch(value):
                raise InvalidInput(f"{field_name}[{i}]", f"{value[:40]!r} is not a scope: 1-128 characters of "
                                   "[A-Za-z0-9._:/-], starting with a letter or digit")
    return Selection(picked, starts)


def source_of(placement: Placement, chosen: Selection) -> str:
    """The one store every selected scope lives on now, or InvalidInput naming a selected scope or prefix that lives
    elsewhere (a migration moves scopes from one store)."""
    if chosen.everything:
        return placement.default
    where = [(f"scope {n!r}", placement.store_of(n)) for n in chosen.names]
    where += [(f"prefix {p!r}", placement.prefix_store(p)) for p in chosen.prefixes]
    source = where[0][1]
    for what, spec in where[1:]:
        if spec != source:
            raise InvalidInput("scopes", f"selects scopes on two stores: {where[0][0]} is on one and {what} on "
                               "another; move each store's scopes in a migration of its own")
    return source


def moves(start: Placement, chosen: Selection, source: str, scope: str) -> bool:
    """Whether a migration that started at placement `start` from `source` moves `scope`."""
    return chosen.matches(scope) and start.store_of(scope) == source


@dataclass(frozen=True)
class Moved:
    """The scopes one migration moves: called with a scope, whether it is one; `resume`, where a walk in record order
    over them reads on after a key (`walk_from`). What the backfill and Verify read, and the progress counts."""

    start: Placement
    chosen: Selection
    source: str

    def __call__(self, scope: str) -> bool:
        return moves(self.start, self.chosen, self.source, scope)

    def resume(self, after: RecordKey | None) -> RecordKey | None:
        return walk_from(self.chosen, after)


_ARITY = {Kind.ENTITY: 1, Kind.OBSERVATION: 2, Kind.RELATION: 3}  # parts of a key: name; entity, text; from, type, to


def _before(kind: Kind, scope: str) -> RecordKey:
    """A position just before every record of `scope` in `kind` (names are never empty, so ("",) sorts first)."""
    return (kind, scope, ("",) * _ARITY[kind])


def walk_from(chosen: Selection, after: RecordKey | None) -> RecordKey | None:
    """Where a walk in record order (kind, then scope, then key) that only needs the scopes `chosen` matches should
    resume reading after `after`: `after` itself while its scope is selected (or everything is), else just before
    the next scope that can match, in this kind or the next; None once no selected scope can follow. Every scope
    strictly between `after` and that point is unselected: a scope matching a name or a prefix greater than `after`'s
    scope sorts at or after it, and one matching a smaller prefix that `after`'s scope does not start with sorts
    before `after`'s scope. Stores list records after any key, real or not, so the walk may jump there."""
    if chosen.everything:
        return after
    starts = (*chosen.names, *chosen.prefixes)
    if after is None:
        return _before(Kind.ENTITY, min(starts))
    kind, scope, _ = after
    if chosen.matches(scope):
        return after
    later = [s for s in starts if s > scope]
    if later:
        return _before(kind, min(later))
    if kind == max(Kind):
        return None
    return _before(Kind(kind + 1), min(starts))


def after_cutover(start: Placement, chosen: Selection, source: str, target: str) -> Placement:
    """The placement once the moved scopes live on `target`: every scope `moves` says yes to is served by `target`,
    and every other scope by the store it had. Entries that pointed the moved scopes at `source` are re-pointed (not
    dropped: a shorter prefix to a third store would then win), and the selection's own entries are added."""
    if chosen.everything:
        return Placement(target, {s: target if w == source else w for s, w in start.scopes.items()},
                         {p: target if w == source else w for p, w in start.prefixes.items()})
    scopes = {s: target if w == source and chosen.matches(s) else w for s, w in start.scopes.items()}
    scopes.update(dict.fromkeys(chosen.names, target))
    prefixes = {p: target if w == source and any(p.startswith(q) for q in chosen.prefixes) else w
                for p, w in start.prefixes.items()}
    prefixes.update(dict.fromkeys(chosen.prefixes, target))
    return Placement(start.default, scopes, prefixes)
