"""The domain entry point of every memory call: validate, stamp a version, send to the store(s).

Below this point nothing knows about gRPC. Validation runs on the whole request before a version is stamped or any
store is touched, so a rejected call stores nothing. The version is stamped before any store is touched
(docs/design.md, Versions), which is what lets the migration engine replay the same write anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapters.embedder import Embedder
from adapters.errors import InvalidInput, OverLimit
from adapters.model import (
    Entity,
    Graph,
    GraphPage,
    ObservationAddition,
    ObservationDeletion,
    Relation,
    SearchResult,
)
from proxy.engine.migration import MigrationEngine
from proxy.routing import ops, reads
from proxy.routing import validation as check
from proxy.routing.read_routing import ReadRouting
from proxy.runtime.config import Limits
from proxy.transports.fit import fit_graph, fit_page, fit_search


class Router:
    def __init__(self, engine: MigrationEngine, reads: ReadRouting, embedder: Embedder, limits: Limits) -> None:
        self._engine = engine
        self._reads = reads
        self._embedder = embedder
        self._limits = limits

    # An empty list is a no-op answered without stamping a version or touching a store (the MCP memory server
    # treats it so, and LLM agents send them).
    async def create_entities(self, scope: str, entities: Sequence[Entity]) -> tuple[Entity, ...]:
        check.scope(scope)
        check.entities(entities, self._limits)
        if not entities:
            return ()
        return (await self._engine.writer.write(ops.CreateEntities(scope, entities))).answer

    async def create_relations(self, scope: str, relations: Sequence[Relation]) -> tuple[Relation, ...]:
        check.scope(scope)
        check.relations(relations, self._limits)
        if not relations:
            return ()
        return (await self._engine.writer.write(ops.CreateRelations(scope, relations))).answer

    async def add_observations(
        self, scope: str, additions: Sequence[ObservationAddition]
    ) -> tuple[ObservationAddition, ...]:
        check.scope(scope)
        check.additions(additions, self._limits)
        if not additions:
            return ()
        await self._check_growth(scope, additions)
        return (await self._engine.writer.write(ops.AddObservations(scope, additions))).answer

    async def _check_growth(self, scope: str, additions: Sequence[ObservationAddition]) -> None:
        """`max_entity_bytes` holds across calls: what an entity already holds (read from the primary) plus what this
        call adds. Two calls racing on one entity may each pass; the overshoot is bounded by one call's size."""
        adding: dict[str, dict[str, None]] = {}
        for add in additions:
            adding.setdefault(add.entity_name, {}).update(dict.fromkeys(add.contents))
        stored = await self._engine.stores.store_for(scope).open_nodes(scope, list(adding))
        current = {e.name: e for e in stored.entities}
        for i, add in enumerate(additions):
            ent = current.get(add.entity_name)
            if ent is None:
                continue  # the write answers NOT_FOUND
            held = set(ent.observations)
            grown = check.entity_bytes(ent) + sum(len(o.encode()) for o in adding[add.entity_name] if o not in held)
            if grown > self._limits.max_entity_bytes:
                raise OverLimit(f"observations[{i}].contents",
                               f"would make entity {add.entity_name!r} hold {grown} bytes of text, at most "
                               f"{self._limits.max_entity_bytes} per entity (name, type, observations and metadata)")

    async def delete_entities(self, scope: str, names: Sequence[str]) -> None:
        check.scope(scope)
        check.names("entity_names", names, self._limits)
        if names:
            await self._engine.writer.write(ops.DeleteEntities(scope, names))

    async def delete_observations(self, scope: str, deletions: Sequence[ObservationDeletion]) -> None:
        check.scope(scope)
        check.deletions(deletions, self._limits)
        if any(d.observations for d in deletions):
            await self._engine.writer.write(ops.DeleteObservations(scope, deletions))

    async def delete_relations(self, scope: str, relations: Sequence[Relation]) -> None:
        check.scope(scope)
        check.relations(relations, self._limits, with_metadata=False)
        if relations:
            await self._engine.writer.write(ops.DeleteRelations(scope, relations))

    async def read_graph(self, scope: str, page_size: int, page_token: str) -> GraphPage:
        check.scope(scope)
        size = check.page_size(page_size, self._limits)
        try:
            page = await self._reads.read(reads.ReadGraph(scope, page_token or None, size))
        except ValueError as exc:
            raise InvalidInput("page_token", "is not a token returned by ReadGraph") from exc
        return fit_page(page, self._limits.max_message_bytes)

    async def search_nodes(self, scope: str, query: str) -> Graph:
        check.scope(scope)
        check.query(query, self._limits)
        return fit_graph(await self._reads.read(reads.SearchNodes(scope, query)), self._limits.max_message_bytes)

    async def open_nodes(self, scope: str, names: Sequence[str]) -> Graph:
        check.scope(scope)
        check.names("names", names, self._limits)
        if not names:
            return Graph()
        return fit_graph(await self._reads.read(reads.OpenNodes(scope, names)), self._limits.max_message_bytes)

    async def semantic_search(
        self, scope: str, query: str, limit: int, min_score: float | None, entity_types: Sequence[str]
    ) -> SearchResult:
        check.scope(scope)
        check.query(query, self._limits)
        k = check.search_limit(limit, self._limits)
        threshold = check.min_score(min_score)
        check.entity_types(entity_types, self._limits)
        vector = (await self._embedder.embed([query], urgent=True))[0]
        result = await self._reads.read(reads.SemanticSearch(scope, query, vector, k, threshold, entity_types))
        return fit_search(result, self._limits.max_message_bytes)
