"""The Python client for agents against a running proxy: typed results, the scope bound once, errors as exceptions
named after their status, tokens, and the synchronous client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters.embedder import BatchingEmbedder
from memshift import AsyncClient, Client, Entity, InvalidArgument, NotFound, PermissionDenied, Relation, Unavailable
from tests.cluster import Cluster, boot, shutdown
from tests.servers import free_port


async def test_an_agent_session_with_the_async_client(cluster: Cluster) -> None:
    async with AsyncClient(f"127.0.0.1:{cluster.server.port}", scope="client-agent") as memory:
        made = await memory.create_entities([Entity("alice", "person", ["drinks green tea"]), Entity("paris", "city")])
        assert [e.name for e in made] == ["alice", "paris"]
        assert await memory.create_relations([Relation("alice", "paris", "lives_in")]) == \
            [Relation("alice", "paris", "lives_in")]
        assert await memory.add_observations({"alice": ["flies planes", "drinks green tea"]}) == \
            {"alice": ["flies planes"]}
        graph = await memory.read_graph()
        assert {e.name for e in graph.entities} == {"alice", "paris"} and len(graph.relations) == 1
        assert [e.name for e in (await memory.search_nodes("TEA")).entities] == ["alice"]
        hits = await memory.semantic_search("who pilots aircraft?", limit=1)
        assert hits[0].entity.name == "alice" and 0 < hits[0].score <= 1
        with pytest.raises(NotFound, match="NOT_FOUND: entity not found: ghost"):
            await memory.add_observations({"ghost": ["x"]})
        with pytest.raises(InvalidArgument, match=r"entities\[0\]\.name: must not be empty"):
            await memory.create_entities([Entity("", "t")])
        await memory.delete_relations([Relation("alice", "paris", "lives_in")])
        await memory.delete_observations({"alice": ["drinks green tea"]})
        await memory.delete_entities(["paris"])
        assert [list(e.observations) for e in (await memory.open_nodes(["alice"])).entities] == [["flies planes"]]


async def test_the_synchronous_client(cluster: Cluster) -> None:
    def work() -> list[str]:
        with Client(f"127.0.0.1:{cluster.server.port}", scope="sync-agent") as memory:
            memory.create_entities([Entity("bob", "person", ["plays chess"])])
            return [e.name for e in memory.search_nodes("chess").entities]

    assert await asyncio.to_thread(work) == ["bob"]


async def test_tokens_and_an_unreachable_proxy_raise_named_errors(embedder: BatchingEmbedder, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("token-of-agent-a-0123456789 agent-a\n")
    c = await boot(embedder, tmp_path, memory_tokens_file=str(tokens))
    try:
        target = f"127.0.0.1:{c.server.port}"
        async with AsyncClient(target, scope="agent-a", token="token-of-agent-a-0123456789") as memory:
            await memory.create_entities([Entity("x", "t")])
        async with AsyncClient(target, scope="agent-b", token="token-of-agent-a-0123456789") as memory:
            with pytest.raises(PermissionDenied):
                await memory.read_graph()
    finally:
        await shutdown(c)
    async with AsyncClient(f"127.0.0.1:{free_port()}", retries=1, timeout=2) as nobody:
        with pytest.raises(Unavailable):
            await nobody.read_graph()  # retried once with backoff, then raised
        with pytest.raises(Unavailable):
            await nobody.create_entities([Entity("y", "t")])  # not retried: a create is not blindly repeated


async def test_reads_ride_out_a_proxy_that_comes_up_while_creates_are_not_repeated(
        embedder: BatchingEmbedder, tmp_path: Path) -> None:
    """Nothing listens when the calls start; the proxy comes up a moment later. The read, retried with backoff, gets
    its answer; the create failed at once and was not repeated behind the caller's back."""
    port = free_port()
    async with AsyncClient(f"127.0.0.1:{port}", scope="late", retries=6, timeout=5) as memory:
        with pytest.raises(Unavailable):
            await memory.create_entities([Entity("early", "t")])
        starting = asyncio.ensure_future(boot(embedder, tmp_path, listen=f"127.0.0.1:{port}"))
        graph = await memory.read_graph()  # issued before the proxy listens
        c = await starting
        try:
            assert graph.entities == []  # the create never landed
            assert (await memory.read_graph()).entities == []
        finally:
            await shutdown(c)


def test_the_client_installs_its_own_namespace_and_nothing_generic(tmp_path: Path) -> None:
    """An agent that installs the Python client gets `memshift` (the client and its gRPC stubs), not the proxy's
    packages: the client is a distribution of its own (clients/python)."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(root / "clients" / "python")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    [wheel] = tmp_path.glob("memshift-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in name}
    assert tops == {"memshift"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "memshift/client.py" in names and "memshift/v1/memory_pb2_grpc.py" in names and "memshift/py.typed" in names
