"""`make bench` (third table): backfill into each real store vs that store's own bulk path, measured in one run.

    python -m bench.stores [--entities 20000]

    python -m bench.stores --only qdrant --qdrant-sizes 2000,20000,100000
    python -m bench.stores --only chroma

For each target store: the raw bulk load, the store's best path fed with pre-read pages (PostgreSQL: binary COPY into
staging tables and one upsert per table, vectors included, HNSW built after; Qdrant: batched upserts, at several
sizes, since its cost per batch must not grow with the collection; Neo4j: UNWIND batches in one transaction per
page; ChromaDB: the client's own `upsert`, 500 a call); the migration
engine's backfill from an embedded store with vectors kept; and the naive copy one-off migration scripts do (10
records per call, vectors recomputed). PostgreSQL and ArcadeDB (Bolt) are started by the benchmark itself
(tests/servers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters.base import VectorMap
from adapters.chroma import parse_spec as parse_chroma
from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder, SentenceTransformerModel
from adapters.points import point_id
from adapters.records import EntityRecord, Record
from bench.__main__ import Table
from bench.migration import bulk_rate, engine_on, fill, pages_of, wait_backfill
from proxy.engine.backends import backend_for
from proxy.engine.control import MigrationOptions
from tests.servers import ArcadeDBServer, ChromaServer, PostgresServer

_names = itertools.count()


async def backfill_rate(work: Path, embedder: BatchingEmbedder, source: str, target: str) -> float:
    """Records per second the migration engine's backfill copies `source` into `target` (vectors kept)."""
    engine, control = await engine_on(work, embedder, source)
    await engine.start_migration(target, MigrationOptions(batch_size=500, workers=2), "bench")
    secs = await wait_backfill(engine)
    rate = engine.state.backfill_done / secs
    await engine.stop()
    await control.close()
    return float(rate)


async def measure(table: Table, label: str, target: str, work: Path, embedder: BatchingEmbedder,
                  pages: list[tuple[tuple[Record, ...], VectorMap]], source: str, spec: dict[str, str]) -> None:
    if "warm" in spec:  # a JVM server (ArcadeDB) compiles its hot paths first: warm it so the baseline is fair
        warm = backend_for(spec["warm"], embedder)
        await warm.open()
        await bulk_rate(warm, pages[:4])
    raw = backend_for(spec["raw"], embedder)
    await raw.open()
    raw_rate = await bulk_rate(raw, pages)
    table.add(f"{label}: raw bulk load, vectors included (baseline)", rate=raw_rate)

    rate = await backfill_rate(work, embedder, source, target)
    table.add(f"{label}: backfill from embedded, vectors kept", rate=rate,
              note=f"{rate / raw_rate:.2f} x raw bulk load")

    naive = backend_for(spec["naive"], embedder)
    await naive.open()
    flat = [r for recs, _ in pages for r in recs][:5000]
    t = time.perf_counter()
    for i in range(0, len(flat), 10):
        await naive.apply(flat[i:i + 10])
    await naive.embed_stale()
    await naive.build_indexes()
    naive_rate = len(flat) / (time.perf_counter() - t)
    await naive.close()
    table.add(f"{label}: naive copy, 10 records per call, re-embedding", rate=naive_rate,
              note=f"backfill is {rate / naive_rate:.1f} x faster")


def chroma_client(spec: str) -> object:
    import chromadb

    parsed = parse_chroma(spec)
    return (chromadb.PersistentClient if parsed["local"] else chromadb.HttpClient)(**parsed["args"])


async def chroma_rows(table: Table, label: str, base: str, work: Path, embedder: BatchingEmbedder,
                      pages: list[tuple[tuple[Record, ...], VectorMap]], source: str) -> None:
    """ChromaDB: the client's own batched upsert (the floor), the backfill, and the seeds' own script (10 records a
    batch, a second's pause between batches)."""
    client: Any = chroma_client(base)
    dim = embedder.info.dimension
    ents = client.create_collection(f"raw{next(_names)}", embedding_function=None,
                                    configuration={"hnsw": {"space": "cosine"}})
    rest = client.create_collection(f"raw{next(_names)}", embedding_function=None)
    flat = [r for recs, _ in pages for r in recs]
    vecs = {k: v for _, vs in pages for k, (_, v) in vs.items()}
    placeholder = [1.0] + [0.0] * (dim - 1)
    t = time.perf_counter()
    for recs, _ in pages:
        e = [r for r in recs if isinstance(r, EntityRecord)]
        o = [r for r in recs if not isinstance(r, EntityRecord)]
        if e:
            ents.upsert(ids=[point_id(r.key) for r in e], metadatas=[{"scope": r.scope, "name": r.name,
                                                                       "version": r.version} for r in e],
                        embeddings=[vecs.get((r.scope, r.name), placeholder) for r in e])
        if o:
            rest.upsert(ids=[point_id(r.key) for r in o], metadatas=[{"scope": r.scope, "version": r.version}
                                                                      for r in o], embeddings=[[1.0]] * len(o))
    raw_rate = len(flat) / (time.perf_counter() - t)
    table.add(f"{label}: the client's own batched upsert, 500 a call (baseline)", rate=raw_rate)

    rate = await backfill_rate(work, embedder, source, f"{base}{'&' if '?' in base else '?'}prefix=backfill"
                                                         f"{next(_names)}")
    table.add(f"{label}: backfill from embedded, vectors kept", rate=rate,
              note=f"{rate / raw_rate:.2f} x the client's batched upsert")

    seed = client.create_collection(f"seed{next(_names)}", embedding_function=None)
    part = flat[:2000]
    t = time.perf_counter()
    for i in range(0, len(part), 10):
        batch = part[i:i + 10]
        seed.upsert(ids=[point_id(r.key) for r in batch], metadatas=[{"v": r.version} for r in batch],
                    embeddings=[[1.0]] * len(batch))
    per_batch = (time.perf_counter() - t) / (len(part) / 10)
    script = 10 / (per_batch + 1.0)
    table.add(f"{label}: the seeds' script, 10 records a batch, 1 s pause", rate=script,
              note=f"backfill is {rate / script:,.0f} x faster ({10 / per_batch:,.0f}/s without the pause)")


async def qdrant_rows(table: Table, sizes: list[int], work: Path, embedder: BatchingEmbedder,
                      schemes: list[str]) -> None:
    """Qdrant at several sizes, each embedded engine (the client's local mode, Edge): the store's own batched
    apply and the backfill, per size: a batch must cost the same whatever the store already holds."""
    for n in sizes:
        d = work / f"q{n}"
        d.mkdir()
        src = EmbeddedBackend(d / "src.db", embedder)
        await src.open()
        await fill(src, n)
        pages = await pages_of(src)
        await src.close()
        for scheme in schemes:
            label = {"qdrant+local": "Qdrant local mode", "qdrant+edge": "Qdrant Edge"}[scheme]
            raw = backend_for(f"{scheme}:///{d}/{scheme}-raw", embedder)
            await raw.open()
            raw_rate = await bulk_rate(raw, pages)
            table.add(f"{label}, {n} entities: raw batched apply (baseline)", rate=raw_rate, entities=n)
            rate = await backfill_rate(d, embedder, f"sqlite:///{d}/src.db", f"{scheme}:///{d}/{scheme}-backfill")
            table.add(f"{label}, {n} entities: backfill from embedded", rate=rate,
                      note=f"{rate / raw_rate:.2f} x raw batched apply", entities=n)


async def main(n: int, qdrant_sizes: list[int], only: str) -> None:
    table = Table(f"stores-{only}" if only else "stores")
    work = Path(tempfile.mkdtemp(prefix="memshift-sbench-"))
    embedder = BatchingEmbedder(SentenceTransformerModel())
    src = EmbeddedBackend(work / "src.db", embedder)
    await src.open()
    await fill(src, n)
    pages = await pages_of(src)
    await src.close()
    source = f"sqlite:///{work}/src.db"
    if only in ("", "chroma"):
        await chroma_rows(table, f"ChromaDB local (PersistentClient), {n} entities", f"chroma+local:///{work}/chroma",
                          work, embedder, pages, source)
        chroma = ChromaServer().start()
        try:
            await chroma_rows(table, f"ChromaDB server (HttpClient), {n} entities", chroma.url, work, embedder,
                              pages, source)
        finally:
            chroma.stop()
    if only in ("", "qdrant", "qdrant-edge"):
        await qdrant_rows(table, qdrant_sizes, work, embedder,
                          {"": ["qdrant+local", "qdrant+edge"], "qdrant": ["qdrant+local"],
                           "qdrant-edge": ["qdrant+edge"]}[only])
    if only == "":
        pg = PostgresServer().start()
        try:
            await measure(table, f"PostgreSQL, {n} entities", f"{pg.dsn}?schema=backfill", work, embedder, pages,
                          source, {"raw": f"{pg.dsn}?schema=raw", "naive": f"{pg.dsn}?schema=naive"})
        finally:
            pg.stop()
    if only in ("", "neo4j"):
        bolt = ArcadeDBServer().start()
        try:
            await measure(table, f"Neo4j (ArcadeDB over Bolt), {n} entities", f"{bolt.uri}?prefix=Backfill", work,
                          embedder, pages, source,
                          {"warm": f"{bolt.uri}?prefix=Warm", "raw": f"{bolt.uri}?prefix=Raw",
                           "naive": f"{bolt.uri}?prefix=Naive"})
            hybrid = f"hybrid:?graph={bolt.uri}?prefix=HBackfill&vectors=qdrant+local:///{work}/h-backfill"
            if only == "":
                await measure(table, f"Hybrid Neo4j+Qdrant local, {n} entities", hybrid, work, embedder, pages,
                              source, {"raw": f"hybrid:?graph={bolt.uri}?prefix=HRaw&vectors=qdrant+local:///{work}/h-raw",
                                       "naive": f"hybrid:?graph={bolt.uri}?prefix=HNaive"
                                                f"&vectors=qdrant+local:///{work}/h-naive"})
        finally:
            bolt.stop()
    print()
    table.print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=20_000)
    parser.add_argument("--qdrant-sizes", default="2000,20000,100000",
                        help="entities for the Qdrant rows, comma-separated")
    parser.add_argument("--only", choices=["chroma", "qdrant", "qdrant-edge", "neo4j"], default="",
                        help="only these rows")
    ns = parser.parse_args()
    asyncio.run(main(ns.entities, [int(x) for x in ns.qdrant_sizes.split(",")], ns.only))
    sys.exit(0)
