"""memshift-jsonl backups through a running proxy's admin API: everything a store keeps (versions, tombstones,
metadata, vectors with their model) out, and back in applied if newer, so a restore never overwrites a newer write
and a restore into an empty store of another kind reproduces the original exactly."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.base import Backend
from adapters.embedder import BatchingEmbedder
from adapters.errors import JsonlError
from adapters.export import export_pages
from adapters.records import EntityRecord, ObservationRecord, Record, RelationRecord
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import memory_pb2 as pb
from proxy.cli.main import main
from proxy.engine.clock import COUNTER_BITS, NODE_BITS
from proxy.engine.verify import verify
from proxy.formats import backup
from proxy.runtime.config import Limits
from tests.cluster import AUTH, Cluster, boot, run_verify, shutdown, status, wait_for
from tests.conftest import ADMIN_TOKEN


async def cli(c: Cluster, *args: str) -> int:
    return await asyncio.to_thread(main, [*args[:1], "--target", f"127.0.0.1:{c.server.port}", "--admin-target",
                                          f"127.0.0.1:{c.server.admin_port}", "--admin-token", ADMIN_TOKEN, *args[1:]])


async def everything(store: Backend) -> list[Record]:
    return [r for page in [p async for p in export_pages(store, 100, vectors=False)] for r in page.records]


async def fill(c: Cluster) -> None:
    """Two scopes with metadata, a deleted entity, a deleted observation and a deleted relation (tombstones)."""
    for scope in ("team-a", "team-b"):
        await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope=scope, entities=[
            pb.Entity(name="alice", entity_type="person", observations=["drinks green tea", "lives in Paris"],
                      metadata={"source": "chat 12"}),
            pb.Entity(name="bob", entity_type="person", observations=["plays chess"]),
            pb.Entity(name="paris", entity_type="city"),
            pb.Entity(name="Straße 7", entity_type="place", observations=['"quoted"\nand ünïcode ✓'])]))
        await c.memory.CreateRelations(pb.CreateRelationsRequest(scope=scope, relations=[
            pb.Relation(**{"from": "alice"}, to="paris", relation_type="lives_in", metadata={"since": "2024"}),
            pb.Relation(**{"from": "alice"}, to="bob", relation_type="knows")]))
    await c.memory.DeleteObservations(pb.DeleteObservationsRequest(scope="team-a", deletions=[
        pb.ObservationDeletion(entity_name="alice", observations=["lives in Paris"])]))
    await c.memory.DeleteRelations(pb.DeleteRelationsRequest(scope="team-a", relations=[
        pb.Relation(**{"from": "alice"}, to="bob", relation_type="knows")]))
    await c.memory.DeleteEntities(pb.DeleteEntitiesRequest(scope="team-b", entity_names=["bob"]))


async def test_a_backup_restored_into_an_empty_store_of_another_kind_is_the_same_store(
        embedder: BatchingEmbedder, servers: dict[str, str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    source = await boot(embedder, tmp_path / "a")
    restored = await boot(embedder, tmp_path / "b", store=f"{servers['postgres']}?schema=restore_{time.time_ns()}")
    try:
        await fill(source)
        out = tmp_path / "all.jsonl"
        assert await cli(source, "export", "--format", "memshift-jsonl", "--all-scopes", "-o", str(out)) == 0
        lines = out.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        assert (head["format"], head["model"], head["dimension"], head["scope"]) == (
            "memshift-jsonl", "all-MiniLM-L6-v2", 384, None)
        kinds = [json.loads(x)["kind"] for x in lines[1:]]
        assert kinds.count("vector") == 7  # every live entity's, with its model named in the header
        assert sum(1 for x in lines[1:] if json.loads(x).get("deleted")) >= 3  # the tombstones travel too
        capsys.readouterr()
        assert await cli(restored, "import", str(out)) == 0
        said = capsys.readouterr().out
        assert "vectors kept" in said and "0 entities embedded" in said  # nothing re-embedded: the model matches
        a, b = source.server.engine.stores.primary, restored.server.engine.stores.primary
        report = None
        async for report in verify(a, b):  # noqa: B007 - the last report is the whole run's
            pass
        assert report is not None and report.done and report.differences == 0 and report.compared == 15
        assert await everything(a) == await everything(b)  # tombstones (which Verify does not compare) too
        keys = [(s, n) for s in ("team-a", "team-b") for n in ("alice", "bob", "paris", "Straße 7")]
        mine, theirs = await a.get_vectors(keys), await b.get_vectors(keys)
        assert mine.keys() == theirs.keys() and len(mine) == 7
        for k in mine:
            assert mine[k][0] == theirs[k][0] and np.array_equal(mine[k][1], theirs[k][1])
        # the restored store answers as the original did, through the API
        for scope in ("team-a", "team-b"):
            for stub in (source.memory, restored.memory):
                got = await stub.SemanticSearch(pb.SemanticSearchRequest(scope=scope, query="tea", limit=1))
                assert got.results[0].entity.name == "alice"
            assert (await source.memory.ReadGraph(pb.ReadGraphRequest(scope=scope))
                    == await restored.memory.ReadGraph(pb.ReadGraphRequest(scope=scope)))
    finally:
        await shutdown(source)
        await shutdown(restored)


async def test_restoring_a_backup_into_a_live_migrating_store_keeps_every_newer_write(
        cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await fill(cluster)
    out = tmp_path / "team-a.jsonl"
    assert await cli(cluster, "export", "--format", "memshift-jsonl", "--scope", "team-a", "-o", str(out)) == 0
    assert {json.loads(x)["scope"] for x in out.read_text(encoding="utf-8").splitlines()} == {"team-a"}
    # after the backup: newer writes of every kind over what it holds
    await cluster.memory.AddObservations(pb.AddObservationsRequest(scope="team-a", observations=[
        pb.ObservationAddition(entity_name="alice", contents=["moved to Lyon"])]))
    await cluster.memory.DeleteObservations(pb.DeleteObservationsRequest(scope="team-a", deletions=[
        pb.ObservationDeletion(entity_name="alice", observations=["drinks green tea"])]))
    await cluster.memory.DeleteEntities(pb.DeleteEntitiesRequest(scope="team-a", entity_names=["bob"]))
    await cluster.memory.DeleteRelations(pb.DeleteRelationsRequest(scope="team-a", relations=[
        pb.Relation(**{"from": "alice"}, to="paris", relation_type="lives_in")]))
    before = await cluster.memory.ReadGraph(pb.ReadGraphRequest(scope="team-a"))
    await cluster.admin.StartMigration(apb.StartMigrationRequest(target=cluster.target), metadata=AUTH)
    await wait_for(cluster, lambda s: s.backfill.complete)
    capsys.readouterr()
    assert await cli(cluster, "import", "--dry-run", str(out)) == 0
    assert "would apply 0 records newer than the store's" in capsys.readouterr().out
    assert await cli(cluster, "import", str(out)) == 0
    assert "applied 0 records newer" in capsys.readouterr().out
    assert await cluster.memory.ReadGraph(pb.ReadGraphRequest(scope="team-a")) == before
    # what a backup brings that the store lacks reaches both stores of the migration; this one was made on a
    # machine whose clock ran an hour ahead
    ahead = (time.time_ns() // 1_000_000 + 3_600_000) << (COUNTER_BITS + NODE_BITS)
    old = tmp_path / "old-b.jsonl"
    lines = [backup.header_line(backup.Header("all-MiniLM-L6-v2", 384, "team-b")),
             backup.record_line(EntityRecord("team-b", "dora", "person", ahead, ahead)),
             backup.record_line(ObservationRecord("team-b", "dora", "was restored", ahead, ahead))]
    old.write_text("\n".join(lines), encoding="utf-8")
    assert await cli(cluster, "import", str(old)) == 0
    got = await cluster.memory.OpenNodes(pb.OpenNodesRequest(scope="team-b", names=["dora"]))
    assert [(e.name, list(e.observations)) for e in got.entities] == [("dora", ["was restored"])]
    secondary = cluster.server.engine.stores.secondary
    assert secondary is not None
    assert [e.name for e in (await secondary.open_nodes("team-b", ["dora"])).entities] == ["dora"]
    assert (await run_verify(cluster)).differences == 0
    # a write made after the restore orders after the restored records, though their versions were ahead
    await cluster.memory.DeleteEntities(pb.DeleteEntitiesRequest(scope="team-b", entity_names=["dora"]))
    assert not (await cluster.memory.OpenNodes(pb.OpenNodesRequest(scope="team-b", names=["dora"]))).entities
    assert (await status(cluster)).repair_queue_depth == 0


async def test_a_bad_backup_line_is_named_and_nothing_is_written(
        cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = backup.header_line(backup.Header("all-MiniLM-L6-v2", 384, None))
    good = backup.record_line(EntityRecord("s", "alice", "person", 5, 5))
    bad = good.replace('"version": 5', '"version": "5"')
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([header, good, bad]), encoding="utf-8")
    capsys.readouterr()
    assert await cli(cluster, "import", str(path)) == 2
    assert "line 3: version must be an integer" in capsys.readouterr().err
    assert not (await cluster.memory.ReadGraph(pb.ReadGraphRequest(scope="s"))).entities
    # the proxy checks what it is sent with the same rules, the whole chunk before any of it is written
    nul = backup.record_line(ObservationRecord("s", "alice", "a \x00 inside", 5, 5))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cluster.admin.ImportRecords(apb.ImportRecordsRequest(header=header, lines=[good, nul], first_line=2),
                                          metadata=AUTH)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "line 3: text: must not contain NUL" in (refused.value.details() or "")
    assert not (await cluster.memory.ReadGraph(pb.ReadGraphRequest(scope="s"))).entities
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cluster.admin.ImportRecords(apb.ImportRecordsRequest(header='{"type":"entity"}', lines=[good]),
                                          metadata=AUTH)
    assert "header" in (refused.value.details() or "") and "mcp-jsonl" in (refused.value.details() or "")


async def test_backups_need_the_admin_token(cluster: Cluster) -> None:
    """Every scope's memory in one stream: the admin token guards it, not a scope's memory token."""
    for call in (lambda: cluster.admin.ExportRecords(apb.ExportRecordsRequest()).read(),
                 lambda: cluster.admin.ImportRecords(apb.ImportRecordsRequest()),
                 lambda: cluster.admin.ExportRecords(apb.ExportRecordsRequest(),
                                                     metadata=(("authorization", "Bearer wrong"),)).read()):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


_names = st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=12).filter(str.strip)
_versions = st.integers(1, backup.MAX_VERSION)
_meta = st.dictionaries(_names, st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]),
                                        max_size=12), max_size=3)
_scopes = st.from_regex(r"[a-z0-9][a-z0-9._:/-]{0,8}", fullmatch=True)
_records = st.one_of(
    st.builds(EntityRecord, _scopes, _names, _names, _versions, _versions, st.integers(0, backup.MAX_VERSION),
              st.booleans(), _meta),
    st.builds(ObservationRecord, _scopes, _names,
              st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), min_size=1,
                      max_size=20).filter(str.strip), _versions, _versions, st.booleans()),
    st.builds(RelationRecord, _scopes, _names, _names, _names, _versions, st.booleans(), _meta))


@given(st.lists(_records, max_size=8), st.lists(st.tuples(_scopes, _names, st.lists(
    st.floats(-1, 1, width=32), min_size=4, max_size=4)), max_size=3))
def test_every_record_and_vector_reads_back_exactly_as_it_was_written(
        records: list[EntityRecord | ObservationRecord | RelationRecord],
        vectors: list[tuple[str, str, list[float]]]) -> None:
    header = backup.Header("m", 4, None)
    vmap = {(s, n): ("h", np.array(v, dtype=np.float32)) for s, n, v in vectors}
    lines = [backup.header_line(header), *map(backup.record_line, records), *backup.vector_lines(vmap)]
    head, body = backup.parse(lines, Limits())
    items = [item for _, item in body]
    assert head == header
    assert items[:len(records)] == records
    read = backup.vector_map(i for i in items[len(records):] if isinstance(i, backup.VectorLine))
    assert read.keys() == vmap.keys()
    assert all(np.array_equal(read[k][1], vmap[k][1]) and read[k][0] == "h" for k in vmap)


@given(st.sampled_from(["version", "created", "purged", "name", "scope", "deleted", "metadata"]),
       st.sampled_from([None, "", -1, 2**63, 1.5, [], {"k": 1}, "x\x00y", True]))
def test_a_field_out_of_the_value_domain_is_refused_naming_line_and_field(field: str, value: object) -> None:
    rec = json.loads(backup.record_line(EntityRecord("s", "alice", "person", 5, 5, 0, False, {"k": "v"})))
    rec[field] = value
    try:
        list(backup.parse_body([(7, json.dumps(rec))], backup.Header("m", 4, None), Limits()))
    except JsonlError as exc:
        assert str(exc).startswith("line 7: ") and field in str(exc)
    else:  # of these values, only a flag's is in its field's domain
        assert (field, value) == ("deleted", True)


async def test_vectors_made_by_another_model_are_left_out_and_the_store_embeds_again(
        cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "other-model.jsonl"
    vmap = {("s", "alice"): ("not-this-text", np.ones(8, dtype=np.float32))}
    path.write_text("\n".join([backup.header_line(backup.Header("some-other-model", 8, "s")),
                               backup.record_line(EntityRecord("s", "alice", "person", 9, 9)),
                               backup.record_line(ObservationRecord("s", "alice", "drinks green tea", 9, 9)),
                               *backup.vector_lines(vmap)]), encoding="utf-8")
    capsys.readouterr()
    assert await cli(cluster, "import", str(path)) == 0
    said = capsys.readouterr().out
    assert "vectors left out: the file's model differs" in said and "applied 2 records" in said
    found = await cluster.memory.SemanticSearch(pb.SemanticSearchRequest(scope="s", query="tea", limit=1))
    assert [r.entity.name for r in found.results] == ["alice"] and found.results[0].score > 0.3
