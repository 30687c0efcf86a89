"""Property: any request is either accepted, or rejected naming a field with nothing stored."""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc

names = st.one_of(st.text(max_size=300), st.sampled_from(["", " ", "ok", "a\x00b", "x" * 256, "x" * 257]))
scopes = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,20}", fullmatch=True),
                   st.sampled_from(["", "-x", "a b", "x" * 129]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scope=scopes, ents=st.lists(st.tuples(names, names, st.lists(st.text(max_size=50), max_size=3)),
                                   min_size=0, max_size=4))
async def test_create_entities_all_or_nothing(stub: memory_pb2_grpc.MemoryStub, scope: str,
                                              ents: list[tuple[str, str, list[str]]]) -> None:
    req = pb.CreateEntitiesRequest(scope=scope, entities=[
        pb.Entity(name=n, entity_type=t, observations=o) for n, t, o in ents])
    probe = scope if scope and len(scope) <= 128 and " " not in scope and not scope.startswith("-") else "probe"
    before = await stub.ReadGraph(pb.ReadGraphRequest(scope=probe))
    try:
        resp = await stub.CreateEntities(req)
    except grpc.aio.AioRpcError as err:
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        details = err.details() or ""
        assert details.split(":")[0] in {"scope", "entities"} or details.startswith("entities["), details
        assert await stub.ReadGraph(pb.ReadGraphRequest(scope=probe)) == before
        return
    # Accepted: every entity is now readable as sent (those that existed before were skipped).
    after = await stub.OpenNodes(pb.OpenNodesRequest(scope=scope, names=[n for n, _, _ in ents]))
    assert {e.name for e in after.entities} == {n for n, _, _ in ents}
    assert {e.name for e in resp.created} <= {n for n, _, _ in ents}
