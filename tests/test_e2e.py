"""End to end over a real gRPC channel: what an agent sees."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc
from proxy.transports.server import MemshiftServer

Stub = memory_pb2_grpc.MemoryStub
S = "agent-7"


def rel(a: str, t: str, b: str) -> pb.Relation:
    return pb.Relation(**{"from": a}, to=b, relation_type=t)


async def graph(stub: Stub, scope: str = S) -> pb.ReadGraphResponse:
    return await stub.ReadGraph(pb.ReadGraphRequest(scope=scope))


async def test_agent_session(stub: Stub) -> None:
    created = await stub.CreateEntities(pb.CreateEntitiesRequest(scope=S, entities=[
        pb.Entity(name="alice", entity_type="person", observations=["drinks green tea"], metadata={"src": "chat"}),
        pb.Entity(name="bob", entity_type="person", observations=["plays chess"])]))
    assert [e.name for e in created.created] == ["alice", "bob"]
    again = await stub.CreateEntities(pb.CreateEntitiesRequest(scope=S, entities=[pb.Entity(name="alice",
                                                                                             entity_type="x")]))
    assert list(again.created) == []
    rels = await stub.CreateRelations(pb.CreateRelationsRequest(scope=S, relations=[rel("alice", "knows", "bob")]))
    assert len(rels.created) == 1
    added = await stub.AddObservations(pb.AddObservationsRequest(scope=S, observations=[
        pb.ObservationAddition(entity_name="alice", contents=["drinks green tea", "lives in Paris"])]))
    assert list(added.results[0].added_observations) == ["lives in Paris"]

    found = await stub.SemanticSearch(pb.SemanticSearchRequest(scope=S, query="hot beverages", limit=1))
    assert [r.entity.name for r in found.results] == ["alice"]
    assert found.results[0].entity.metadata["src"] == "chat"
    assert [(getattr(r, "from"), r.to) for r in found.relations] == [("alice", "bob")]
    none = await stub.SemanticSearch(pb.SemanticSearchRequest(scope=S, query="hot beverages", min_score=0.99))
    assert list(none.results) == []

    sub = await stub.SearchNodes(pb.SearchNodesRequest(scope=S, query="CHESS"))
    assert [e.name for e in sub.entities] == ["bob"]
    opened = await stub.OpenNodes(pb.OpenNodesRequest(scope=S, names=["alice", "zed"]))
    assert [e.name for e in opened.entities] == ["alice"]

    await stub.DeleteObservations(pb.DeleteObservationsRequest(scope=S, deletions=[
        pb.ObservationDeletion(entity_name="alice", observations=["drinks green tea"])]))
    await stub.DeleteEntities(pb.DeleteEntitiesRequest(scope=S, entity_names=["bob"]))
    g = await graph(stub)
    assert [(e.name, list(e.observations)) for e in g.entities] == [("alice", ["lives in Paris"])]
    assert list(g.relations) == []
    assert list((await graph(stub, "someone-else")).entities) == []


async def test_read_graph_paging(stub: Stub) -> None:
    names = [f"n{i:02d}" for i in range(12)]
    await stub.CreateEntities(pb.CreateEntitiesRequest(scope=S, entities=[
        pb.Entity(name=n, entity_type="t") for n in names]))
    await stub.CreateRelations(pb.CreateRelationsRequest(scope=S, relations=[
        rel(a, "next", b) for a, b in itertools.pairwise(names)]))
    seen_e, seen_r, token, pages = [], [], "", 0
    while True:
        page = await stub.ReadGraph(pb.ReadGraphRequest(scope=S, page_size=5, page_token=token))
        seen_e += [e.name for e in page.entities]
        seen_r += [getattr(r, "from") for r in page.relations]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen_e == names and seen_r == names[:-1] and pages == 5


async def expect(call: object, code: grpc.StatusCode, *needles: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() == code, err.value.details()
    details = err.value.details() or ""
    for needle in needles:
        assert needle in details, details
    return details


async def test_bad_input_is_rejected_naming_the_field_and_stores_nothing(stub: Stub) -> None:
    await stub.CreateEntities(pb.CreateEntitiesRequest(scope=S, entities=[pb.Entity(name="keep", entity_type="t")]))
    before = await graph(stub)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    await expect(stub.CreateEntities(pb.CreateEntitiesRequest(scope=S, entities=[
        pb.Entity(name="fine", entity_type="t"), pb.Entity(name="", entity_type="t")])), bad, "entities[1].name")
    await expect(stub.CreateEntities(pb.CreateEntitiesRequest(scope=S, entities=[
        pb.Entity(name="x" * 257, entity_type="t")])), bad, "entities[0].name", "257")
    await expect(stub.CreateEntities(pb.CreateEntitiesRequest(scope="bad scope!", entities=[
        pb.Entity(name="a", entity_type="t")])), bad, "scope", "malformed")
    await expect(stub.CreateEntities(pb.CreateEntitiesRequest(entities=[pb.Entity(name="a", entity_type="t")])),
                 bad, "scope", "required")
    await expect(stub.CreateEntities(pb.CreateEntitiesRequest(scope=S, entities=[
        pb.Entity(name=f"e{i}", entity_type="t") for i in range(1001)])),
        grpc.StatusCode.RESOURCE_EXHAUSTED, "entities", "1001")
    await expect(stub.CreateRelations(pb.CreateRelationsRequest(scope=S, relations=[rel("a", "", "b")])),
                 bad, "relations[0].relation_type")
    await expect(stub.AddObservations(pb.AddObservationsRequest(scope=S, observations=[
        pb.ObservationAddition(entity_name="keep", contents=["ok"]),
        pb.ObservationAddition(entity_name="ghost", contents=["x"])])), grpc.StatusCode.NOT_FOUND, "ghost")
    await expect(stub.ReadGraph(pb.ReadGraphRequest(scope=S, page_token="garbage")), bad, "page_token")
    await expect(stub.SemanticSearch(pb.SemanticSearchRequest(scope=S, query="q", min_score=2)), bad, "min_score")
    await expect(stub.SemanticSearch(pb.SemanticSearchRequest(scope=S, query="")), bad, "query")
    assert await graph(stub) == before


async def test_oversized_message_is_resource_exhausted(server: MemshiftServer) -> None:
    async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        big = pb.CreateEntitiesRequest(scope=S, entities=[
            pb.Entity(name="big", entity_type="t", observations=["x" * 8000] * 1000 + ["y" * 8000] * 100)])
        await expect(memory_pb2_grpc.MemoryStub(ch).CreateEntities(big), grpc.StatusCode.RESOURCE_EXHAUSTED)


async def test_health_and_reflection(server: MemshiftServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for service in ("", "memshift.v1.Memory"):
            resp = await h.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        r = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask() -> list[str]:
            yield_req = reflection_pb2.ServerReflectionRequest(list_services="")
            async for resp in r.ServerReflectionInfo(iter([yield_req])):
                return [s.name for s in resp.list_services_response.service]
            return []

        assert "memshift.v1.Memory" in await ask()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_sigterm_lets_in_flight_calls_finish_then_exits_zero(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "MEMSHIFT_LISTEN": f"127.0.0.1:{port}", "MEMSHIFT_STORE": f"sqlite:///{tmp_path}/m.db",
           "MEMSHIFT_CONTROL": f"sqlite:///{tmp_path}/control.db", "MEMSHIFT_ADMIN_LISTEN": "127.0.0.1:0",
           "MEMSHIFT_MCP_LISTEN": "127.0.0.1:0"}
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve"], env=env,  # noqa: ASYNC220 (started once, then awaited)
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await asyncio.wait_for(ch.channel_ready(), timeout=60)
            stub = memory_pb2_grpc.MemoryStub(ch)
            # A call long enough to be in flight when SIGTERM lands: 1000 entities to embed.
            call = stub.CreateEntities(pb.CreateEntitiesRequest(scope=S, entities=[
                pb.Entity(name=f"e{i}", entity_type="t", observations=[f"fact number {i} about topic {i % 7}"])
                for i in range(1000)]))
            await asyncio.sleep(0.3)
            assert not call.done(), "the call must still be in flight when SIGTERM arrives"
            proc.send_signal(signal.SIGTERM)
            resp = await call
            assert len(resp.created) == 1000
        assert await asyncio.to_thread(proc.wait, 30) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert '"shutting down"' in err and '"stopped"' in err
        # A start says what it is doing at each step, so a slow one can be told apart from a stuck one.
        steps = ['"loading the embedding model"', '"embedding model loaded"', '"opening the control store"',
                 '"reading the migration state"', '"opening the primary"', '"listening"', '"serving"']
        positions = [err.find(step) for step in steps]
        assert all(p >= 0 for p in positions) and positions == sorted(positions), positions
    finally:
        if proc.poll() is None:
            proc.kill()
