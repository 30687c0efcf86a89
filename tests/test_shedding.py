"""Load shedding: a flood is refused at once beyond the configured in-flight budget, refused calls store nothing,
and health and the admin API keep answering."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from adapters.embedder import BatchingEmbedder
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import memory_pb2 as pb
from proxy.runtime.config import Limits
from proxy.transports.shedding import Budget
from tests.cluster import AUTH, boot, shutdown, status


@given(steps=st.lists(st.tuples(st.booleans(), st.integers(0, 5000)), max_size=200),
       max_calls=st.integers(1, 8), max_bytes=st.integers(1, 10_000))
def test_the_budget_never_admits_beyond_its_bounds(steps: list[tuple[bool, int]], max_calls: int,
                                                   max_bytes: int) -> None:
    budget, admitted = Budget(max_calls, max_bytes), []
    for take, size in steps:
        if take:
            if budget.admit(size) is None:
                admitted.append(size)
        elif admitted:
            budget.release(admitted.pop(0))
        assert budget.calls == len(admitted) <= max_calls
        assert budget.bytes == sum(admitted)
        assert budget.bytes <= max_bytes or len(admitted) == 1  # a single call is always admitted


async def test_a_flood_is_shed_at_once_while_health_and_admin_answer(embedder: BatchingEmbedder,
                                                                     tmp_path: Path) -> None:
    c = await boot(embedder, tmp_path, limits=Limits(max_inflight_calls=8))
    try:
        async def create(i: int) -> grpc.StatusCode:
            try:
                await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope="flood", entities=[
                    pb.Entity(name=f"e{i}", entity_type="t", observations=[f"fact {i} about the flood"])]))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                assert (err.details() or "").startswith("server busy: ")
                return err.code()
            return grpc.StatusCode.OK

        async with grpc.aio.insecure_channel(f"127.0.0.1:{c.server.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            flood = [asyncio.ensure_future(create(i)) for i in range(400)]
            answers = [await health.Check(health_pb2.HealthCheckRequest(), timeout=5) for _ in range(3)]
            st = await c.admin.GetStatus(apb.GetStatusRequest(), metadata=AUTH, timeout=5)
            codes = await asyncio.gather(*flood)
        assert all(a.status == health_pb2.HealthCheckResponse.SERVING for a in answers) and st.phase
        ok = [i for i, code in enumerate(codes) if code == grpc.StatusCode.OK]
        shed = len(codes) - len(ok)
        assert ok and shed > 0
        assert (await status(c)).memory_calls_shed == shed
        graph = await c.memory.ReadGraph(pb.ReadGraphRequest(scope="flood", page_size=1000))
        assert {e.name for e in graph.entities} == {f"e{i}" for i in ok}  # a refused call stored nothing
    finally:
        await shutdown(c)
