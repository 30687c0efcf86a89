"""The proxy's smaller parts: clock, config, stubs, embedding batching, store start-up checks."""

from __future__ import annotations

import asyncio
import filecmp
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.embedded import SCHEMA_VERSION, EmbeddedBackend
from adapters.embedder import BatchingEmbedder, EmbeddingInfo
from adapters.errors import (
    ConfigError,
    Conflict,
    EmbeddingMismatch,
    EntityNotFound,
    InvalidInput,
    ProxyError,
    StoreSpecError,
)
from adapters.model import Entity, Relation
from adapters.records import (
    EntityRecord,
    Kind,
    ObservationRecord,
    RelationRecord,
    embedding_text,
    record_digest,
    same_content,
    text_hash,
)
from proxy.engine.backends import backend_for, redact
from proxy.engine.clock import MAX_NODE, HybridClock, unpack
from proxy.runtime.config import load_config
from proxy.transports.servicer import status_for  # imports every module that defines an error class

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / "clients" / "python" / "memshift" / "v1"


def test_checked_in_stubs_match_proto(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    generated = sorted(p.name for p in (tmp_path / "memshift" / "v1").glob("*_pb2*"))
    assert generated, "nothing generated"
    for name in generated:
        assert filecmp.cmp(tmp_path / "memshift" / "v1" / name, STUBS / name, shallow=False), (
            f"clients/python/memshift/v1/{name} is stale: run `make proto` and commit the result")


@settings(max_examples=200)
@given(walls=st.lists(st.integers(0, 2**40), min_size=1, max_size=200), node=st.integers(0, MAX_NODE),
       seen=st.lists(st.integers(0, 2**62), max_size=5))
def test_clock_versions_strictly_increase_and_carry_the_node(walls: list[int], node: int, seen: list[int]) -> None:
    it = iter(walls)
    clock = HybridClock(node, wall_ms=lambda: next(it, walls[-1]))
    last = 0
    for i in range(len(walls)):
        if i < len(seen):
            clock.observe(seen[i])
            last = max(last, seen[i])
        v = clock.now()
        assert v > last and unpack(v)[2] == node and v < 2**63
        last = v


def test_clock_never_goes_back_when_the_wall_clock_does() -> None:
    walls = iter([1000, 900, 900, 1200])
    clock = HybridClock(3, wall_ms=lambda: next(walls))
    versions = [clock.now() for _ in range(4)]
    assert versions == sorted(versions) and len(set(versions)) == 4


def test_config_layers_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("listen: 0.0.0.0:6000\nlimits:\n  max_items_per_call: 10\n")
    cfg = load_config(f, env={"MEMSHIFT_STORE": "sqlite:///x.db", "MEMSHIFT_NODE_ID": "7"})
    assert (cfg.listen, cfg.store, cfg.node_id, cfg.limits.max_items_per_call) == ("0.0.0.0:6000", "sqlite:///x.db",
                                                                                   7, 10)
    assert load_config(env={}).store == "sqlite:///./data/memory.db"
    f.write_text("limits:\n  max_itemz: 3\n")
    with pytest.raises(ConfigError, match=r"limits: unknown setting.*max_itemz"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="node_id"):
        load_config(env={"MEMSHIFT_NODE_ID": "5000"})
    with pytest.raises(ConfigError, match="grace_seconds: expected float"):
        load_config(env={"MEMSHIFT_GRACE_SECONDS": "soon"})
    with pytest.raises(ConfigError, match=r"agent_latency_target: 0\.5 would have bulk work rest"):
        load_config(env={"MEMSHIFT_AGENT_LATENCY_TARGET": "0.5"})
    assert load_config(env={"MEMSHIFT_AGENT_LATENCY_TARGET": "0"}).agent_latency_target == 0
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", env={})


def test_store_specs(embedder: BatchingEmbedder) -> None:
    assert backend_for("sqlite:///./data/m.db", embedder).name == "sqlite:m.db"
    with pytest.raises(StoreSpecError, match="unknown scheme"):
        backend_for("mongodb://x", embedder)
    with pytest.raises(StoreSpecError, match="no scheme"):
        backend_for("memory.db", embedder)
    assert redact("postgresql://user:secret@db:5432/mem") == "postgresql://***@db:5432/mem"
    assert redact("bolt://neo4j:secret@graph:7687/mem") == "bolt://***@graph:7687/mem"
    hybrid = redact("hybrid:?graph=bolt://neo4j:secret@graph:7687?prefix=M&vectors=qdrant://vec:6333")
    assert "secret" not in hybrid and hybrid.startswith("hybrid:?graph=bolt://***@graph:7687")
    with pytest.raises(StoreSpecError, match="prefix") as bad:
        backend_for("bolt://neo4j:secret@graph:7687?prefix=Bad-Label", None)  # type: ignore[arg-type]
    assert "secret" not in str(bad.value)


async def test_concurrent_callers_share_model_batches(embedder: BatchingEmbedder) -> None:
    batches = embedder.batches
    texts = [f"unique sentence number {i} for batching" for i in range(48)]
    out = await asyncio.gather(*(embedder.embed([t]) for t in texts))
    assert embedder.batches - batches <= 3  # 48 single-text callers, a handful of model passes
    alone = await embedder.embed([texts[5]])  # from the cache, identical
    assert (out[5] == alone).all()


# Texts the model meets: short queries, long notes past its 256 word pieces, non-Latin scripts, empty.
_MODEL_TEXTS = st.lists(st.one_of(
    st.text(max_size=40), st.text(alphabet="abc xyz.,", min_size=900, max_size=2000),
    st.sampled_from(["", "green tea", "Straße", "東京の天気", "🙂🙂", "a " * 400])), min_size=1, max_size=9)


@settings(max_examples=25, deadline=None)
@given(texts=_MODEL_TEXTS)
def test_the_lean_encode_gives_the_librarys_own_vectors(embedder: BatchingEmbedder, texts: list[str]) -> None:
    """`encode` calls the library's modules directly (faster for a query); the vectors must be the library's."""
    model = embedder._model
    ours, theirs = model.encode(texts, batch_size=4), model.library_encode(texts)
    cosines = (ours * theirs).sum(axis=1)
    assert cosines.min() > 0.9999, list(zip(texts, cosines, strict=True))
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


async def test_a_query_does_not_wait_behind_a_backlog_of_written_texts(embedder: BatchingEmbedder) -> None:
    """A bulk write queues texts for several model passes; a search's query, arriving after them, must run in the
    next pass, not after the backlog (an agent waits for it; the write was acknowledged long ago)."""
    backlog = [f"background note {uuid.uuid4()} about gardening" for _ in range(4 * 64)]
    bulk = asyncio.ensure_future(embedder.embed(backlog))
    await asyncio.sleep(0)  # the backlog is queued
    start = embedder.batches
    await embedder.embed([f"a question {uuid.uuid4()}"], urgent=True)
    assert embedder.batches - start <= 2  # at most the pass already running, then the query's own
    assert not bulk.done()
    await bulk


async def test_the_model_takes_its_next_batch_while_the_event_loop_is_busy(
        embedder: BatchingEmbedder, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's thread takes each next batch itself: an event loop busy with calls (here: blocked outright until
    two more passes have begun) must not leave the model idle between passes. Were the loop needed to hand over each
    batch, no pass could begin while it is blocked, however long the wait."""
    model = embedder._model
    passes: list[int] = []
    encode = model.encode

    def counted(texts: Any, batch_size: int = 64) -> Any:
        passes.append(len(texts))
        return encode(texts, batch_size)

    monkeypatch.setattr(model, "encode", counted)
    backlog = [f"busy loop note {uuid.uuid4()} about rowing" for _ in range(8 * 64)]
    bulk = asyncio.ensure_future(embedder.embed(backlog))
    await asyncio.sleep(0.05)  # the first pass is running
    before = len(passes)
    deadline = time.monotonic() + 60  # only a bound on a broken build; a working one is done in a few passes
    while len(passes) - before < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # noqa: ASYNC251 - blocking is the point: the loop can do nothing meanwhile
    during = len(passes) - before
    await bulk
    assert during >= 2, f"{during} model passes began while the loop was blocked"
    assert sum(passes) >= len(backlog)


class _OtherModel:
    info = EmbeddingInfo("another-model", 384)

    async def embed(self, texts: list[str]) -> None:
        raise AssertionError("not used")


async def test_store_refuses_data_written_with_another_model(embedder: BatchingEmbedder, tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    store = EmbeddedBackend(path, embedder)
    await store.open()
    await store.create_entities("s", [Entity("a", "t")], 1)
    await store.close()
    other = EmbeddedBackend(path, _OtherModel())  # type: ignore[arg-type]
    with pytest.raises(EmbeddingMismatch, match=r"all-MiniLM-L6-v2.*another-model"):
        await other.open()


async def test_data_and_vectors_survive_a_restart_and_stale_vectors_heal(embedder: BatchingEmbedder,
                                                                         tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    store = EmbeddedBackend(path, embedder)
    await store.open()
    await store.create_entities("s", [Entity("tea", "drink", ("green tea from Japan",)),
                                      Entity("car", "vehicle", ("a red sports car",))], 1)
    await store.close()
    import sqlite3
    with sqlite3.connect(path) as conn:  # as if the process died between commit and embedding
        conn.execute("DELETE FROM vectors WHERE name='tea'")
    store = EmbeddedBackend(path, embedder)
    await store.open()
    q = (await embedder.embed(["a cup of green tea"]))[0]
    res = await store.semantic_search("s", q, 2, None, [])
    assert [r.entity.name for r in res.results] == ["tea", "car"]
    await store.close()


_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE entities (scope TEXT NOT NULL, name TEXT NOT NULL, entity_type TEXT NOT NULL, metadata TEXT NOT NULL,
    version INTEGER NOT NULL, created INTEGER NOT NULL, purged INTEGER NOT NULL, deleted INTEGER NOT NULL,
    embed_hash TEXT, vector_hash TEXT, vector BLOB, PRIMARY KEY (scope, name)) WITHOUT ROWID;
CREATE TABLE observations (scope TEXT NOT NULL, entity TEXT NOT NULL, text TEXT NOT NULL,
    version INTEGER NOT NULL, created INTEGER NOT NULL, deleted INTEGER NOT NULL,
    PRIMARY KEY (scope, entity, text)) WITHOUT ROWID;
CREATE TABLE relations (scope TEXT NOT NULL, source TEXT NOT NULL, relation_type TEXT NOT NULL,
    target TEXT NOT NULL, metadata TEXT NOT NULL, version INTEGER NOT NULL, deleted INTEGER NOT NULL,
    PRIMARY KEY (scope, source, relation_type, target)) WITHOUT ROWID;
"""


async def test_a_schema_1_file_is_upgraded_with_its_vectors(embedder: BatchingEmbedder, tmp_path: Path) -> None:
    """Files written before vectors moved to their own table open with every record and vector kept: nothing is
    embedded again, and search answers as before."""
    import sqlite3
    texts = {"tea": embedding_text("tea", "drink", ("green tea from Japan",)),
             "car": embedding_text("car", "vehicle", ("a red sports car",))}
    vectors = dict(zip(texts, await embedder.embed(list(texts.values())), strict=True))
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA_1)
        info = embedder.info
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [("embedding_model", info.model),
                                                            ("embedding_dim", str(info.dimension)),
                                                            ("schema_version", "1")])
        for i, (name, etype, obs) in enumerate((("tea", "drink", "green tea from Japan"),
                                                ("car", "vehicle", "a red sports car"))):
            h = text_hash(texts[name])
            conn.execute("INSERT INTO entities VALUES ('s', ?, ?, '{}', ?, ?, 0, 0, ?, ?, ?)",
                         (name, etype, 1 + i, 1 + i, h, h, vectors[name].astype(np.float32).tobytes()))
            conn.execute("INSERT INTO observations VALUES ('s', ?, ?, ?, ?, 0)", (name, obs, 1 + i, 1 + i))
        conn.execute("INSERT INTO entities VALUES ('s', 'gone', 't', '{}', 5, 3, 5, 1, NULL, NULL, NULL)")
    store = EmbeddedBackend(path, embedder)
    await store.open()
    try:
        assert await store.embed_stale() == 0  # every vector came across: nothing to embed again
        q = (await embedder.embed(["a cup of green tea"]))[0]
        assert [r.entity.name for r in (await store.semantic_search("s", q, 2, None, [])).results] == ["tea", "car"]
        tomb = await store.get_records([(Kind.ENTITY, "s", ("gone",))])
        assert tomb == [EntityRecord("s", "gone", "t", 5, 3, 5, True)]
        assert (await store.get_vectors([("s", "tea")]))[("s", "tea")][0] == text_hash(texts["tea"])
        # The search index is built on open: an indexed needle (3+ characters) finds what the file held.
        assert [e.name for e in (await store.search_nodes("s", "GREEN TEA")).entities] == ["tea"]
        assert [e.name for e in (await store.search_nodes("s", "vehicl")).entities] == ["car"]
        assert (await store.search_nodes("s", "gon")).entities == ()
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert dict(conn.execute("SELECT key, value FROM meta"))["schema_version"] == str(SCHEMA_VERSION)
        assert "vector" not in {row[1] for row in conn.execute("PRAGMA table_info(entities)")}


async def test_vectors_are_held_in_memory_only_for_searched_scopes(embedder: BatchingEmbedder,
                                                                    tmp_path: Path) -> None:
    """A store that is only written to (a backfill's target) holds no vectors in memory; a search loads its own
    scope, and later writes to a loaded scope reach the index."""
    store = EmbeddedBackend(tmp_path / "m.db", embedder)
    await store.open()
    try:
        await store.create_entities("a", [Entity("tea", "drink", ("green tea",))], 1)
        await store.create_entities("b", [Entity("car", "vehicle", ("a red car",))], 2)
        await store.embed_stale()
        assert len(store._index) == 0
        q = (await embedder.embed(["tea"]))[0]
        assert [r.entity.name for r in (await store.semantic_search("a", q, 5, None, [])).results] == ["tea"]
        assert len(store._index) == 1 and store._index.scope_size("b") == 0
        await store.create_entities("a", [Entity("coffee", "drink", ("black coffee",))], 3)
        assert {r.entity.name for r in (await store.semantic_search("a", q, 5, None, [])).results} == {"tea", "coffee"}
        await store.delete_entities("a", ["tea"], 4)
        assert [r.entity.name for r in (await store.semantic_search("a", q, 5, None, [])).results] == ["coffee"]
        assert len(store._index) == 1
    finally:
        await store.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.integers(0, 5)), max_size=120))
def test_vector_index_matches_brute_force_across_blocks(steps: list[tuple[bool, int, int]]) -> None:
    import numpy as np

    import adapters.vector_index as vi
    old = vi.BLOCK_ROWS
    vi.BLOCK_ROWS = 8  # many blocks, and moves across block boundaries on removal
    try:
        rng = np.random.default_rng(1)
        index, model = vi.VectorIndex(4), {}
        for upsert, key, seed in steps:
            name = f"n{key}"
            if upsert:
                v = rng.standard_normal(4).astype(np.float32) + seed
                v /= np.linalg.norm(v)
                index.upsert("s", name, "t", v)
                model[name] = v
            else:
                index.remove("s", name)
                model.pop(name, None)
        q = np.ones(4, dtype=np.float32) / 2
        got = index.search("s", q, 1000, None, [])
        want = sorted(((n, float(v @ q)) for n, v in model.items()), key=lambda p: (-p[1], p[0]))
        assert [n for n, _ in got] == [n for n, _ in want] and len(index) == len(model)
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(got, want, strict=True))
    finally:
        vi.BLOCK_ROWS = old


async def test_overlapping_dirty_scope_refreshes_keep_every_queued_scope(embedder: BatchingEmbedder,
                                                                         tmp_path: Path) -> None:
    """The repair loop and a fleet broadcast refresh the dirty scopes at the same time; a scope queued during both
    stays dirty (its reads stay on the primary) and neither refresh fails."""
    from proxy.engine.control import SqliteControlStore
    from proxy.engine.migration import MigrationEngine

    async def open_store(spec: str) -> EmbeddedBackend:
        store = EmbeddedBackend(tmp_path / spec, embedder)
        await store.open()
        return store

    control = SqliteControlStore(tmp_path / "control.db", initial_primary="old.db")
    engine = MigrationEngine(control, open_store, HybridClock(1), background=False)
    await engine.start()
    try:
        first = asyncio.ensure_future(engine.repairs.refresh_scopes())
        second = asyncio.ensure_future(engine.repairs.refresh_scopes())
        await asyncio.sleep(0)
        await engine.repairs.enqueue([(Kind.ENTITY, "agent-1", ("a",))])
        await asyncio.gather(first, second)
        assert engine.repairs.scope_pending("agent-1")
        await engine.repairs.refresh_scopes()
        assert engine.repairs.scope_pending("agent-1")  # still queued in the control store
    finally:
        await engine.stop()
        await control.close()


_ENTITY = st.tuples(st.sampled_from(["s1", "s2"]), st.sampled_from("abcdefgh"), st.booleans(),
                    st.lists(st.tuples(st.sampled_from(["likes tea", "plays chess", "owns a cat"]), st.booleans()),
                             max_size=3))


@settings(max_examples=100, deadline=None)
@given(entities=st.lists(_ENTITY, max_size=12), relations=st.lists(st.tuples(st.sampled_from("abcdefgh"),
                                                                             st.sampled_from("abcdefgh")), max_size=4),
       size=st.integers(1, 12))
def test_embedded_export_page_equals_its_parts(embedder: BatchingEmbedder, entities: list[Any],
                                               relations: list[tuple[str, str]], size: int) -> None:
    """The embedded store answers a backfill's page in one pass, its vectors by key range; whatever the store holds
    (childless entities between owners, tombstones, several scopes) and however it is paged, that equals the list
    and vector calls it replaces."""
    from adapters.records import ObservationRecord, Record, RelationRecord
    from tests.stores import walk_checking_parts

    async def run() -> None:
        store = EmbeddedBackend(":memory:", embedder)
        await store.open()
        try:
            recs: list[Record] = []
            for v, (scope, name, deleted, observations) in enumerate(entities, start=1):
                recs.append(EntityRecord(scope, name, "thing", v, v, v if deleted else 0, deleted))
                recs += [ObservationRecord(scope, name, text, v, v, gone) for text, gone in observations]
            recs += [RelationRecord("s1", a, "knows", b, 100 + i) for i, (a, b) in enumerate(relations)]
            await store.apply(recs)
            await store.embed_stale()
            listed = await store.list_records(None, 10_000, tombstones=True)
            assert await walk_checking_parts(store, size) == list(listed.records)
        finally:
            await store.close()

    asyncio.run(run())


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_checkpoint_save_is_kept_and_later_saves_are_durable_again(kind: str, tmp_path: Path,
                                                                          servers: dict[str, str]) -> None:
    """Backfill checkpoints skip the disk flush (save(durable=False)): they must still be there for the next
    process, a lost compare-and-set must change nothing, and the relaxed flush must not leak into the phase
    changes and repair-queue writes that follow."""
    from dataclasses import replace

    from proxy.engine.control import ControlStore, SqliteControlStore
    from proxy.engine.control_pg import PostgresControlStore

    schema = uuid.uuid4().hex[:12]

    def make() -> ControlStore:
        if kind == "sqlite":
            return SqliteControlStore(tmp_path / "control.db", "sqlite:///a.db")
        return PostgresControlStore(f"{servers['postgres']}?schema=checkpoint_{schema}", "sqlite:///a.db")

    async def opened() -> ControlStore:
        store = make()
        if isinstance(store, PostgresControlStore):
            await store.open()
        return store

    control = await opened()
    state = await control.save(await control.load(), 0)
    state = await control.save(replace(state, backfill_done=10), state.revision, durable=False)
    with pytest.raises(Conflict):
        await control.save(replace(state, backfill_done=20), state.revision - 1, durable=False)
    if isinstance(control, SqliteControlStore):
        assert control._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    else:
        held = [await control._p().acquire() for _ in range(4)]  # the pool's every connection (max_size 4)
        try:
            for conn in held:
                assert await conn.fetchval("SHOW synchronous_commit") == "on"
        finally:
            for conn in held:
                await control._p().release(conn)
    await control.close()
    again = await opened()
    try:
        assert (await again.load()).backfill_done == 10
    finally:
        await again.close()


@given(done=st.integers(0, 10**9), seconds=st.floats(0, 1e7, allow_nan=False), batch=st.integers(1, 10_000),
       cursor=st.one_of(st.none(), st.tuples(st.sampled_from(list(Kind)), st.text(max_size=8),
                                             st.lists(st.text(max_size=8), min_size=1, max_size=3).map(tuple))))
def test_the_control_state_round_trips_and_loads_fields_of_a_newer_version(
        done: int, seconds: float, batch: int, cursor: Any) -> None:
    """A fleet is upgraded one proxy at a time, so an older proxy reads state its newer peers wrote: fields it does
    not know are left out, and everything it knows is read back as written."""
    import json

    from proxy.engine.control import MigrationOptions, MigrationState, Phase, state_json, state_load

    state = MigrationState(phase=Phase.DATA_MIGRATION, primary="sqlite:///a.db", secondary="sqlite:///b.db",
                           options=MigrationOptions(batch_size=batch), backfill_cursor=cursor, backfill_done=done,
                           backfill_seconds=seconds, ramp_steps=(0.1, 1.0))
    assert state_load(state_json(state)) == state
    newer = json.loads(state_json(state))
    newer["a_field_from_later"] = {"x": 1}
    newer["options"]["an_option_from_later"] = True
    assert state_load(json.dumps(newer)) == state


# Few values per field, so that equal and nearly equal pairs are common; metadata values that Python calls equal and
# JSON does not (True, 1, 1.0), and a `deleted` given as 0 instead of False.
_few = st.sampled_from(["a", "b"])
_num = st.sampled_from([1, 2])
_flag = st.sampled_from([False, True, 0])
_meta_values = st.dictionaries(_few, st.sampled_from([True, 1, 1.0, "1", None]), max_size=2)
_similar_records = st.one_of(
    st.builds(EntityRecord, _few, _few, _few, _num, _num, _num, _flag, _meta_values),
    st.builds(ObservationRecord, _few, _few, _few, _num, _num, _flag),
    st.builds(RelationRecord, _few, _few, _few, _few, _num, _flag, _meta_values))


_field_values = {"scope": _few, "name": _few, "entity": _few, "entity_type": _few, "text": _few, "source": _few,
                 "relation_type": _few, "target": _few, "version": _num, "created": _num, "purged": _num,
                 "deleted": _flag, "metadata": _meta_values}


@settings(max_examples=400)
@given(_similar_records, _similar_records, st.data())
def test_records_compare_equal_exactly_when_their_digests_do(a: Any, other: Any, data: st.DataObject) -> None:
    """Verify and the repair compare records with `same_content` (tuple equality when it decides, digests when not);
    it must judge every pair as the digests do: two records drawn alike, a record and a copy with a few fields
    redrawn, and records of different kinds."""
    changed = data.draw(st.sets(st.sampled_from(a._fields), max_size=2))
    near = a._replace(**{f: data.draw(_field_values[f]) for f in changed})
    for b in (other, near):
        assert same_content(a, b) == (record_digest(a) == record_digest(b))


@pytest.mark.parametrize("a, b", [
    (EntityRecord("s", "n", "t", 1, 1, metadata={"k": True}), EntityRecord("s", "n", "t", 1, 1, metadata={"k": 1})),
    (RelationRecord("s", "a", "r", "b", 1, metadata={"k": 1.0}),
     RelationRecord("s", "a", "r", "b", 1, metadata={"k": 1})),
    (ObservationRecord("s", "n", "x", 1, 1, False), ObservationRecord("s", "n", "x", 1, 1, 0)),  # type: ignore[arg-type]
    (EntityRecord("s", "n", "t", 1, 1), RelationRecord("s", "n", "t", 1, 1)),  # type: ignore[arg-type]
])
def test_records_equal_in_python_but_not_in_json_differ(a: Any, b: Any) -> None:
    """The traps of plain equality, each pinned: True == 1 == 1.0 in metadata, False == 0, tuples of other kinds."""
    assert a == b or type(a) is not type(b)
    assert not same_content(a, b)


async def test_an_agents_write_does_not_queue_behind_a_backfill_page_read(
        embedder: BatchingEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Race caught at a million entities: the page reads of a backfill (and StartMigration's count) ran on the
    embedded store's only connection, so an agent's write waited for them. A page read held open here (a wrapper
    around the real read) must not hold a write; the page then reads normally."""
    import threading

    store = EmbeddedBackend(tmp_path / "m.db", embedder)
    await store.open()
    await store.create_entities("s", [Entity(f"e{i}", "t", (f"fact {i}",)) for i in range(20)], 1)
    entered, release = threading.Event(), threading.Event()
    real = EmbeddedBackend._list_page

    def held(self: EmbeddedBackend, conn: Any, after: Any, limit: int, tombstones: bool, until: int = 0) -> Any:
        entered.set()
        release.wait(30)
        return real(self, conn, after, limit, tombstones, until)

    monkeypatch.setattr(EmbeddedBackend, "_list_page", held)
    try:
        page = asyncio.ensure_future(store.export_page(None, 100, vectors=True))
        assert await asyncio.to_thread(entered.wait, 30)
        created = await asyncio.wait_for(store.create_entities("s", [Entity("late", "t", ("written meanwhile",))], 2),
                                         timeout=20)
        assert [e.name for e in created.answer] == ["late"]
        assert not page.done()  # the write finished while the read was still held
    finally:
        release.set()
    got = await page
    assert {r.key[2][0] for r in got.records if r.key[0] == Kind.ENTITY} >= {f"e{i}" for i in range(20)}
    await store.close()


async def test_postgres_builds_its_vector_index_with_the_workers_its_spec_allows(
        embedder: BatchingEmbedder, servers: dict[str, str]) -> None:
    """`?index_workers=N` bounds the parallel build of the vector index (a build on every core starved agents'
    writes at a million entities); the setting stays with the build, not with the pool's connections."""
    for bad in ("-1", "two", "65"):
        with pytest.raises(StoreSpecError, match="index_workers"):
            backend_for(f"{servers['postgres']}?schema=idx_bad&index_workers={bad}", embedder)
    store = backend_for(f"{servers['postgres']}?schema=idx_workers&index_workers=0", embedder)
    await store.open()
    try:
        await store.create_entities("s", [Entity("tea", "drink", ("green tea",)), Entity("car", "vehicle", ())], 1)
        await store.embed_stale()
        await store.build_indexes()
        valid = await store._read(lambda conn: conn.fetchval(  # type: ignore[attr-defined]
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relname = 'entities_embedding_hnsw' AND n.nspname = 'idx_workers'"))
        assert valid is True
        settings_seen = {await store._read(lambda conn: conn.fetchval(  # type: ignore[attr-defined]
            "SHOW max_parallel_maintenance_workers")) for _ in range(12)}
        assert settings_seen == {"2"}  # the server's default on every pooled connection afterwards
        q = (await embedder.embed(["a cup of tea"]))[0]
        assert (await store.semantic_search("s", q, 1, None, [])).results[0].entity.name == "tea"
    finally:
        await store.close()


async def test_opening_an_entity_reads_its_own_relations_not_its_scopes(embedder: BatchingEmbedder,
                                                                        tmp_path: Path) -> None:
    """Stall caught at a million entities: the relations of an opened entity (OpenNodes, and the size check of
    every AddObservations) were found by their target by walking the scope's whole key range, 129 ms a call at
    125,000 relations a scope, on the connection agents write through. The work of opening one entity must not grow
    with the relations of its scope; counted in SQLite's virtual machine steps, not timed."""
    store = EmbeddedBackend(tmp_path / "m.db", embedder)
    await store.open()
    await store.create_entities("s", [Entity("hub", "t", ("the one opened",))], 1)
    await store.create_relations("s", [Relation("a", "hub", "knows"), Relation("hub", "b", "knows")], 2)
    assert store._conn is not None
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    async def opened_steps() -> int:
        nonlocal steps
        steps = 0
        store._conn.set_progress_handler(count, 10)  # type: ignore[union-attr]
        try:
            graph = await store.open_nodes("s", ["hub"])
        finally:
            store._conn.set_progress_handler(None, 10)  # type: ignore[union-attr]
        assert {(r.source, r.target) for r in graph.relations} >= {("a", "hub"), ("hub", "b")}
        return steps

    few = await opened_steps()
    version = 3
    for start in range(0, 20_000, 2_000):  # relations between other names of the same scope
        await store.create_relations("s", [Relation(f"x{i:05d}", f"y{i:05d}", "knows")
                                           for i in range(start, start + 2_000)], version)
        version += 1
    many = await opened_steps()
    assert many < few * 3 + 50, f"opening one entity took {many} steps at 20,000 relations, {few} at 2"
    await store.close()


def _every_error_class(root: type[ProxyError]) -> list[type[ProxyError]]:
    found = []
    for cls in root.__subclasses__():
        found += [cls, *_every_error_class(cls)]
    return found


def test_every_deliberate_error_means_one_status_named_once() -> None:
    """Each error class names its status in its own definition; the servicer (and the MCP door through it) turns that
    name into the gRPC status, with the class's own wording. A class that names none is a bug's INTERNAL."""
    classes = _every_error_class(ProxyError)
    assert len(classes) >= 12
    for cls in classes:
        exc = (cls(["ghost"]) if cls.__name__ == "EntityNotFound" else  # type: ignore[call-arg]
               cls(3, "must be a JSON object") if cls.__name__ == "JsonlError" else  # type: ignore[call-arg]
               cls("listen", "127.0.0.1:1", "taken") if cls.__name__ == "ListenError" else  # type: ignore[call-arg]
               cls("names[0]", "must not be empty") if issubclass(cls, InvalidInput) else  # type: ignore[call-arg]
               cls("what happened"))
        mapped = status_for(exc)
        if cls.code == "INTERNAL":
            assert mapped is None, cls
            continue
        assert mapped == (grpc.StatusCode[cls.code], exc.detail()), cls
        assert str(exc) in mapped[1], cls  # the class's wording may add to the message, never drop it
    assert status_for(KeyError("not ours")) is None
    # What callers rely on, written out: a class moved in the tree or given another code shows up here.
    expected = {"InvalidInput": "INVALID_ARGUMENT", "OverLimit": "RESOURCE_EXHAUSTED", "JsonlError": "INVALID_ARGUMENT",
                "StoreSpecError": "INVALID_ARGUMENT", "IllegalTransition": "FAILED_PRECONDITION",
                "FleetUnsafe": "FAILED_PRECONDITION",
                "EntityNotFound": "NOT_FOUND", "StoreUnavailable": "UNAVAILABLE", "EmbeddingMismatch": "UNAVAILABLE",
                "LeaseLapsed": "UNAVAILABLE", "RepairNotRecorded": "UNAVAILABLE", "PhaseUnknown": "UNAVAILABLE",
                "NoCredential": "UNAUTHENTICATED", "NotGranted": "PERMISSION_DENIED",
                "Conflict": "ABORTED", "StoreError": "INTERNAL", "UnreadableState": "INTERNAL",
                "ConfigError": "INVALID_ARGUMENT", "PolicyError": "INVALID_ARGUMENT",
                "TokensFileError": "INVALID_ARGUMENT", "ListenError": "INVALID_ARGUMENT"}
    assert {cls.__name__: cls.code for cls in classes} == expected
    # One module holds them all, and none shares a name with an exception of the Python client.
    assert {cls.__module__ for cls in classes} == {"adapters.errors"}
    import memshift
    client_names = {n for n in dir(memshift) if isinstance(getattr(memshift, n), type)
                    and issubclass(getattr(memshift, n), Exception)}
    assert client_names and not client_names & {cls.__name__ for cls in [ProxyError, *classes]}


def test_no_module_but_the_error_module_defines_an_exception() -> None:
    """Every error the server raises is in adapters/errors.py (a private control-flow signal, named with `_`,
    may live where it is used)."""
    import ast
    root = Path(__file__).resolve().parent.parent
    for path in [*root.glob("proxy/**/*.py"), *root.glob("adapters/*.py"), *root.glob("policies/*.py")]:
        if path == root / "adapters" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                assert not bases & {"Exception", "ValueError", "ProxyError", "RuntimeError"} and \
                    not any(b.endswith("Error") for b in bases), f"{path.relative_to(root)}: {node.name}"
    assert status_for(EntityNotFound(["ghost"])) == (grpc.StatusCode.NOT_FOUND,
                                                      "entity not found: ghost; nothing of this call was stored")


@pytest.mark.parametrize(("setting", "spec", "says"), [
    ("MEMSHIFT_CONTROL", "postgresql://u:pw-9@db:notaport/x", "control: store spec postgresql://***@db:notaport/x: "
                                                             "port 'notaport' is not a number from 1 to 65535"),
    ("MEMSHIFT_STORE", "mysql://db/x", "store: store spec mysql://db/x: unknown scheme 'mysql'"),
])
def test_a_spec_that_cannot_be_used_stops_the_config_naming_the_setting(setting: str, spec: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {setting: spec})
    assert str(err.value).startswith(says) and "pw-9" not in str(err.value)
