"""`memshift mcp`: the MCP tools over stdio, for clients that launch a command (Claude Desktop), as a thin bridge to
a running proxy. It opens no store and loads no model: every tool call becomes a gRPC Memory call to the proxy (so it
is versioned, dual-written and migrated there), through `RemoteMemory`, which answers like the proxy's own router, so
the tool definitions are the very ones the proxy serves over Streamable HTTP (proxy.transports.mcp_server)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from adapters.model import (
    Entity,
    Graph,
    GraphPage,
    ObservationAddition,
    ObservationDeletion,
    Relation,
    ScoredEntity,
    SearchResult,
)
from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc as pb_grpc
from proxy.transports import convert


class RemoteMemory:
    """The router's memory calls, answered by a proxy over gRPC (domain objects in and out)."""

    def __init__(self, stub: pb_grpc.MemoryStub, token: str | None = None, timeout: float = 30.0) -> None:
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._page_size_refused = False

    async def create_entities(self, scope: str, entities: Sequence[Entity]) -> tuple[Entity, ...]:
        res = await self._stub.CreateEntities(pb.CreateEntitiesRequest(
            scope=scope, entities=[convert.entity_out(e) for e in entities]), metadata=self._metadata,
            timeout=self._timeout)
        return tuple(convert.entity_in(e) for e in res.created)

    async def create_relations(self, scope: str, relations: Sequence[Relation]) -> tuple[Relation, ...]:
        res = await self._stub.CreateRelations(pb.CreateRelationsRequest(
            scope=scope, relations=[convert.relation_out(r) for r in relations]), metadata=self._metadata,
            timeout=self._timeout)
        return tuple(convert.relation_in(r) for r in res.created)

    async def add_observations(self, scope: str,
                               additions: Sequence[ObservationAddition]) -> tuple[ObservationAddition, ...]:
        res = await self._stub.AddObservations(pb.AddObservationsRequest(scope=scope, observations=[
            pb.ObservationAddition(entity_name=a.entity_name, contents=a.contents) for a in additions]),
            metadata=self._metadata, timeout=self._timeout)
        return tuple(ObservationAddition(r.entity_name, tuple(r.added_observations)) for r in res.results)

    async def delete_entities(self, scope: str, names: Sequence[str]) -> None:
        await self._stub.DeleteEntities(pb.DeleteEntitiesRequest(scope=scope, entity_names=names),
                                        metadata=self._metadata, timeout=self._timeout)

    async def delete_observations(self, scope: str, deletions: Sequence[ObservationDeletion]) -> None:
        await self._stub.DeleteObservations(pb.DeleteObservationsRequest(scope=scope, deletions=[
            pb.ObservationDeletion(entity_name=d.entity_name, observations=d.observations) for d in deletions]),
            metadata=self._metadata, timeout=self._timeout)

    async def delete_relations(self, scope: str, relations: Sequence[Relation]) -> None:
        await self._stub.DeleteRelations(pb.DeleteRelationsRequest(
            scope=scope, relations=[convert.relation_out(r) for r in relations]), metadata=self._metadata,
            timeout=self._timeout)

    async def read_graph(self, scope: str, page_size: int, page_token: str) -> GraphPage:
        if self._page_size_refused:
            page_size = 0
        try:
            res = await self._stub.ReadGraph(pb.ReadGraphRequest(scope=scope, page_size=page_size,
                                                                 page_token=page_token),
                                             metadata=self._metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            # The bridge asks for the largest page of its own default limits; a proxy configured with a smaller
            # `limits.max_page_size` refuses it, naming the field. Its own default page size then does.
            if page_size == 0 or exc.code() != grpc.StatusCode.INVALID_ARGUMENT or "page_size" not in (
                    exc.details() or ""):
                raise
            self._page_size_refused = True
            return await self.read_graph(scope, 0, page_token)
        return GraphPage(tuple(convert.entity_in(e) for e in res.entities),
                         tuple(convert.relation_in(r) for r in res.relations), res.next_page_token or None,
                         res.truncated, res.ByteSize())

    async def search_nodes(self, scope: str, query: str) -> Graph:
        return convert.graph_in(await self._stub.SearchNodes(pb.SearchNodesRequest(scope=scope, query=query),
                                                   metadata=self._metadata, timeout=self._timeout))

    async def open_nodes(self, scope: str, names: Sequence[str]) -> Graph:
        return convert.graph_in(await self._stub.OpenNodes(pb.OpenNodesRequest(scope=scope, names=names),
                                                 metadata=self._metadata, timeout=self._timeout))

    async def semantic_search(self, scope: str, query: str, limit: int, min_score: float | None,
                              entity_types: Sequence[str]) -> SearchResult:
        req = pb.SemanticSearchRequest(scope=scope, query=query, limit=limit, entity_types=entity_types)
        if min_score is not None:
            req.min_score = min_score
        res = await self._stub.SemanticSearch(req, metadata=self._metadata, timeout=self._timeout)
        return SearchResult(tuple(ScoredEntity(convert.entity_in(h.entity), h.score) for h in res.results),
                            tuple(convert.relation_in(r) for r in res.relations), res.truncated)


async def run_stdio(target: str, scope: str, token: str | None) -> None:
    """Serve the MCP tools on stdin/stdout until the client closes them."""
    from proxy.runtime.config import Limits
    from proxy.transports.mcp_server import MemoryTools

    async with grpc.aio.insecure_channel(target) as channel:
        tools = MemoryTools(RemoteMemory(pb_grpc.MemoryStub(channel), token), Limits(), None, scope)
        await tools.server.run_stdio_async()
