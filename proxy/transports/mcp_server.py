"""The MCP door: the reference memory server's tools over Streamable HTTP, served by the proxy itself, calling the
same router as the gRPC servicer (so every MCP write is versioned, dual-written and migrated like any other).

Tools keep the reference server's names, input schemas, result shapes (JSON text and structured content) and
annotations, plus `semantic_search`, and the `memory://knowledge-graph` resource. The scope comes
from the `Memshift-Scope` header, else a `?scope=` query parameter, else the configured default; with a tokens file,
the bearer token in `Authorization` must grant it (proxy/transports/auth.py). An error the caller caused is a tool
result with `isError`, naming the field, and the session goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Protocol, cast

import grpc
import orjson
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.types import CallToolResult, Resource, TextContent, ToolAnnotations
from typing_extensions import TypedDict

from adapters.errors import InvalidInput
from adapters.model import (
    Entity,
    Graph,
    GraphPage,
    ObservationAddition,
    ObservationDeletion,
    Relation,
    SearchResult,
)
from adapters.records import Kind, encode_cursor
from proxy.formats.jsonl import EntityIn, RelationIn, entity_dict, entity_of, relation_dict, relation_of
from proxy.runtime.config import Limits
from proxy.transports.auth import ScopeTokens
from proxy.transports.fit import budget, json_item_size, shrink_json_item
from proxy.transports.servicer import status_for

log = logging.getLogger("memshift.mcp")
RESOURCE_URI = "memory://knowledge-graph"


class MemoryApi(Protocol):
    """What the tools call: the proxy's own router, or (`memshift mcp`) a running proxy over gRPC."""

    async def create_entities(self, scope: str, entities: Sequence[Entity]) -> tuple[Entity, ...]: ...

    async def create_relations(self, scope: str, relations: Sequence[Relation]) -> tuple[Relation, ...]: ...

    async def add_observations(self, scope: str,
                               additions: Sequence[ObservationAddition]) -> tuple[ObservationAddition, ...]: ...

    async def delete_entities(self, scope: str, names: Sequence[str]) -> None: ...

    async def delete_observations(self, scope: str, deletions: Sequence[ObservationDeletion]) -> None: ...

    async def delete_relations(self, scope: str, relations: Sequence[Relation]) -> None: ...

    async def read_graph(self, scope: str, page_size: int, page_token: str) -> GraphPage: ...

    async def search_nodes(self, scope: str, query: str) -> Graph: ...

    async def open_nodes(self, scope: str, names: Sequence[str]) -> Graph: ...

    async def semantic_search(self, scope: str, query: str, limit: int, min_score: float | None,
                              entity_types: Sequence[str]) -> SearchResult: ...


class AdditionIn(TypedDict):
    entityName: str
    contents: list[str]


class DeletionIn(TypedDict):
    entityName: str
    observations: list[str]


class AddedOut(TypedDict):
    entityName: str
    addedObservations: list[str]


class EntitiesOut(TypedDict):
    entities: list[EntityIn]


class RelationsOut(TypedDict):
    relations: list[RelationIn]


class ResultsOut(TypedDict):
    results: list[AddedOut]


class DoneOut(TypedDict):
    success: bool
    message: str


class GraphOut(TypedDict, total=False):
    entities: list[EntityIn]
    relations: list[RelationIn]
    truncated: str  # Memshift's: set only when the answer was cut to fit the message limit
    nextCursor: str  # Memshift's, read_graph only: where a cut answer resumes (its `cursor` argument)


class ScoredOut(TypedDict):
    name: str
    entityType: str
    observations: list[str]
    score: float


class SearchOut(TypedDict, total=False):
    entities: list[ScoredOut]
    relations: list[RelationIn]
    truncated: str


def _graph(g: Graph, room: int) -> GraphOut:
    return cast(GraphOut, fit_answer({"entities": [entity_dict(e) for e in g.entities],
                                      "relations": [relation_dict(r) for r in g.relations]}, g.truncated, room))


def _oversized(name: str, sent: int, held: int) -> str:
    return (f"entity {name!r} is larger than one answer may carry; it is sent with {sent} of its {held} "
            "observations")


def fit_answer(out: dict[str, Any], truncated: str, room: int) -> dict[str, Any]:
    """An unpaged read's answer (`entities`, `relations`) cut where the next item would take it past `room` bytes as
    MCP sends it (every item twice: text and structured content); relations of entities left out go too. The store's
    answer was cut by gRPC's measure, which counts each item once."""
    used, kept = 0, 0
    for item in out["entities"]:
        size = json_item_size(item)
        if used + size > room:
            break
        used += size
        kept += 1
    entities = out["entities"][:kept]
    if not entities and out["entities"]:  # the first alone is larger than an answer: what fits of it
        first = out["entities"][0]
        entities = [shrink_json_item(first, room)]
        used, kept = json_item_size(entities[0]), 1
        truncated = _oversized(first["name"], len(entities[0]["observations"]), len(first["observations"]))
    names = {e["name"] for e in entities}
    relations = []
    for rel in out["relations"]:
        if kept < len(out["entities"]) and rel["from"] not in names and rel["to"] not in names:
            continue
        size = json_item_size(rel)
        if used + size > room:
            break
        used += size
        relations.append(rel)
    if not truncated.startswith("entity ") and (len(entities) < len(out["entities"])
                                                or len(relations) < len(out["relations"])):
        truncated = (f"answer cut at the message limit ({room} bytes): {len(entities)} of {len(out['entities'])} "
                     f"entities and {len(relations)} relations sent; narrow the query, open fewer names at a time, "
                     "or page with read_graph")
    fitted = {**out, "entities": entities, "relations": relations}
    if truncated:
        fitted["truncated"] = truncated
    return fitted


def json_text(out: Mapping[str, Any] | list[Any]) -> str:
    """The JSON text of an answer, indented by two like the reference server's `JSON.stringify(graph, null, 2)`.
    orjson: the standard library's encoder falls back to pure Python when asked to indent (26 of the HTTP door's
    137 ms in a 5,000-entity `read_graph`)."""
    return orjson.dumps(out, option=orjson.OPT_INDENT_2).decode()


def _answer(out: Mapping[str, Any], text: str | None = None) -> CallToolResult:
    """A tool's answer as the reference server builds it: `text` (by default the JSON of `out`) as the text content
    and `out` as the structured content, built once. Handed a `CallToolResult`, the MCP server does not convert it
    again by alias and dump it a second time (60 of the stdio bridge's milliseconds in a 5,000-entity `read_graph`)."""
    return CallToolResult(content=[TextContent(type="text", text=json_text(out) if text is None else text)],
                          structured_content=dict(out))


def _listed(key: str, items: list[Any]) -> CallToolResult:
    """A write's answer: the reference's text is the JSON of the array itself, its structured content `{key: ...}`."""
    return _answer({key: items}, json_text(items))


def _done(message: str) -> CallToolResult:
    """A delete's answer: the reference's text is the bare message, its structured content `{success, message}`."""
    return _answer({"success": True, "message": message}, message)


def inline_definitions(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with every local `$ref` replaced by the definition it names, and no `$defs`. A client that checks
    results against the output schema (the official Python client does, with jsonschema) resolves a reference for
    every item: a fifth of its time checking a 5,000-entity graph. The tools' types are not recursive."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return cast(dict[str, Any], walk(schema))


WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
DELETE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False)
READ = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)


GRAPH_TITLE, GRAPH_DESCRIPTION = "Knowledge Graph", "The full knowledge graph with all entities and relations"


class _ListedGraphServer(MCPServer[Any]):
    """Lists `memory://knowledge-graph` as the reference server does. It is served by the `{?scope}` template (which
    matches it with no scope): only a template's function sees the request, and so the caller's scope header."""

    async def list_resources(self) -> list[Resource]:
        return [*await super().list_resources(), Resource(uri=RESOURCE_URI, name="knowledge-graph", title=GRAPH_TITLE,
                                                            description=GRAPH_DESCRIPTION,
                                                            mime_type="application/json")]


class MemoryTools:
    """The tools, bound to a router; `server` is the MCPServer that serves them."""

    def __init__(self, router: MemoryApi, limits: Limits, tokens: ScopeTokens | None, default_scope: str) -> None:
        self._router = router
        self._limits = limits
        self._tokens = tokens
        self._default_scope = default_scope
        self._room = budget(limits.max_message_bytes)
        self.server = self._build()

    def scope(self, ctx: Context[Any, Any] | None, named: str = "") -> str:
        """The caller's scope (header, a scope the call names, query parameter, default), checked against its token
        when tokens are on."""
        headers = {k.lower(): v for k, v in ((ctx.headers if ctx is not None else None) or {}).items()}
        request = ctx.request_context.request if ctx is not None else None
        query = getattr(request, "query_params", None) or {}
        scope = headers.get("memshift-scope") or named or query.get("scope") or self._default_scope
        if self._tokens is not None:
            self._tokens.check(headers.get("authorization"), scope)
        return str(scope)

    async def _call(self, ctx: Context[Any, Any] | None, run: Any, named: str = "") -> Any:
        try:
            return await run(self.scope(ctx, named))
        except grpc.aio.AioRpcError as exc:  # `memshift mcp`: the proxy's own status and message
            raise ToolError(f"{exc.code().name}: {exc.details()}") from None
        except Exception as exc:
            mapped = status_for(exc)
            if mapped is None:
                raise
            raise ToolError(f"{mapped[0].name}: {mapped[1]}") from None

    async def read_whole_graph(self, scope: str, cursor: str = "") -> GraphOut:
        """The whole graph (from `cursor` on), as the reference server answers it, but never beyond the message
        limit: items are taken one by one while the answer, measured as it is sent (twice, as text and as structured
        content), still fits; where it stops, `truncated` says what was sent and `nextCursor` resumes right after the
        last item sent."""
        room = self._room
        entities: list[EntityIn] = []
        relations: list[RelationIn] = []
        used, token, last = 0, cursor, ""
        while True:
            try:
                page = await self._router.read_graph(scope, self._limits.max_page_size, token)
            except InvalidInput as exc:
                if exc.field != "page_token":
                    raise
                raise InvalidInput("cursor", "is not a nextCursor returned by read_graph") from None
            for ent in page.entities:
                item = entity_dict(ent)
                size = json_item_size(item)
                if used + size > room:
                    if last:
                        return self._cut(entities, relations, room, last)
                    # Alone larger than an answer (stored before `max_entity_bytes` was this small): what fits of it.
                    shrunk = cast(EntityIn, shrink_json_item(dict(item), room))
                    return self._cut([shrunk], [], room, encode_cursor(Kind.ENTITY, (ent.name,)),
                                     _oversized(ent.name, len(shrunk["observations"]), len(ent.observations)))
                used += size
                entities.append(item)
                last = encode_cursor(Kind.ENTITY, (ent.name,))
            for rel in page.relations:
                item_r = relation_dict(rel)
                size = json_item_size(item_r)
                if used + size > room and last:
                    return self._cut(entities, relations, room, last)
                used += size
                relations.append(item_r)
                last = encode_cursor(Kind.RELATION, rel.key)
            token = page.next_cursor or ""
            if not token:
                return {"entities": entities, "relations": relations}

    @staticmethod
    def _cut(entities: list[EntityIn], relations: list[RelationIn], room: int, resume: str,
             note: str = "") -> GraphOut:
        return {"entities": entities, "relations": relations, "nextCursor": resume,
                "truncated": f"{note or 'the graph is larger than one answer may carry'} ({room} bytes): "
                             f"{len(entities)} entities and {len(relations)} relations sent; call read_graph with "
                             "cursor set to nextCursor for the rest (or page with the gRPC ReadGraph call)"}

    def _build(self) -> MCPServer[Any]:
        mcp: MCPServer[Any] = _ListedGraphServer(name="memshift", instructions="Knowledge-graph memory (the MCP memory "
                                        "server's tools) served by Memshift, with semantic search.")
        router = self._router

        @mcp.tool(title="Create Entities", description="Create multiple new entities in the knowledge graph",
                  annotations=WRITE)
        async def create_entities(entities: list[EntityIn],
                                  ctx: Context[Any, Any]) -> Annotated[CallToolResult, EntitiesOut]:
            made = await self._call(ctx, lambda s: router.create_entities(
                s, [entity_of(e) for e in entities]))
            return _listed("entities", [entity_dict(e) for e in made])

        @mcp.tool(title="Create Relations", description="Create multiple new relations between entities in the "
                  "knowledge graph. Relations should be in active voice", annotations=WRITE)
        async def create_relations(relations: list[RelationIn],
                                   ctx: Context[Any, Any]) -> Annotated[CallToolResult, RelationsOut]:
            made = await self._call(ctx, lambda s: router.create_relations(
                s, [relation_of(r) for r in relations]))
            return _listed("relations", [relation_dict(r) for r in made])

        @mcp.tool(title="Add Observations", description="Add new observations to existing entities in the knowledge "
                  "graph", annotations=WRITE)
        async def add_observations(observations: list[AdditionIn],
                                   ctx: Context[Any, Any]) -> Annotated[CallToolResult, ResultsOut]:
            added = await self._call(ctx, lambda s: router.add_observations(
                s, [ObservationAddition(a["entityName"], tuple(a["contents"])) for a in observations]))
            return _listed("results", [{"entityName": a.entity_name, "addedObservations": list(a.contents)}
                                       for a in added])

        @mcp.tool(title="Delete Entities", description="Delete multiple entities and their associated relations "
                  "from the knowledge graph", annotations=DELETE)
        async def delete_entities(entityNames: list[str],
                                  ctx: Context[Any, Any]) -> Annotated[CallToolResult, DoneOut]:
            await self._call(ctx, lambda s: router.delete_entities(s, entityNames))
            return _done("Entities deleted successfully")

        @mcp.tool(title="Delete Observations", description="Delete specific observations from entities in the "
                  "knowledge graph", annotations=DELETE)
        async def delete_observations(deletions: list[DeletionIn],
                                      ctx: Context[Any, Any]) -> Annotated[CallToolResult, DoneOut]:
            await self._call(ctx, lambda s: router.delete_observations(
                s, [ObservationDeletion(d["entityName"], tuple(d["observations"])) for d in deletions]))
            return _done("Observations deleted successfully")

        @mcp.tool(title="Delete Relations", description="Delete multiple relations from the knowledge graph",
                  annotations=DELETE)
        async def delete_relations(relations: list[RelationIn],
                                   ctx: Context[Any, Any]) -> Annotated[CallToolResult, DoneOut]:
            await self._call(ctx, lambda s: router.delete_relations(
                s, [relation_of(r) for r in relations]))
            return _done("Relations deleted successfully")

        @mcp.tool(title="Read Graph", description="Read the entire knowledge graph", annotations=READ)
        async def read_graph(ctx: Context[Any, Any], cursor: str = "") -> Annotated[CallToolResult, GraphOut]:
            # `cursor` is Memshift's: a graph larger than one answer is cut, and `nextCursor` resumes it here.
            return _answer(await self._call(ctx, lambda s: self.read_whole_graph(s, cursor)))

        @mcp.tool(title="Search Nodes", description="Search for nodes in the knowledge graph based on a query",
                  annotations=READ)
        async def search_nodes(query: str, ctx: Context[Any, Any]) -> Annotated[CallToolResult, GraphOut]:
            return _answer(_graph(await self._call(ctx, lambda s: router.search_nodes(s, query)), self._room))

        @mcp.tool(title="Open Nodes", description="Open specific nodes in the knowledge graph by their names",
                  annotations=READ)
        async def open_nodes(names: list[str], ctx: Context[Any, Any]) -> Annotated[CallToolResult, GraphOut]:
            return _answer(_graph(await self._call(ctx, lambda s: router.open_nodes(s, names)), self._room))

        @mcp.tool(title="Semantic Search", description="Find the entities whose meaning is closest to a query "
                  "(embedding similarity), with scores and the relations touching them", annotations=READ)
        async def semantic_search(query: str, ctx: Context[Any, Any], limit: int = 10,
                                  minScore: float | None = None,
                                  entityType: str | None = None) -> Annotated[CallToolResult, SearchOut]:
            found = await self._call(ctx, lambda s: router.semantic_search(
                s, query, limit, minScore, [entityType] if entityType else []))
            return _answer(fit_answer({
                "entities": [{**entity_dict(h.entity), "score": float(h.score)} for h in found.results],
                "relations": [relation_dict(r) for r in found.relations]}, found.truncated, self._room))

        # The reference server's resource. A template, so that a read gets the request (its scope header) and may
        # name a scope itself: `memory://knowledge-graph` reads the caller's scope, `...?scope=x` scope x.
        @mcp.resource(RESOURCE_URI + "{?scope}", name="knowledge-graph-of-scope", title=GRAPH_TITLE,
                      description=GRAPH_DESCRIPTION + " of the scope named (the caller's own without one)",
                      mime_type="application/json")
        async def knowledge_graph(ctx: Context[Any, Any], scope: str = "") -> str:
            try:
                graph = await self._call(ctx, self.read_whole_graph, scope)
            except ToolError as exc:
                raise ResourceError(str(exc)) from None
            return json_text(graph)

        # No public setter; the server reads this metadata live on every call.
        for tool in mcp._tool_manager.list_tools():
            if tool.fn_metadata.output_schema is not None:
                tool.fn_metadata.output_schema = inline_definitions(tool.fn_metadata.output_schema)
            # Every answer is built from typed domain objects by `_answer`; the server's own pass over it with
            # pydantic found nothing those types allow and cost 12 ms a 5,000-entity graph. The schema stays
            # published (clients check results against it; the tests do so through the official client).
            tool.fn_metadata.output_model = None
        return mcp
