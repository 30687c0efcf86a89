"""A Python client for agents: typed results instead of protobuf, the scope bound once, a deadline on every call,
retries with backoff on UNAVAILABLE for the calls that are safe to repeat (reads and deletes), TLS and a bearer
token as options, one channel reused.

    from memshift import AsyncClient, Entity

    async with AsyncClient("127.0.0.1:50051", scope="agent-42") as memory:
        await memory.create_entities([Entity("alice", "person", ["drinks green tea"])])
        for hit in await memory.semantic_search("who likes hot drinks?", limit=3):
            print(hit.score, hit.entity.name)

`Client` is the same for code without an event loop. Errors are `MemshiftError` subclasses named after the gRPC
status (`NotFound`, `InvalidArgument`, ...), carrying the server's message (which names the field to fix).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc as pb_grpc

T = TypeVar("T")


@dataclass(frozen=True)
class Entity:
    name: str
    entity_type: str
    observations: Sequence[str] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Relation:
    source: str
    target: str
    relation_type: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Graph:
    entities: list[Entity]
    relations: list[Relation]
    truncated: str = ""  # what the server cut to fit its message limit ("" when whole)


@dataclass(frozen=True)
class Hit:
    entity: Entity
    score: float


class MemshiftError(Exception):
    """A call the proxy refused or could not serve; `code` is the gRPC status, the message the server's."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(f"{code.name}: {message}")


class InvalidArgument(MemshiftError): ...
class NotFound(MemshiftError): ...
class TooLarge(MemshiftError): ...  # RESOURCE_EXHAUSTED: over a limit, or the proxy is shedding load
class Unavailable(MemshiftError): ...
class Unauthenticated(MemshiftError): ...
class PermissionDenied(MemshiftError): ...


_ERRORS: dict[grpc.StatusCode, type[MemshiftError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TooLarge, grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated, grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def _error(exc: grpc.aio.AioRpcError) -> MemshiftError:
    return _ERRORS.get(exc.code(), MemshiftError)(exc.code(), exc.details() or "")


def _entity_pb(e: Entity) -> pb.Entity:
    return pb.Entity(name=e.name, entity_type=e.entity_type, observations=list(e.observations),
                     metadata=dict(e.metadata))


def _entity(m: pb.Entity) -> Entity:
    return Entity(m.name, m.entity_type, list(m.observations), dict(m.metadata))


def _relation_pb(r: Relation) -> pb.Relation:
    return pb.Relation(**{"from": r.source}, to=r.target, relation_type=r.relation_type, metadata=dict(r.metadata))


def _relation(m: pb.Relation) -> Relation:
    return Relation(getattr(m, "from"), m.to, m.relation_type, dict(m.metadata))


class AsyncClient:
    def __init__(self, target: str = "127.0.0.1:50051", scope: str = "default", *, token: str | None = None,
                 tls_ca: str | Path | None = None, timeout: float = 10.0, retries: int = 3) -> None:
        self.scope = scope
        self._timeout = timeout
        self._retries = retries
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self._channel = grpc.aio.secure_channel(target, creds)
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.MemoryStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, *, repeatable: bool) -> T:
        attempt = 0
        while True:
            try:
                return await method(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if not (repeatable and exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < self._retries):
                    raise _error(exc) from None
                attempt += 1
                await asyncio.sleep(min(2.0, 0.1 * 2 ** attempt) * (0.5 + random.random()))

    # --- writes (creating and adding are not retried: a lost answer would hide what the first attempt did) --------
    async def create_entities(self, entities: Iterable[Entity]) -> list[Entity]:
        res = await self._call(self._stub.CreateEntities, pb.CreateEntitiesRequest(
            scope=self.scope, entities=[_entity_pb(e) for e in entities]), repeatable=False)
        return [_entity(e) for e in res.created]

    async def create_relations(self, relations: Iterable[Relation]) -> list[Relation]:
        res = await self._call(self._stub.CreateRelations, pb.CreateRelationsRequest(
            scope=self.scope, relations=[_relation_pb(r) for r in relations]), repeatable=False)
        return [_relation(r) for r in res.created]

    async def add_observations(self, observations: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """{entity name: observations to add}; returns what was actually added per entity."""
        res = await self._call(self._stub.AddObservations, pb.AddObservationsRequest(scope=self.scope, observations=[
            pb.ObservationAddition(entity_name=n, contents=list(c)) for n, c in observations.items()]),
            repeatable=False)
        return {r.entity_name: list(r.added_observations) for r in res.results}

    async def delete_entities(self, names: Iterable[str]) -> None:
        await self._call(self._stub.DeleteEntities, pb.DeleteEntitiesRequest(scope=self.scope,
                                                                           entity_names=list(names)), repeatable=True)

    async def delete_observations(self, observations: Mapping[str, Sequence[str]]) -> None:
        await self._call(self._stub.DeleteObservations, pb.DeleteObservationsRequest(scope=self.scope, deletions=[
            pb.ObservationDeletion(entity_name=n, observations=list(o)) for n, o in observations.items()]),
            repeatable=True)

    async def delete_relations(self, relations: Iterable[Relation]) -> None:
        await self._call(self._stub.DeleteRelations, pb.DeleteRelationsRequest(
            scope=self.scope, relations=[_relation_pb(r) for r in relations]), repeatable=True)

    # --- reads ----------------------------------------------------------------------------------------------------
    async def read_graph(self) -> Graph:
        """The whole scope, every page followed."""
        entities: list[Entity] = []
        relations: list[Relation] = []
        notes: list[str] = []
        token = ""
        while True:
            page = await self._call(self._stub.ReadGraph, pb.ReadGraphRequest(scope=self.scope, page_token=token),
                                    repeatable=True)
            entities += [_entity(e) for e in page.entities]
            relations += [_relation(r) for r in page.relations]
            notes += [page.truncated] if page.truncated else []
            token = page.next_page_token
            if not token:
                return Graph(entities, relations, "; ".join(notes))

    async def search_nodes(self, query: str) -> Graph:
        g = await self._call(self._stub.SearchNodes, pb.SearchNodesRequest(scope=self.scope, query=query),
                             repeatable=True)
        return Graph([_entity(e) for e in g.entities], [_relation(r) for r in g.relations], g.truncated)

    async def open_nodes(self, names: Iterable[str]) -> Graph:
        g = await self._call(self._stub.OpenNodes, pb.OpenNodesRequest(scope=self.scope, names=list(names)),
                             repeatable=True)
        return Graph([_entity(e) for e in g.entities], [_relation(r) for r in g.relations], g.truncated)

    async def semantic_search(self, query: str, limit: int = 10, min_score: float | None = None,
                              entity_types: Iterable[str] = ()) -> list[Hit]:
        req = pb.SemanticSearchRequest(scope=self.scope, query=query, limit=limit, entity_types=list(entity_types))
        if min_score is not None:
            req.min_score = min_score
        res = await self._call(self._stub.SemanticSearch, req, repeatable=True)
        return [Hit(_entity(h.entity), h.score) for h in res.results]


class Client:
    """`AsyncClient` for code without an event loop: each call runs on a loop of the client's own."""

    def __init__(self, target: str = "127.0.0.1:50051", scope: str = "default", **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._inner: AsyncClient = self._loop.run_until_complete(self._make(target, scope, options))

    @staticmethod
    async def _make(target: str, scope: str, options: dict[str, Any]) -> AsyncClient:
        return AsyncClient(target, scope, **options)  # the channel belongs to the loop it is made on

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._loop.run_until_complete(self._inner.close())
        self._loop.close()

    def _run(self, call: Awaitable[T]) -> T:
        return self._loop.run_until_complete(call)

    def create_entities(self, entities: Iterable[Entity]) -> list[Entity]:
        return self._run(self._inner.create_entities(entities))

    def create_relations(self, relations: Iterable[Relation]) -> list[Relation]:
        return self._run(self._inner.create_relations(relations))

    def add_observations(self, observations: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        return self._run(self._inner.add_observations(observations))

    def delete_entities(self, names: Iterable[str]) -> None:
        self._run(self._inner.delete_entities(names))

    def delete_observations(self, observations: Mapping[str, Sequence[str]]) -> None:
        self._run(self._inner.delete_observations(observations))

    def delete_relations(self, relations: Iterable[Relation]) -> None:
        self._run(self._inner.delete_relations(relations))

    def read_graph(self) -> Graph:
        return self._run(self._inner.read_graph())

    def search_nodes(self, query: str) -> Graph:
        return self._run(self._inner.search_nodes(query))

    def open_nodes(self, names: Iterable[str]) -> Graph:
        return self._run(self._inner.open_nodes(names))

    def semantic_search(self, query: str, limit: int = 10, min_score: float | None = None,
                        entity_types: Iterable[str] = ()) -> list[Hit]:
        return self._run(self._inner.semantic_search(query, limit, min_score, entity_types))
