"""Where values, options, secrets and raw bytes come in from outside: each is refused with a status naming the
problem, leaves stored state untouched, and costs bounded work; no secret comes back out."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder
from adapters.errors import UnreadableState
from adapters.model import Entity
from adapters.records import Kind
from adapters.specs import redact, scrub, scrub_secrets, secrets_of
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import memory_pb2 as pb
from proxy.engine.control import MigrationState, SqliteControlStore
from proxy.runtime.config import Config, Limits
from proxy.runtime.logs import JsonFormatter
from proxy.transports.server import MemshiftServer
from tests.cluster import AUTH, Cluster, boot, shutdown, status
from tests.conftest import ADMIN_TOKEN


# --- options that cannot brick the control store ------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value", "says"), [
    ("rate_limit", math.inf, "rate_limit: is inf, must be a finite number"),
    ("rate_limit", math.nan, "rate_limit: is nan, must be a finite number"),
    ("rate_limit", -1.0, "rate_limit: is -1, must be in [0, "),
    ("mirror_seconds", math.nan, "mirror_seconds: is nan, must be a finite number"),
    ("mirror_seconds", math.inf, "mirror_seconds: is inf"),
    ("mirror_seconds", 1e300, "mirror_seconds: is 1e+300, must be in [0, "),
])
async def test_non_finite_or_out_of_range_options_are_refused_and_nothing_is_stored(
        cluster: Cluster, field: str, value: float, says: str) -> None:
    before = await status(cluster)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.admin.StartMigration(apb.StartMigrationRequest(target=cluster.target, **{field: value}),
                                           metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in (err.value.details() or "")
    after = await status(cluster)
    assert after.phase == apb.NOT_STARTED and after.migration_id == before.migration_id
    # The control store still takes phase changes: nothing half-written, no transaction left open.
    st = await cluster.admin.StartMigration(apb.StartMigrationRequest(target=cluster.target), metadata=AUTH)
    assert st.phase == apb.DATA_MIGRATION


async def test_ramp_and_routing_numbers_must_be_finite(cluster: Cluster) -> None:
    await cluster.admin.StartMigration(apb.StartMigrationRequest(target=cluster.target), metadata=AUTH)
    for request, says in [
        (apb.SetReadRoutingRequest(read_fraction=math.nan), "read_fraction: is nan"),
        (apb.SetReadRoutingRequest(shadow_sample_rate=math.inf), "shadow_sample_rate: is inf"),
        (apb.SetReadRoutingRequest(ramp=True, ramp_interval_seconds=math.inf), "ramp_interval_seconds: is inf"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cluster.admin.SetReadRouting(request, metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert says in (err.value.details() or "")
    assert (await status(cluster)).phase == apb.DATA_MIGRATION


async def test_a_failed_control_store_transaction_is_rolled_back(tmp_path: Path) -> None:
    """The brick seen from outside: a statement failing inside the compare-and-set (here the stored body no longer
    parses) used to leave the transaction open, and every later call failed. Now it fails alone."""
    path = tmp_path / "control.db"
    control = SqliteControlStore(path, initial_primary="sqlite:///a.db")
    state = await control.save(MigrationState(primary="sqlite:///a.db"), 0)
    with pytest.raises(ValueError, match=r"options\.rate_limit is not a finite number; nothing was written"):
        await control.save(MigrationState(primary="x", options=state.options.__class__(rate_limit=math.inf)),
                           state.revision)
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE state SET body = '{broken' WHERE id = 1")
    with pytest.raises(sqlite3.OperationalError):
        await control.save(state, state.revision)  # json_extract fails inside the transaction
    await control.enqueue_repairs(1, [(Kind.ENTITY, "s", ("a",))])  # usable: no transaction was left open
    await control.carry_over_repairs(2)
    assert await control.repair_depth(2) == 1
    with pytest.raises(UnreadableState, match=rf"{path.name} cannot be read .*table `state`"):
        await control.load()
    await control.close()


async def test_a_state_that_cannot_be_loaded_stops_the_start_saying_what_and_where(
        embedder: BatchingEmbedder, tmp_path: Path) -> None:
    SqliteControlStore(tmp_path / "control.db", initial_primary="x")  # creates the tables
    with sqlite3.connect(tmp_path / "control.db") as raw:
        body = json.loads(json.dumps({"phase": "DataMigration", "primary": "sqlite:///a.db", "options": {},
                                      "backfill_cursor": None, "verify_cursor": None}))
        body["read_fraction"] = "NaN-ish"
        raw.execute("INSERT INTO state VALUES (1, ?)", (json.dumps(body).replace('"NaN-ish"', "NaN"),))
    server = MemshiftServer(Config(listen="127.0.0.1:0", mcp_listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/a.db",
                                   control=f"sqlite:///{tmp_path}/control.db", admin_listen="127.0.0.1:0",
                                   admin_token=ADMIN_TOKEN), embedder)
    with pytest.raises(UnreadableState, match=r"control\.db .*NaN"):
        await server.start()


# --- secrets never leave --------------------------------------------------------------------------------------------
SECRET = "S3cr3t-Pa55"
_scopes = itertools.count()


@pytest.mark.parametrize("spec", [
    f"postgresql://user:{SECRET}@db.internal:5432/memory",
    f"postgresql://user@db.internal/memory?password={SECRET}&schema=s",
    f"qdrant://q.internal:6333?api_key={SECRET}",
    f"bolt://neo4j:{SECRET}@graph:7687/db?prefix=M",
    f"bolt://graph:7687?auth_token={SECRET}",
    f"hybrid:?graph=bolt://neo4j:{SECRET}@graph:7687&vectors=qdrants://q?api_key={SECRET}",
    f"hybrid:?graph=bolt%3A%2F%2Fneo4j%3A{SECRET}%40graph%3A7687&vectors=qdrant+local:///tmp/v",
    f"postgresql://user:{SECRET}@db.internal:notaport/memory",
    f"user:{SECRET}@db.internal",
    f"postgresql://user:{SECRET}@[::1/memory",
])
def test_redaction_hides_every_form_of_secret(spec: str) -> None:
    for shown in (redact(spec), scrub(f"start migration to {spec}, now"), scrub_secrets(f"bad port {SECRET}", spec)):
        assert SECRET not in shown, shown


@given(secret=st.text(alphabet=st.characters(codec="ascii", categories=("L", "N")), min_size=6, max_size=20),
       text=st.text(max_size=60))
@settings(max_examples=300)
def test_redaction_never_raises_and_never_shows_a_password(secret: str, text: str) -> None:
    shapes = ("postgresql://u:{}@h:5432/d", "qdrant://h?api_key={}", "x://u:{}@h:" + text.replace("{", "{{").replace(
        "}", "}}"))
    assume(not any(secret in shape.format("") for shape in shapes))  # the secret stands only where the secret goes
    for spec in (shape.format(secret) for shape in shapes):
        assert secret not in redact(spec)
        assert secret not in scrub(f"{text} {spec} {text}")
        assert secret in secrets_of(spec)  # what an error about this very spec is scrubbed of
        assert secret not in scrub_secrets(f"{text} {secret} {text}", spec)
    redact(text)  # anything at all: an answer, never an exception
    scrub(text)
    secrets_of(text)


async def test_a_spec_with_a_password_never_reaches_history_status_logs_errors_or_the_stored_history(
        cluster: Cluster, servers: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    host = servers["postgres"].split("@")[-1]  # 127.0.0.1:PORT/db: the test server trusts any password
    target = f"postgresql://postgres:{SECRET}@{host}?schema=redact1&password={SECRET}"
    caplog.set_level(logging.DEBUG)
    st = await cluster.admin.StartMigration(apb.StartMigrationRequest(target=target), metadata=AUTH)
    assert st.phase == apb.DATA_MIGRATION
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a malformed spec: its error must not echo the password
        await cluster.admin.StartMigration(apb.StartMigrationRequest(
            target=f"postgresql://postgres:{SECRET}@{host.split(':')[0]}:port{SECRET}/db"), metadata=AUTH)
    history = await cluster.admin.GetHistory(apb.GetHistoryRequest(), metadata=AUTH)
    shown = [str(st), str(await status(cluster)), str(history), err.value.details() or ""]
    shown += [JsonFormatter().format(r) for r in caplog.records]
    with sqlite3.connect(cluster.dir / "control.db") as raw:
        shown += [str(raw.execute("SELECT * FROM history").fetchall())]
    for text in shown:
        assert SECRET not in text, text
    assert any("start migration to postgresql://***@" in t for t in shown)


# --- bounded work, and garbage in ---------------------------------------------------------------------------------
async def test_an_over_count_request_is_refused_while_health_checks_are_answered(server: MemshiftServer) -> None:
    """700,000 empty entities in 1.4 MB used to hold the event loop for seconds while they were converted."""
    huge = pb.CreateEntitiesRequest(scope="a", entities=[pb.Entity() for _ in range(700_000)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        create = channel.unary_unary("/memshift.v1.Memory/CreateEntities",
                                     request_serializer=pb.CreateEntitiesRequest.SerializeToString,
                                     response_deserializer=pb.CreateEntitiesResponse.FromString)
        health = health_pb2_grpc.HealthStub(channel)
        calls = [asyncio.ensure_future(create(huge)) for _ in range(3)]
        answers = [await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(5)]
        assert all(a.status == health_pb2.HealthCheckResponse.SERVING for a in answers)
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (err.value.details() or "").startswith("entities: has 700000 items, at most 1000")


MEMORY = pb.DESCRIPTOR.services_by_name["Memory"]
ADMIN = apb.DESCRIPTOR.services_by_name["MigrationAdmin"]
MEMORY_METHODS = ["CreateEntities", "CreateRelations", "AddObservations", "DeleteEntities", "DeleteObservations",
                  "DeleteRelations", "ReadGraph", "SearchNodes", "OpenNodes", "SemanticSearch"]
ADMIN_METHODS = ["GetStatus", "StartMigration", "Advance", "GetHistory", "WatchStatus", "Verify"]


async def test_undecodable_requests_are_invalid_argument_with_one_log_line(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    garbage = [b"\xff\xff\xff\xff", b"\x12\x05ab",  # a tag with no valid field, a length beyond the end
               pb.SearchNodesRequest(scope="a", query="q").SerializeToString()[:-1],  # truncated
               b"\x0a\x02\xc3\x28"]  # field 1 (a string) holding invalid UTF-8
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.server.port}") as mem, \
            grpc.aio.insecure_channel(f"127.0.0.1:{cluster.server.admin_port}") as adm:
        targets = [(mem, MEMORY, m, False) for m in MEMORY_METHODS]
        targets += [(adm, ADMIN, m, m in ("WatchStatus", "Verify")) for m in ADMIN_METHODS]
        refused = 0
        for channel, service, name, streaming in targets:
            method = f"/{service.full_name}/{name}"
            message = GetMessageClass(service.methods_by_name[name].input_type)
            for raw in garbage:
                try:
                    message.FromString(raw)
                    continue  # these bytes happen to be a valid message of this type
                except DecodeError:
                    pass
                caplog.clear()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    if streaming:
                        async for _ in channel.unary_stream(method)(raw, metadata=AUTH):
                            pass
                    else:
                        await channel.unary_unary(method)(raw, metadata=AUTH)
                refused += 1
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, raw, err.value.details())
                assert (err.value.details() or "").startswith("request: not a valid memshift.v1."), method
                lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
                assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage() for r in lines]
        assert refused >= 3 * len(targets)


async def test_every_list_may_be_empty_as_in_the_mcp_memory_server(cluster: Cluster) -> None:
    m, s = cluster.memory, "empty-lists"
    await m.CreateEntities(pb.CreateEntitiesRequest(scope=s, entities=[pb.Entity(name="a", entity_type="t")]))
    assert list((await m.CreateEntities(pb.CreateEntitiesRequest(scope=s))).created) == []
    assert list((await m.CreateRelations(pb.CreateRelationsRequest(scope=s))).created) == []
    assert list((await m.AddObservations(pb.AddObservationsRequest(scope=s))).results) == []
    res = await m.AddObservations(pb.AddObservationsRequest(scope=s, observations=[
        pb.ObservationAddition(entity_name="a", contents=[])]))
    assert [(r.entity_name, list(r.added_observations)) for r in res.results] == [("a", [])]
    with pytest.raises(grpc.aio.AioRpcError) as err:  # still NOT_FOUND for a missing entity, as the server does
        await m.AddObservations(pb.AddObservationsRequest(scope=s, observations=[
            pb.ObservationAddition(entity_name="ghost", contents=[])]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await m.DeleteEntities(pb.DeleteEntitiesRequest(scope=s))
    await m.DeleteObservations(pb.DeleteObservationsRequest(scope=s))
    await m.DeleteObservations(pb.DeleteObservationsRequest(scope=s, deletions=[
        pb.ObservationDeletion(entity_name="a", observations=[])]))
    await m.DeleteRelations(pb.DeleteRelationsRequest(scope=s))
    assert list((await m.OpenNodes(pb.OpenNodesRequest(scope=s))).entities) == []
    graph = await m.ReadGraph(pb.ReadGraphRequest(scope=s))
    assert [e.name for e in graph.entities] == ["a"]
    assert (await status(cluster)).phase == apb.NOT_STARTED


@pytest.mark.parametrize("scope", ["name\n", "name\r\n", "\nname", "na me", "-name", "x" * 129])
async def test_malformed_scopes_are_refused(cluster: Cluster, scope: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.memory.ReadGraph(pb.ReadGraphRequest(scope=scope))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("scope: ")


# --- bounded embedding work, bounded entities, answers that fit --------------------------------------------------
async def test_the_embedder_sees_only_what_the_model_reads(cluster: Cluster, embedder: BatchingEmbedder) -> None:
    """A 0.9 MB entity used to go through the tokenizer whole (seconds, hundreds of MB) though the model reads its
    first 256 word pieces; now the model gets a prefix, and the vector is the one the whole text would get."""
    model = embedder._model
    text = " ".join(f"word{i}" for i in range(150_000))[:900_000]
    whole = model._model.encode([text], normalize_embeddings=True)[0]  # the library's own truncation, as reference
    assert float((whole * (await embedder.embed([text]))[0]).sum()) > 0.9999
    observations = [text[i:i + 8000] for i in range(0, 8000 * 110, 8000)]
    await cluster.memory.CreateEntities(pb.CreateEntitiesRequest(scope="big", entities=[
        pb.Entity(name="tome", entity_type="book", observations=observations)]))
    hits = await cluster.memory.SemanticSearch(pb.SemanticSearchRequest(scope="big", query="word17 word18", limit=1))
    assert [h.entity.name for h in hits.results] == ["tome"]
    assert 0 < embedder.longest_encoded <= model.read_chars


async def test_an_entity_is_bounded_in_total_across_calls(cluster: Cluster) -> None:
    m, chunk = cluster.memory, "x" * 8000
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await m.CreateEntities(pb.CreateEntitiesRequest(scope="cap", entities=[
            pb.Entity(name="a", entity_type="t"), pb.Entity(name="b", entity_type="t", observations=[
                f"{i} {chunk}" for i in range(140)])]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (err.value.details() or "").startswith("entities[1]: holds 112")
    await m.CreateEntities(pb.CreateEntitiesRequest(scope="cap", entities=[pb.Entity(name="b", entity_type="t")]))
    for start in (0, 100):  # 100 x 8 KB fits; 100 more in a second call would not
        call = m.AddObservations(pb.AddObservationsRequest(scope="cap", observations=[
            pb.ObservationAddition(entity_name="b", contents=[f"{i} {chunk}" for i in range(start, start + 100)])]))
        if start == 0:
            await call
            continue
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "observations[0].contents: would make entity 'b' hold 16" in (err.value.details() or "")
    opened = await m.OpenNodes(pb.OpenNodesRequest(scope="cap", names=["b"]))
    assert len(opened.entities[0].observations) == 100  # the refused call stored nothing


SMALL = 128 * 1024  # a message limit small enough for a handful of large entities to exceed it


@pytest.fixture
async def small(embedder: BatchingEmbedder, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = await boot(embedder, tmp_path, limits=Limits(max_message_bytes=SMALL))
    yield c
    await shutdown(c)


async def _walk(c: Cluster, scope: str, page_size: int = 0) -> tuple[list[pb.Entity], list[pb.Relation], list[str]]:
    ents: list[pb.Entity] = []
    rels: list[pb.Relation] = []
    notes: list[str] = []
    token = ""
    for _ in range(1000):
        page = await c.memory.ReadGraph(pb.ReadGraphRequest(scope=scope, page_size=page_size, page_token=token))
        assert page.ByteSize() <= SMALL
        ents += page.entities
        rels += page.relations
        notes += [page.truncated] if page.truncated else []
        token = page.next_page_token
        if not token:
            return ents, rels, notes
    raise AssertionError("paging never ended")


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(sizes=st.lists(st.integers(0, 30_000), min_size=1, max_size=14), related=st.booleans())
async def test_every_read_answer_fits_the_message_limit_and_paging_sees_everything(
        small: Cluster, sizes: list[int], related: bool) -> None:
    scope = f"fit-{next(_scopes)}"
    ents = [pb.Entity(name=f"e{i:02d}", entity_type="t",
                      observations=[f"o{k} {'y' * min(8000, n - k * 8000)}" for k in range(-(-n // 8000))],
                      metadata={"k": "v" * min(n, 1000)}) for i, n in enumerate(sizes)]
    for e in ents:
        await small.memory.CreateEntities(pb.CreateEntitiesRequest(scope=scope, entities=[e]))
    wanted_rels = {(f"e{i:02d}", f"e{j:02d}") for i in range(len(sizes)) for j in range(len(sizes))
                   if related and i != j and (i + j) % 3 == 0}
    if wanted_rels:
        await small.memory.CreateRelations(pb.CreateRelationsRequest(scope=scope, relations=[
            pb.Relation(**{"from": a}, to=b, relation_type="r", metadata={"m": "z" * 500}) for a, b in wanted_rels]))
    got, rels, notes = await _walk(small, scope)
    assert [e.name for e in got] == [e.name for e in ents] and not notes
    assert [list(e.observations) for e in got] == [list(e.observations) for e in ents]
    assert {(getattr(r, "from"), r.to) for r in rels} == wanted_rels and len(rels) == len(wanted_rels)
    whole = sum(e.ByteSize() for e in ents) + sum(700 for _ in wanted_rels) < SMALL - 64 * 1024
    for answer in (await small.memory.SearchNodes(pb.SearchNodesRequest(scope=scope, query="e")),
                   await small.memory.OpenNodes(pb.OpenNodesRequest(scope=scope, names=[e.name for e in ents]))):
        assert answer.ByteSize() <= SMALL
        whole_answer = len(answer.entities) == len(ents) and len(answer.relations) == len(wanted_rels)
        assert bool(answer.truncated) != whole_answer  # cut exactly when something was left out, and then says so
        assert len(answer.entities) == len(ents) or not whole
        assert answer.truncated == "" or "answer cut at the message limit" in answer.truncated
    hits = await small.memory.SemanticSearch(pb.SemanticSearchRequest(scope=scope, query="o", limit=20))
    assert hits.ByteSize() <= SMALL
    assert bool(hits.truncated) != (len(hits.results) == len(ents) and len(hits.relations) == len(wanted_rels))


async def test_no_record_can_make_a_scope_unreadable(embedder: BatchingEmbedder, tmp_path: Path) -> None:
    """An entity stored before max_entity_bytes existed, larger than any answer may be: paging goes past it, sending
    what fits of it and saying so, and the entities after it are read as usual."""
    legacy = EmbeddedBackend(tmp_path / "old.db", embedder)
    await legacy.open()
    await legacy.create_entities("legacy", [
        Entity("a-small", "t", ("fine",)),
        Entity("b-huge", "t", tuple(f"{i} {'w' * 8000}" for i in range(40)), {"k": "v"}),
        Entity("c-small", "t", ("also fine",))], 1)
    await legacy.close()
    c = await boot(embedder, tmp_path, limits=Limits(max_message_bytes=SMALL))
    try:
        for size in (0, 1):
            got, _, notes = await _walk(c, "legacy", size)
            assert [e.name for e in got] == ["a-small", "b-huge", "c-small"]
            assert 0 < len(got[1].observations) < 40 and len(notes) == 1 and "'b-huge' holds" in notes[0]
        opened = await c.memory.OpenNodes(pb.OpenNodesRequest(scope="legacy", names=["b-huge", "c-small"]))
        assert [e.name for e in opened.entities] == ["b-huge"] and "'b-huge'" in opened.truncated
    finally:
        await shutdown(c)
