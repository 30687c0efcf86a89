"""One typed input per mutating call, as temporalio's interceptors have: each knows how to run itself on a store
with a version, and which record keys it may touch (what the repair queue reconciles when stores disagree)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from adapters.base import Backend, VectorMap, WriteResult
from adapters.model import Entity, ObservationAddition, ObservationDeletion, Relation
from adapters.records import Kind, Record, RecordKey

T = TypeVar("T")


class WriteOp(Protocol[T]):
    @property
    def scope(self) -> str: ...

    async def run(self, store: Backend, version: int) -> WriteResult[T]: ...

    def keys(self) -> list[RecordKey]: ...


def _entity_key(scope: str, name: str) -> RecordKey:
    return (Kind.ENTITY, scope, (name,))


def _relation_keys(scope: str, relations: Sequence[Relation]) -> list[RecordKey]:
    return [(Kind.RELATION, scope, r.key) for r in relations]


@dataclass(frozen=True, slots=True)
class CreateEntities:
    scope: str
    entities: Sequence[Entity]

    async def run(self, store: Backend, version: int) -> WriteResult[tuple[Entity, ...]]:
        return await store.create_entities(self.scope, self.entities, version)

    def keys(self) -> list[RecordKey]:
        out = [_entity_key(self.scope, e.name) for e in self.entities]
        out += [(Kind.OBSERVATION, self.scope, (e.name, o)) for e in self.entities for o in e.observations]
        return out


@dataclass(frozen=True, slots=True)
class CreateRelations:
    scope: str
    relations: Sequence[Relation]

    async def run(self, store: Backend, version: int) -> WriteResult[tuple[Relation, ...]]:
        return await store.create_relations(self.scope, self.relations, version)

    def keys(self) -> list[RecordKey]:
        return _relation_keys(self.scope, self.relations)


@dataclass(frozen=True, slots=True)
class AddObservations:
    scope: str
    additions: Sequence[ObservationAddition]

    async def run(self, store: Backend, version: int) -> WriteResult[tuple[ObservationAddition, ...]]:
        return await store.add_observations(self.scope, self.additions, version)

    def keys(self) -> list[RecordKey]:
        return [(Kind.OBSERVATION, self.scope, (a.entity_name, c)) for a in self.additions for c in a.contents]


@dataclass(frozen=True, slots=True)
class DeleteEntities:
    scope: str
    names: Sequence[str]

    async def run(self, store: Backend, version: int) -> WriteResult[None]:
        return await store.delete_entities(self.scope, self.names, version)

    def keys(self) -> list[RecordKey]:
        return [_entity_key(self.scope, n) for n in self.names]


@dataclass(frozen=True, slots=True)
class DeleteObservations:
    scope: str
    deletions: Sequence[ObservationDeletion]

    async def run(self, store: Backend, version: int) -> WriteResult[None]:
        return await store.delete_observations(self.scope, self.deletions, version)

    def keys(self) -> list[RecordKey]:
        return [(Kind.OBSERVATION, self.scope, (d.entity_name, o)) for d in self.deletions for o in d.observations]


@dataclass(frozen=True, slots=True)
class DeleteRelations:
    scope: str
    relations: Sequence[Relation]

    async def run(self, store: Backend, version: int) -> WriteResult[None]:
        return await store.delete_relations(self.scope, self.relations, version)

    def keys(self) -> list[RecordKey]:
        return _relation_keys(self.scope, self.relations)


@dataclass(frozen=True, slots=True)
class ApplyRecords:
    """Whole versioned records from a backup, applied if newer (they keep their own versions; the one a write is
    stamped with goes unused). Its effects are the records as each store holds them afterwards, so a store that
    ended up different from the primary (it held something newer, or refused) is reconciled by the repair queue."""

    records: Sequence[Record]
    vectors: VectorMap | None = None

    @property
    def scope(self) -> str:
        return self.records[0].scope if self.records else ""

    async def run(self, store: Backend, version: int) -> WriteResult[int]:
        applied = await store.apply(self.records, self.vectors)
        return WriteResult(applied, tuple(await store.get_records(self.keys())))

    def keys(self) -> list[RecordKey]:
        return [r.key for r in self.records]
