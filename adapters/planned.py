"""The six MCP write operations, written once for every store: each is a plan from `adapters.semantics` handed to
the store's own `_planned`, which fetches the keys the plan reads, runs it and writes its effects in one
transaction (however that store makes one)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar

from adapters import semantics
from adapters.base import WriteResult
from adapters.model import Entity, ObservationAddition, ObservationDeletion, Relation
from adapters.records import Record, RecordKey

T = TypeVar("T")
Plan = Callable[[semantics.Stored], tuple[T, semantics.Effects]]


class PlannedWrites(ABC):
    @abstractmethod
    async def _planned(self, scope: str, keys: list[RecordKey], plan: Plan[T], size: int) -> WriteResult[T]:
        """Fetch `keys`, run `plan` on them and write its effects, atomically; `size` counts the call's items."""

    async def create_entities(self, scope: str, entities: Sequence[Entity],
                              version: int) -> WriteResult[tuple[Entity, ...]]:
        return await self._planned(scope, semantics.create_entities_keys(scope, entities),
                                   lambda st: semantics.create_entities(scope, entities, version, st),
                                   sum(1 + len(e.observations) for e in entities))

    async def create_relations(self, scope: str, relations: Sequence[Relation],
                               version: int) -> WriteResult[tuple[Relation, ...]]:
        return await self._planned(scope, semantics.create_relations_keys(scope, relations),
                                   lambda st: semantics.create_relations(scope, relations, version, st),
                                   len(relations))

    async def add_observations(self, scope: str, additions: Sequence[ObservationAddition],
                               version: int) -> WriteResult[tuple[ObservationAddition, ...]]:
        return await self._planned(scope, semantics.add_observations_keys(scope, additions),
                                   lambda st: semantics.add_observations(scope, additions, version, st),
                                   sum(len(a.contents) for a in additions))

    async def delete_entities(self, scope: str, names: Sequence[str], version: int) -> WriteResult[None]:
        return await self._tombstones(scope, semantics.delete_entities(scope, names, version))

    async def delete_observations(self, scope: str, deletions: Sequence[ObservationDeletion],
                                  version: int) -> WriteResult[None]:
        return await self._tombstones(scope, semantics.delete_observations(scope, deletions, version))

    async def delete_relations(self, scope: str, relations: Sequence[Relation], version: int) -> WriteResult[None]:
        return await self._tombstones(scope, semantics.delete_relations(scope, relations, version))

    async def _tombstones(self, scope: str, recs: list[Record]) -> WriteResult[None]:
        return await self._planned(scope, semantics.tombstone_keys(recs),
                                   lambda st: (None, semantics.tombstone_effects(recs, st)), len(recs))
