"""MCP, exactly: what an MCP client sees from Memshift is what it sees from the reference memory server
(`@modelcontextprotocol/server-memory`, run by Node.js next to the proxy), tool by tool, text and structured content
alike; the knowledge-graph resource is listed as the reference lists it; and no answer outgrows the message limit."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from adapters.embedder import BatchingEmbedder
from memshift.v1 import memory_pb2 as pb
from proxy.runtime.config import Limits
from tests.cluster import Cluster, boot, shutdown

ALICE = {"name": "alice", "entityType": "person", "observations": ['drinks "green" tea', "lives in Paris"]}
# Every tool, with the cases whose answers differ: things already there skipped, unknown names, unicode and quotes in
# the text. Names and relations are created in the order a store lists them, so whole-graph answers compare exactly.
SCRIPT: list[tuple[str, dict[str, Any]]] = [
    ("create_entities", {"entities": [ALICE, {"name": "bob", "entityType": "person", "observations": ["plays chess"]},
                                      {"name": "café", "entityType": "place", "observations": []}]}),
    ("create_entities", {"entities": [ALICE, {"name": "dora", "entityType": "dog",
                                              "observations": ["barks\nloudly"]}]}),
    ("create_entities", {"entities": []}),
    ("create_relations", {"relations": [{"from": "alice", "to": "bob", "relationType": "knows"},
                                        {"from": "bob", "to": "café", "relationType": "visits"}]}),
    ("create_relations", {"relations": [{"from": "alice", "to": "bob", "relationType": "knows"},
                                        {"from": "café", "to": "dora", "relationType": "hosts"}]}),
    ("add_observations", {"observations": [{"entityName": "alice", "contents": ["lives in Paris", "plays piano"]},
                                           {"entityName": "café", "contents": ["serves crème brûlée"]}]}),
    ("read_graph", {}),
    ("search_nodes", {"query": "PARIS"}),
    ("search_nodes", {"query": "nothing matches this"}),
    ("open_nodes", {"names": ["bob", "nobody"]}),
    ("delete_observations", {"deletions": [{"entityName": "alice", "observations": ["plays piano", "never said"]}]}),
    ("delete_relations", {"relations": [{"from": "alice", "to": "bob", "relationType": "knows"}]}),
    ("delete_entities", {"entityNames": ["dora", "ghost"]}),
    ("read_graph", {}),
]
Session = Callable[[], Any]


def seen(result: Any) -> dict[str, Any]:
    """Everything of a tool's answer a client can look at."""
    return {"isError": bool(result.is_error), "content": [c.model_dump(by_alias=True) for c in result.content],
            "structuredContent": result.structured_content}


async def run_script(session: ClientSession) -> list[dict[str, Any]]:
    return [seen(await session.call_tool(tool, arguments)) for tool, arguments in SCRIPT]


@asynccontextmanager
async def reference(entry: Path, tmp_path: Path) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command="node", args=[str(entry)],
                                   env={**os.environ, "MEMORY_FILE_PATH": str(tmp_path / "reference.jsonl")})
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@asynccontextmanager
async def over_http(c: Cluster, scope: str,
                    on_response: Callable[[httpx.Response], Awaitable[None]] | None = None
                    ) -> AsyncIterator[ClientSession]:
    http = create_mcp_http_client(headers={"Memshift-Scope": scope})
    if on_response is not None:
        http.event_hooks["response"].append(on_response)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(http)
        read, write = await stack.enter_async_context(
            streamable_http_client(f"http://127.0.0.1:{c.server.mcp_port}/mcp", http_client=http))
        session = await stack.enter_async_context(ClientSession(read, write))
        await session.initialize()
        yield session


@asynccontextmanager
async def over_stdio(c: Cluster, scope: str) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=sys.executable, args=[
        "-m", "proxy.cli", "mcp", "--target", f"127.0.0.1:{c.server.port}", "--scope", scope], env={**os.environ})
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def test_every_tool_answers_as_the_reference_server_does_through_both_doors(
        cluster: Cluster, reference_server: Path, tmp_path: Path) -> None:
    async with reference(reference_server, tmp_path) as s:
        theirs = await run_script(s)
    assert theirs[0]["content"][0]["text"].startswith("[\n  {")  # the JSON of the array itself, indented by two
    async with over_http(cluster, "exact-http") as s:
        by_http = await run_script(s)
    async with over_stdio(cluster, "exact-stdio") as s:
        by_stdio = await run_script(s)
    for (tool, arguments), want, http, stdio in zip(SCRIPT, theirs, by_http, by_stdio, strict=True):
        assert http == want, (tool, arguments)
        assert stdio == want, (tool, arguments)


async def test_the_knowledge_graph_resource_is_listed_as_the_reference_lists_it(
        cluster: Cluster, reference_server: Path, tmp_path: Path) -> None:
    async with reference(reference_server, tmp_path) as s:
        theirs = {r.uri: r for r in (await s.list_resources()).resources}
    await cluster.memory.CreateEntities(pb.CreateEntitiesRequest(scope="listed", entities=[
        pb.Entity(name="x", entity_type="t")]))
    for opened in (over_http(cluster, "listed"), over_stdio(cluster, "listed")):
        async with opened as s:
            ours = {r.uri: r for r in (await s.list_resources()).resources}
            assert set(ours) == set(theirs) == {"memory://knowledge-graph"}
            mine, reference_one = ours["memory://knowledge-graph"], theirs["memory://knowledge-graph"]
            fields = ("name", "title", "description", "mime_type")
            assert [getattr(mine, f) for f in fields] == [getattr(reference_one, f) for f in fields]
            # Read as listed, it is the caller's own scope (named by its header, or by the bridge's --scope).
            text = (await s.read_resource("memory://knowledge-graph")).contents[0].text
            assert '"name": "x"' in text
            templates = (await s.list_resource_templates()).resource_templates
            assert [t.uri_template for t in templates] == ["memory://knowledge-graph{?scope}"]


# --- answers within the message limit -------------------------------------------------------------------------------
SMALL = 128 * 1024
_scopes = itertools.count()


@pytest.fixture
async def small(embedder: BatchingEmbedder, tmp_path: Path) -> AsyncIterator[Cluster]:
    # Relation types up to 1,000 characters: a few hundred such relations outgrow the limit between two entities.
    c = await boot(embedder, tmp_path, limits=Limits(max_message_bytes=SMALL, max_type_chars=1000))
    yield c
    await shutdown(c)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(sizes=st.lists(st.integers(0, 24_000), min_size=1, max_size=8),
       relation_bytes=st.lists(st.integers(1, 900), max_size=120), quotes=st.booleans())
async def test_no_mcp_answer_outgrows_the_message_limit_and_read_graph_pages_on_to_the_end(
        small: Cluster, sizes: list[int], relation_bytes: list[int], quotes: bool) -> None:
    """Large entities and many large relations (each relation type up to 900 bytes): every HTTP body stays within
    `limits.max_message_bytes`; a cut answer says so and its `nextCursor` reads on, so the pages hold the whole
    graph, each item once, in order."""
    scope = f"mcp-fit-{next(_scopes)}"
    fill = '"\\' if quotes else "y"  # quotes and backslashes grow when escaped inside the text content
    names = [f"e{i:02d}" for i in range(len(sizes))]
    observations = [[f"o{k} {fill * (min(8000, n - k * 8000) // len(fill))}" for k in range(-(-n // 8000))]
                    for n in sizes]
    for name, obs in zip(names, observations, strict=True):
        await small.memory.CreateEntities(pb.CreateEntitiesRequest(scope=scope, entities=[
            pb.Entity(name=name, entity_type="t", observations=obs)]))
    relations = sorted({(names[i % len(names)], f"r{i:03d} " + "z" * n, names[(i * 7 + 1) % len(names)])
                        for i, n in enumerate(relation_bytes)})
    for start in range(0, len(relations), 40):
        await small.memory.CreateRelations(pb.CreateRelationsRequest(scope=scope, relations=[
            pb.Relation(**{"from": a}, to=b, relation_type=t) for a, t, b in relations[start:start + 40]]))
    bodies: list[int] = []

    async def measure(response: httpx.Response) -> None:
        await response.aread()
        bodies.append(len(response.content))

    async with over_http(small, scope, measure) as s:
        entities: list[dict[str, Any]] = []
        rels: list[tuple[str, str, str]] = []
        notes: list[str] = []
        cursor = ""
        for _ in range(200):
            result = await s.call_tool("read_graph", {"cursor": cursor} if cursor else {})
            assert not result.is_error, result.content
            page = result.structured_content
            assert page is not None
            entities += page["entities"]
            rels += [(r["from"], r["relationType"], r["to"]) for r in page["relations"]]
            assert ("truncated" in page) == ("nextCursor" in page)
            cursor = page.get("nextCursor", "")
            if not cursor:
                break
            assert "call read_graph with cursor set to nextCursor" in page["truncated"]
            notes.append(page["truncated"])
        assert [e["name"] for e in entities] == names
        for name, got, stored in zip(names, entities, observations, strict=True):
            # An entity larger than a whole answer (quotes double when escaped, twice) comes with the observations
            # that fit, and the answer names it; every other arrives whole.
            if got["observations"] != stored:
                assert stored[:len(got["observations"])] == got["observations"]
                assert any(f"entity {name!r} is larger than one answer may carry" in n for n in notes)
        assert rels == relations
        bad = await s.call_tool("read_graph", {"cursor": "not-a-cursor"})
        assert bad.is_error and "INVALID_ARGUMENT: cursor: is not a nextCursor returned by read_graph" in \
            bad.content[0].text
        for tool, arguments in (("search_nodes", {"query": "e"}), ("open_nodes", {"names": names})):
            answer = (await s.call_tool(tool, arguments)).structured_content
            assert answer is not None
            whole = ([e["observations"] for e in answer["entities"]] == observations
                     and len(answer["relations"]) == len(relations))
            assert ("truncated" in answer) != whole  # cut exactly when something was left out, and then says so
    assert bodies and max(bodies) <= SMALL
