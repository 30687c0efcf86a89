"""Plain typed domain objects: what every store speaks. gRPC types never get below the servicers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

Metadata: TypeAlias = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Entity:
    name: str
    entity_type: str
    observations: tuple[str, ...] = ()
    metadata: Metadata = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Relation:
    source: str
    target: str
    relation_type: str
    metadata: Metadata = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.source, self.relation_type, self.target)


@dataclass(frozen=True, slots=True)
class ObservationAddition:
    entity_name: str
    contents: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ObservationDeletion:
    entity_name: str
    observations: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Graph:
    entities: tuple[Entity, ...] = ()
    relations: tuple[Relation, ...] = ()
    truncated: str = ""  # what was cut to fit the message limit, and how to get it ("" when whole)


@dataclass(frozen=True, slots=True)
class GraphPage:
    entities: tuple[Entity, ...]
    relations: tuple[Relation, ...]
    next_cursor: str | None
    truncated: str = ""  # set only when one entity alone exceeded the message limit
    # An upper bound of its encoded bytes, once measured against the message limit (0: not measured). Not part of
    # what the page holds, so pages compare by their items alone.
    size: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class ScoredEntity:
    entity: Entity
    score: float


@dataclass(frozen=True, slots=True)
class SearchResult:
    results: tuple[ScoredEntity, ...]
    relations: tuple[Relation, ...]
    truncated: str = ""  # what was cut to fit the message limit ("" when whole)


