"""`make bench` (second table): the migration engine on identical embedded stores, baselines from the same run.

    python -m bench.migration [--entities 20000] [--memory-entities 200000] [--writes 2000] [--rounds 5]

- write latency through the proxy: one proxy left in NotStarted and one dual-writing, measured in alternating rounds;
- read latency in DualWrite with and without 100 % shadow reads, back to back and paced like an agent;
- write latency with no migration vs while dual-writing (parallel) — measured at the engine, without gRPC, which
  is the harsher ratio (the transport would add the same constant to both);
- backfill with vectors kept vs the target store's own bulk path (`apply` of whole pages with their vectors);
- the process's memory growth while backfilling a large store (in a fresh process), and what a first search of the
  target then adds when it loads that scope's vectors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np

from adapters.base import Backend, VectorMap
from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder, SentenceTransformerModel
from adapters.export import export_pages
from adapters.model import Entity, ObservationAddition, Relation
from adapters.records import Record
from bench import generated
from bench.__main__ import Table, free_port, wait_ready
from bench.__main__ import start as start_process
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import admin_pb2_grpc, memory_pb2_grpc
from memshift.v1 import memory_pb2 as pb
from proxy.engine.backends import backend_for
from proxy.engine.clock import HybridClock
from proxy.engine.control import MigrationOptions, Phase, SqliteControlStore
from proxy.engine.migration import MigrationEngine
from proxy.routing import ops


def alternating(rounds: int, *sides: str) -> Iterator[tuple[int, str]]:
    """(round, side) for every side in every round, the order reversed every other round: a slow spell of this shared
    machine then lands on all sides alike."""
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            yield r, side


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def fill(store: Backend, n: int, scope: str = "bench") -> None:
    """n entities with one observation each, with generated vectors (`bench.generated`)."""
    await generated.load(store, scope, [Entity(f"e{i:07d}", "thing", (f"fact {i} about topic {i % 97}",))
                                        for i in range(n)])


async def pages_of(src: Backend, size: int = 500) -> list[tuple[tuple[Record, ...], VectorMap]]:
    """Every page a backfill of `src` reads (records and the vectors it keeps), read as the backfill reads them."""
    return [(page.records, page.vectors or {}) async for page in export_pages(src, size, vectors=True)]


async def bulk_rate(store: Backend, pages: list[tuple[tuple[Record, ...], VectorMap]]) -> float:
    """Records per second the opened `store` takes `pages` in through its own bulk path (then closes it): the
    baseline a backfill is held against."""
    t = time.perf_counter()
    for recs, vecs in pages:
        await store.load(recs, vecs)
    await store.embed_stale()
    await store.build_indexes()
    rate = sum(len(r) for r, _ in pages) / (time.perf_counter() - t)
    await store.close()
    return rate


async def read_rate(path: Path, embedder: BatchingEmbedder) -> float:
    """Records per second a backfill's reads (pages plus their vectors) take from the embedded store at `path`. Each
    page is dropped once read, as the backfill drops it once applied."""
    src = EmbeddedBackend(path, embedder)
    await src.open()
    t = time.perf_counter()
    records = sum([len(page.records) async for page in export_pages(src, 500, vectors=True)])
    secs = time.perf_counter() - t
    await src.close()
    return records / secs


async def engine_on(work: Path, embedder: BatchingEmbedder, a: str) -> tuple[MigrationEngine, SqliteControlStore]:
    """A started engine (background backfill) whose primary is the store spec `a`; any store spec can be a target."""
    async def open_store(spec: str) -> Backend:
        store = backend_for(spec, embedder)
        await store.open()
        return store

    control = SqliteControlStore(work / f"control-{time.monotonic_ns()}.db", initial_primary=a)
    engine = MigrationEngine(control, open_store, HybridClock(5))
    await engine.start()
    return engine, control


async def settle(engine: MigrationEngine) -> None:
    """Let background embeddings finish, so the model does not compete with the next measurement."""
    for store in (engine.stores.primary, engine.stores.secondary):
        if store is not None:
            dim = store.embedding.dimension
            await store.semantic_search("bench", np.ones(dim, dtype=np.float32) / np.sqrt(dim), 1, None, [])


async def write_latency(engine: MigrationEngine, n: int, kind: str, tag: str = "") -> list[float]:
    await settle(engine)
    lat = []
    counter = itertools.count()
    for _ in range(n + 50):
        i = next(counter)
        op: ops.WriteOp[object]
        if kind == "relation":
            op = ops.CreateRelations("bench", [Relation(f"e{i % 1000:07d}", f"e{(i * 7) % 1000:07d}", f"r{i}{tag}")])
        else:
            op = ops.AddObservations("bench", [ObservationAddition(f"e{i % 1000:07d}", (f"note {i} {tag}",))])
        t = time.perf_counter()
        await engine.writer.write(op)
        lat.append(time.perf_counter() - t)
    return lat[50:]


async def wait_backfill(engine: MigrationEngine) -> float:
    t = time.perf_counter()
    while not engine.state.backfill_complete:  # noqa: ASYNC110 - polling the engine's state, as an operator does
        await asyncio.sleep(0.005)
    return time.perf_counter() - t


@contextlib.asynccontextmanager
async def proxy(work: Path, name: str) -> AsyncIterator[tuple[memory_pb2_grpc.MemoryStub,
                                                                admin_pb2_grpc.MigrationAdminStub]]:
    """A proxy in its own process on `work/name-a.db`, with 500 entities; yields its memory and admin stubs."""
    port, admin_port = free_port(), free_port()
    proc = start_process(["-m", "proxy.cli", "serve"], {
        "MEMSHIFT_LISTEN": f"127.0.0.1:{port}", "MEMSHIFT_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "MEMSHIFT_MCP_LISTEN": "127.0.0.1:0",
        "MEMSHIFT_STORE": f"sqlite:///{work}/{name}-a.db", "MEMSHIFT_CONTROL": f"sqlite:///{work}/{name}-control.db",
        "MEMSHIFT_ADMIN_TOKEN": "bench", "MEMSHIFT_LOG_LEVEL": "WARNING"}, work)
    try:
        await wait_ready(f"127.0.0.1:{port}", proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as mch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{admin_port}") as ach:
            memory = memory_pb2_grpc.MemoryStub(mch)
            await memory.CreateEntities(pb.CreateEntitiesRequest(scope="bench", entities=[
                pb.Entity(name=f"e{i:04d}", entity_type="thing", observations=[f"fact {i}"]) for i in range(500)]))
            yield memory, admin_pb2_grpc.MigrationAdminStub(ach)
    finally:
        proc.terminate()
        proc.wait(10)


async def through_proxy(work: Path, table: Table, writes: int) -> None:
    """What an agent sees: write latency through a proxy (its own process) with no migration, and through another
    one dual-writing, measured in alternating rounds so a slow spell of this shared machine lands on both alike."""
    auth = (("authorization", "Bearer bench"),)
    async with proxy(work, "solo") as (solo, _), proxy(work, "dual") as (dual, admin):
        await admin.StartMigration(apb.StartMigrationRequest(target=f"sqlite:///{work}/dual-b.db"), metadata=auth)
        while not (await admin.GetStatus(apb.GetStatusRequest(), metadata=auth)).backfill.complete:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=auth)
        for memory in (solo, dual):  # both embedding queues settled before measuring
            await memory.SemanticSearch(pb.SemanticSearchRequest(scope="bench", query="settle"))
        counter = itertools.count()

        async def measure(memory: memory_pb2_grpc.MemoryStub, n: int) -> list[float]:
            lat = []
            for _ in range(n + 10):  # the first calls of a round wake a proxy that sat idle during the other's
                i = next(counter)
                rel = pb.Relation(**{"from": f"e{i % 500:04d}"}, to=f"e{(i * 7) % 500:04d}", relation_type=f"r{i}")
                t = time.perf_counter()
                await memory.CreateRelations(pb.CreateRelationsRequest(scope="bench", relations=[rel]))
                lat.append(time.perf_counter() - t)
            return lat[10:]

        lat: dict[str, list[float]] = {"solo": [], "dual": []}
        for _, name in alternating(20, "solo", "dual"):
            lat[name] += await measure(solo if name == "solo" else dual, writes // 20)
        ratio = statistics.median(lat["dual"]) / statistics.median(lat["solo"])
        table.add("proxy CreateRelations over gRPC, NotStarted", lat["solo"])
        table.add("proxy CreateRelations over gRPC, DualWrite", lat["dual"], note=f"{ratio:.2f} x NotStarted p50")
        await shadow_reads(dual, admin, auth, table, writes)


async def shadow_reads(memory: memory_pb2_grpc.MemoryStub, admin: admin_pb2_grpc.MigrationAdminStub,
                       auth: tuple[tuple[str, str], ...], table: Table, reads: int) -> None:
    """Read latency in DualWrite without and with every read shadowed, alternating in rounds so drift on a busy
    machine lands on both sides alike. Two client patterns: back to back (one client saturating the proxy: the
    shadow's own store work competes with the next request for the proxy's CPU) and paced like an agent, whose memory
    calls are separated by model inference (here a mere 5 ms, far shorter than any real LLM turn)."""
    async def open_nodes(i: int) -> None:
        await memory.OpenNodes(pb.OpenNodesRequest(scope="bench", names=[f"e{i % 500:04d}", f"e{(i * 7) % 500:04d}"]))

    async def semantic(i: int) -> None:
        await memory.SemanticSearch(pb.SemanticSearchRequest(scope="bench", query=f"fact {i % 50}", limit=10))

    for i in range(50):  # every query's embedding cached, as a warm proxy has them
        await semantic(i)
    for label, call, n in (("OpenNodes", open_nodes, reads), ("SemanticSearch", semantic, reads // 2)):
        for pace, pattern in ((0.0, "back to back"), (0.005, "paced 5 ms")):
            lat: dict[float, list[float]] = {0.0: [], 1.0: []}
            for _ in range(20):  # rounds
                for rate in (0.0, 1.0):
                    await admin.SetReadRouting(apb.SetReadRoutingRequest(shadow_sample_rate=rate), metadata=auth)
                    for i in range(n // 20 + 10):
                        t = time.perf_counter()
                        await call(i)
                        if i >= 10:
                            lat[rate].append(time.perf_counter() - t)
                        if pace:
                            await asyncio.sleep(pace)
            ratio = statistics.median(lat[1.0]) / statistics.median(lat[0.0])
            table.add(f"proxy {label}, DualWrite, {pattern}, no shadow reads", lat[0.0])
            table.add(f"proxy {label}, DualWrite, {pattern}, 100% shadow reads", lat[1.0],
                      note=f"{ratio:.2f} x without shadow p50")
    await admin.SetReadRouting(apb.SetReadRoutingRequest(shadow_sample_rate=0.0), metadata=auth)


async def main(n: int, mem_n: int, writes: int, rounds: int) -> None:
    table = Table("migration")
    work = Path(tempfile.mkdtemp(prefix="memshift-mbench-"))
    embedder = BatchingEmbedder(SentenceTransformerModel())
    dim = embedder.info.dimension
    await through_proxy(work, table, writes)

    # --- dual-write latency, at the engine ----------------------------------------------------------------------
    # Two engines on identical stores, one left alone and one dual-writing, measured in alternating rounds (like the
    # proxies above) so a slow spell of this shared machine lands on both alike.
    for name in ("solo", "dual"):
        seed = EmbeddedBackend(work / f"engine-{name}.db", embedder)
        await seed.open()
        await fill(seed, 1000)
        await seed.close()
    solo_engine, solo_control = await engine_on(work, embedder, f"sqlite:///{work}/engine-solo.db")
    dual_engine, dual_control = await engine_on(work, embedder, f"sqlite:///{work}/engine-dual.db")
    await dual_engine.start_migration(f"sqlite:///{work}/engine-dual-b.db", MigrationOptions(batch_size=1000), "bench")
    await wait_backfill(dual_engine)
    await dual_engine.advance(Phase.DATA_MIGRATION, "bench")
    kinds = ("relation", "observation")
    lat: dict[tuple[str, str], list[float]] = {(e, k): [] for e in ("solo", "dual") for k in kinds}
    for r, name in alternating(10, "solo", "dual"):
        for k in kinds:
            lat[(name, k)] += await write_latency(solo_engine if name == "solo" else dual_engine, writes // 10, k,
                                                  f"{name}{r}")
    for k, label in (("relation", "CreateRelations"), ("observation", "AddObservations")):
        ratio = statistics.median(lat[("dual", k)]) / statistics.median(lat[("solo", k)])
        table.add(f"engine {label}, NotStarted (no gRPC)", lat[("solo", k)])
        table.add(f"engine {label}, DualWrite (no gRPC)", lat[("dual", k)], note=f"{ratio:.2f} x NotStarted p50")
    for engine, control in ((solo_engine, solo_control), (dual_engine, dual_control)):
        await engine.stop()
        await control.close()

    # --- backfill rate vs the target's raw bulk path ------------------------------------------------------------
    src = EmbeddedBackend(work / "src.db", embedder)
    await src.open()
    await fill(src, n)
    pages = await pages_of(src)
    await src.close()
    # Baseline, read and backfill alternate, in reversed order every other round, so neither a slow spell of this
    # shared machine nor going first or last favours one side; medians reported.
    raw_rates, rates, read_rates = [], [], []
    for r, side in alternating(rounds, "raw", "read", "backfill"):
        if side == "raw":
            raw = EmbeddedBackend(work / f"raw{r}.db", embedder)
            await raw.open()
            raw_rates.append(await bulk_rate(raw, pages))
        elif side == "read":
            read_rates.append(await read_rate(work / "src.db", embedder))
        else:
            engine, control = await engine_on(work, embedder, f"sqlite:///{work}/src.db")
            await engine.start_migration(f"sqlite:///{work}/dst{r}.db", MigrationOptions(batch_size=500), "bench")
            secs = await wait_backfill(engine)
            rates.append(engine.state.backfill_done / secs)
            await engine.stop()
            await control.close()
    raw_rate, rate = statistics.median(raw_rates), statistics.median(rates)
    ratios = sorted(b / a for a, b in zip(raw_rates, rates, strict=True))
    # Both stores run on one interpreter (and one SQLite thread), so reading the source adds to writing the target
    # instead of overlapping it: a copy can go no faster than 1 / (1/read + 1/write). That ceiling is the baseline.
    read = statistics.median(read_rates)
    ceiling = read * raw_rate / (read + raw_rate)
    table.add(f"target raw bulk apply, {n} entities + vectors (median of {rounds})", rate=raw_rate)
    table.add(f"reading the source alone, records + vectors (median of {rounds})", rate=read)
    table.add("one-process ceiling: 1 / (1/read + 1/apply) (baseline)", rate=ceiling)
    table.add(f"backfill, {n} entities, vectors kept (median of {rounds})", rate=rate,
              note=f"{rate / ceiling:.2f} x the one-process ceiling ({rate / raw_rate:.2f} x raw apply, rounds "
                   f"{ratios[0]:.2f} to {ratios[-1]:.2f})", vs_ceiling=rate / ceiling)
    naive = EmbeddedBackend(work / "naive.db", embedder)
    await naive.open()
    flat = [r for recs, _ in pages for r in recs][: 20_000]
    t = time.perf_counter()
    for i in range(0, len(flat), 10):  # what one-off migration scripts do
        await naive.apply(flat[i:i + 10])
    naive_rate = len(flat) / (time.perf_counter() - t)
    await naive.close()
    table.add("naive copy, 10 records per call, re-embedding (one-off script)", rate=naive_rate,
              note=f"backfill is {rate / naive_rate:.1f} x faster")

    # --- memory while backfilling a large store -------------------------------------------------------------------
    if mem_n:
        big = EmbeddedBackend(work / "big.db", embedder)
        await big.open()
        await fill(big, mem_n)
        await big.close()
        # Measured in a fresh process: this one has just built and freed the data, and memory the allocator kept
        # would hide the backfill's own growth.
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.migration", "--memory-child", str(work / "big.db"),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await child.communicate()
        if child.returncode:
            raise RuntimeError(f"the memory benchmark's process failed ({child.returncode})")
        m = json.loads(out.decode().strip().splitlines()[-1])
        index_mb = mem_n * dim * 4 / 2**20
        table.add(f"backfill of {mem_n} entities ({m['records']} records): RSS growth {m['growth']:.0f} MB",
                  rate=m["records"] / m["secs"], note="target < 100 MB")
        table.add(f"then the first search of that scope loads its vectors ({index_mb:.0f} MB of floats): "
                  f"RSS +{m['search_growth']:.0f} MB in {m['search_secs']:.2f} s", note="once per scope")
    print()
    table.print()


async def memory_child(db: str) -> None:
    """Backfill `db` into a new file and report (JSON, last line) the RSS growth, then what a first search of the
    target's scope adds when it loads that scope's vectors."""
    work = Path(db).parent
    embedder = BatchingEmbedder(SentenceTransformerModel())
    engine, control = await engine_on(work, embedder, f"sqlite:///{db}")
    before = rss_mb()
    await engine.start_migration(f"sqlite:///{work}/big-dst.db", MigrationOptions(batch_size=1000), "bench")
    peak = before
    t = time.perf_counter()
    while not engine.state.backfill_complete:
        await asyncio.sleep(0.05)
        peak = max(peak, rss_mb())
    secs = time.perf_counter() - t
    target = engine.stores.secondary
    assert target is not None
    dim = target.embedding.dimension
    settled = rss_mb()
    t = time.perf_counter()
    await target.semantic_search("bench", np.ones(dim, dtype=np.float32) / np.sqrt(dim), 10, None, [])
    search_secs = time.perf_counter() - t
    print(json.dumps({"records": engine.state.backfill_done, "secs": secs, "growth": peak - before,
                      "search_growth": rss_mb() - settled, "search_secs": search_secs}))
    await engine.stop()
    await control.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=20_000)
    parser.add_argument("--memory-entities", type=int, default=200_000)
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5, help="alternations of baseline and backfill")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.memory_child:
        asyncio.run(memory_child(ns.memory_child))
        sys.exit(0)
    asyncio.run(main(ns.entities, ns.memory_entities, ns.writes, ns.rounds))
    sys.exit(0)
