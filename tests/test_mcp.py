"""The MCP door, driven by the official SDK's own client over Streamable HTTP against a running proxy: the reference
memory server's tools with their names, schemas, annotations and result shapes, errors as `isError` results, scopes
by header, query and token, and writes that a migration carries to the new store like any other."""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import memory_pb2 as pb
from proxy.runtime.config import Limits
from tests.cluster import AUTH, Cluster, boot, run_verify, shutdown, wait_for
from tests.test_migration_e2e import graph_of

REFERENCE_TOOLS = {"create_entities", "create_relations", "add_observations", "delete_entities",
                   "delete_observations", "delete_relations", "read_graph", "search_nodes", "open_nodes"}


@asynccontextmanager
async def mcp_session(c: Cluster, headers: dict[str, str] | None = None,
                      query: str = "") -> AsyncIterator[ClientSession]:
    http = create_mcp_http_client(headers=headers)
    async with http, streamable_http_client(f"http://127.0.0.1:{c.server.mcp_port}/mcp{query}",
                                            http_client=http) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> Any:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    return result.structured_content


async def test_the_reference_tools_with_their_schemas_and_annotations(cluster: Cluster) -> None:
    async with mcp_session(cluster) as s:
        tools = {t.name: t for t in (await s.list_tools()).tools}
        assert set(tools) == REFERENCE_TOOLS | {"semantic_search"}
        entity = tools["create_entities"].input_schema["properties"]["entities"]["items"]
        entity = tools["create_entities"].input_schema.get("$defs", {}).get("EntityIn", entity)
        assert set(entity["properties"]) == {"name", "entityType", "observations"}
        relation = tools["create_relations"].input_schema.get("$defs", {}).get("RelationIn")
        assert relation is not None and set(relation["properties"]) == {"from", "to", "relationType"}
        assert tools["delete_entities"].input_schema["required"] == ["entityNames"]
        for name in ("read_graph", "search_nodes", "open_nodes", "semantic_search"):
            assert tools[name].annotations.read_only_hint is True
            # Built as finished results, the reads still publish what their structured content holds, each item's
            # shape written out in place: a client checking a large answer resolves no reference per item.
            schema = tools[name].output_schema or {}
            assert {"entities", "relations"} <= set(schema.get("properties", {}))
            assert "$ref" not in json.dumps(schema) and "$defs" not in schema
            item = schema["properties"]["entities"]["items"]
            assert {"name", "entityType", "observations"} <= set(item["properties"]) <= set(item["required"]) | {
                "score"}
        for name in ("delete_entities", "delete_observations", "delete_relations"):
            a = tools[name].annotations
            assert a.destructive_hint is True and a.idempotent_hint is True
        assert tools["create_entities"].annotations.read_only_hint is False


async def test_an_agent_session_over_mcp(cluster: Cluster) -> None:
    async with mcp_session(cluster, headers={"Memshift-Scope": "mcp-agent"}) as s:
        made = await call(s, "create_entities", entities=[
            {"name": "alice", "entityType": "person", "observations": ["drinks green tea"]},
            {"name": "paris", "entityType": "city", "observations": []}])
        assert [e["name"] for e in made["entities"]] == ["alice", "paris"]
        rel = await call(s, "create_relations",
                         relations=[{"from": "alice", "to": "paris", "relationType": "lives_in"}])
        assert rel == {"relations": [{"from": "alice", "to": "paris", "relationType": "lives_in"}]}
        added = await call(s, "add_observations", observations=[{"entityName": "alice", "contents": ["flies planes"]}])
        assert added == {"results": [{"entityName": "alice", "addedObservations": ["flies planes"]}]}
        result = await s.call_tool("read_graph", {})
        graph = json.loads(result.content[0].text)  # the JSON text content, as the reference server sends
        assert graph == result.structured_content
        assert {e["name"] for e in graph["entities"]} == {"alice", "paris"} and len(graph["relations"]) == 1
        found = await call(s, "search_nodes", query="TEA")
        assert [e["name"] for e in found["entities"]] == ["alice"] and len(found["relations"]) == 1
        opened = await call(s, "open_nodes", names=["paris"])
        assert [e["name"] for e in opened["entities"]] == ["paris"]
        hits = await call(s, "semantic_search", query="who pilots aircraft?", limit=1)
        assert hits["entities"][0]["name"] == "alice" and 0 < hits["entities"][0]["score"] <= 1
        assert await call(s, "delete_observations", deletions=[{"entityName": "alice",
                                                                  "observations": ["drinks green tea"]}]) == \
            {"success": True, "message": "Observations deleted successfully"}
        await call(s, "delete_relations", relations=[{"from": "alice", "to": "paris", "relationType": "lives_in"}])
        await call(s, "delete_entities", entityNames=["paris"])
        await call(s, "create_entities", entities=[])  # an empty list is a no-op, as in the reference server
        assert [e["name"] for e in (await call(s, "read_graph"))["entities"]] == ["alice"]
        resource = await s.read_resource("memory://knowledge-graph")  # the caller's scope, from its header
        assert [e["name"] for e in json.loads(resource.contents[0].text)["entities"]] == ["alice"]
    # The same memory over gRPC: one router behind both doors.
    graph = await cluster.memory.OpenNodes(pb.OpenNodesRequest(scope="mcp-agent", names=["alice"]))
    assert list(graph.entities[0].observations) == ["flies planes"]


async def test_a_callers_error_is_an_error_result_naming_the_field_and_the_session_goes_on(cluster: Cluster) -> None:
    async with mcp_session(cluster) as s:
        bad = await s.call_tool("create_entities", {"entities": [{"name": "", "entityType": "t", "observations": []}]})
        assert bad.is_error and "entities[0].name: must not be empty" in bad.content[0].text
        missing = await s.call_tool("add_observations", {"observations": [{"entityName": "ghost", "contents": ["x"]}]})
        assert missing.is_error and "NOT_FOUND" in missing.content[0].text and "ghost" in missing.content[0].text
        nul = await s.call_tool("create_entities", {"entities": [{"name": "a", "entityType": "t",
                                                                   "observations": ["nul \x00 here"]}]})
        assert nul.is_error and "entities[0].observations[0]: must not contain NUL" in nul.content[0].text
        assert (await call(s, "read_graph"))["entities"] == []  # nothing half-stored; the session still works


async def test_the_knowledge_graph_resource_reads_the_named_scope(cluster: Cluster) -> None:
    await cluster.memory.CreateEntities(pb.CreateEntitiesRequest(scope="res", entities=[
        pb.Entity(name="r1", entity_type="t")]))
    async with mcp_session(cluster) as s:
        resource = await s.read_resource("memory://knowledge-graph?scope=res")
        assert [e["name"] for e in json.loads(resource.contents[0].text)["entities"]] == ["r1"]
        assert json.loads((await s.read_resource("memory://knowledge-graph")).contents[0].text)["entities"] == []


async def test_scopes_by_header_query_and_default_never_mix(cluster: Cluster) -> None:
    for headers, query, scope in (({"Memshift-Scope": "by-header"}, "", "by-header"),
                                  (None, "?scope=by-query", "by-query"), (None, "", "default")):
        async with mcp_session(cluster, headers=headers, query=query) as s:
            await call(s, "create_entities", entities=[{"name": f"in-{scope}", "entityType": "t", "observations": []}])
    for scope in ("by-header", "by-query", "default"):
        graph = await cluster.memory.ReadGraph(pb.ReadGraphRequest(scope=scope))
        assert [e.name for e in graph.entities] == [f"in-{scope}"]


async def test_the_memory_services_tokens_apply_to_mcp(embedder: BatchingEmbedder, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("token-of-agent-a-0123456789 agent-a\n")
    c = await boot(embedder, tmp_path, memory_tokens_file=str(tokens))
    try:
        good = {"Authorization": "Bearer token-of-agent-a-0123456789"}
        async with mcp_session(c, headers={**good, "Memshift-Scope": "agent-a"}) as s:
            await call(s, "create_entities", entities=[{"name": "x", "entityType": "t", "observations": []}])
        async with mcp_session(c, headers={**good, "Memshift-Scope": "agent-b"}) as s:
            denied = await s.call_tool("read_graph", {})
            assert denied.is_error and "PERMISSION_DENIED" in denied.content[0].text
        async with mcp_session(c, headers={"Memshift-Scope": "agent-a"}) as s:
            missing = await s.call_tool("read_graph", {})
            assert missing.is_error and "UNAUTHENTICATED" in missing.content[0].text
    finally:
        await shutdown(c)


async def test_mcp_writes_during_a_migration_reach_both_stores(cluster: Cluster, embedder: BatchingEmbedder) -> None:
    await cluster.admin.StartMigration(apb.StartMigrationRequest(target=cluster.target), metadata=AUTH)
    async with mcp_session(cluster, headers={"Memshift-Scope": "mcp-mig"}) as s:
        for i in range(20):
            await call(s, "create_entities", entities=[{"name": f"n{i}", "entityType": "note",
                                                        "observations": [f"fact {i}"]}])
        await call(s, "delete_entities", entityNames=["n3"])
        await wait_for(cluster, lambda st: st.backfill.complete and st.repair_queue_depth == 0)
    assert (await run_verify(cluster)).differences == 0
    for name in ("old.db", "new.db"):
        direct = EmbeddedBackend(cluster.dir / name, embedder)
        await direct.open()
        try:
            ents, _ = await graph_of(direct, "mcp-mig")
            assert set(ents) == {f"n{i}" for i in range(20)} - {"n3"}, name
        finally:
            await direct.close()


async def test_memshift_mcp_over_stdio_is_a_bridge_to_the_running_proxy(cluster: Cluster) -> None:
    """The stdio transport, as Claude Desktop launches it: `memshift mcp` opens no store; its tool calls are the
    proxy's gRPC calls, so they land where every other write lands."""
    params = StdioServerParameters(command=sys.executable, args=[
        "-m", "proxy.cli", "mcp", "--target", f"127.0.0.1:{cluster.server.port}", "--scope", "via-stdio"],
        env={**os.environ})
    async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        assert {t.name for t in (await s.list_tools()).tools} == REFERENCE_TOOLS | {"semantic_search"}
        await call(s, "create_entities", entities=[{"name": "bob", "entityType": "person",
                                                    "observations": ["plays chess"]}])
        found = await call(s, "search_nodes", query="CHESS")
        assert [e["name"] for e in found["entities"]] == ["bob"]
        bad = await s.call_tool("add_observations", {"observations": [{"entityName": "ghost", "contents": ["x"]}]})
        assert bad.is_error and "NOT_FOUND" in bad.content[0].text
    graph = await cluster.memory.ReadGraph(pb.ReadGraphRequest(scope="via-stdio"))
    assert [e.name for e in graph.entities] == ["bob"]


async def test_a_whole_graph_larger_than_the_clients_event_limit_reads_over_http(cluster: Cluster) -> None:
    """The official Python client refuses a server-sent event over 1 MiB; a `read_graph` of a few thousand entities
    is larger than that. Answers come as JSON bodies, which it reads whatever their size."""
    notes = [f"note {i}: " + "x" * 8_000 for i in range(180)]  # about 1.45 MB of observations
    async with mcp_session(cluster, headers={"Memshift-Scope": "mcp-large"}) as s:
        for start in range(0, len(notes), 40):
            await call(s, "create_entities", entities=[{"name": f"big-{i}", "entityType": "note", "observations": [n]}
                                                       for i, n in enumerate(notes) if start <= i < start + 40])
        graph = await call(s, "read_graph")
    assert sorted(o for e in graph["entities"] for o in e["observations"]) == sorted(notes)


async def test_the_stdio_bridge_reads_a_whole_graph_from_a_proxy_with_smaller_pages(
        embedder: BatchingEmbedder, tmp_path: Path) -> None:
    """`memshift mcp` asks for the largest page its own default limits allow; a proxy configured with a smaller
    `max_page_size` refuses that (naming the field), and the bridge pages with the proxy's default instead: the
    whole graph still arrives, in the store's order, matching the reference server's answer shape."""
    c = await boot(embedder, tmp_path, limits=Limits(max_page_size=50, default_page_size=20))
    try:
        names = [f"n{i:03d}" for i in range(130)]
        for start in range(0, len(names), 50):
            await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope="small-pages", entities=[
                pb.Entity(name=n, entity_type="t", observations=[f"about {n}"]) for n in names[start:start + 50]]))
        await c.memory.CreateRelations(pb.CreateRelationsRequest(scope="small-pages", relations=[
            pb.Relation(**{"from": a}, to=b, relation_type="next") for a, b in itertools.pairwise(names)]))
        params = StdioServerParameters(command=sys.executable, args=[
            "-m", "proxy.cli", "mcp", "--target", f"127.0.0.1:{c.server.port}", "--scope", "small-pages"],
            env={**os.environ})
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            result = await s.call_tool("read_graph", {})
        assert not result.is_error, result.content
        graph = result.structured_content
        assert graph is not None and "truncated" not in graph
        assert [e["name"] for e in graph["entities"]] == names
        assert [e["observations"] for e in graph["entities"]] == [[f"about {n}"] for n in names]
        assert len(graph["relations"]) == len(names) - 1
        assert json.loads(result.content[0].text) == graph  # the text and the structured content agree
    finally:
        await shutdown(c)
