"""`make bench` (third table): backfill into each real store vs that store's own bulk path, measured in one run.

    python -m bench.stores [--entities 20000]

For each target store: the raw bulk load, the store's best path fed with pre-read pages (PostgreSQL: binary COPY into
staging tables and one upsert per table, vectors included, HNSW built after; Qdrant: batched upserts; Neo4j: UNWIND
batches in one transaction per page); the migration
engine's backfill from an embedded store with vectors kept; and the naive copy one-off migration scripts do (10
records per call, vectors recomputed). PostgreSQL and ArcadeDB (Bolt) are started by the benchmark itself
(tests/servers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from adapters.base import VectorMap
from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder, SentenceTransformerModel
from adapters.records import Record
from bench.__main__ import Table
from bench.migration import bulk_rate, engine_on, fill, pages_of, wait_backfill
from proxy.control import MigrationOptions
from proxy.stores import backend_for
from tests.servers import ArcadeDBServer, PostgresServer


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

    engine, control = await engine_on(work, embedder, source)
    await engine.start_migration(target, MigrationOptions(batch_size=500, workers=2), "bench")
    secs = await wait_backfill(engine)
    rate = engine.state.backfill_done / secs
    table.add(f"{label}: backfill from embedded, vectors kept", rate=rate,
              note=f"{rate / raw_rate:.2f} x raw bulk load")
    await engine.stop()
    await control.close()

    naive = backend_for(spec["naive"], embedder)
    await naive.open()
    flat = [r for recs, _ in pages for r in recs][:5000]
    t = time.perf_counter()
    for i in range(0, len(flat), 10):
        await naive.apply(flat[i:i + 10])
    await naive.embed_stale()
    naive_rate = len(flat) / (time.perf_counter() - t)
    await naive.close()
    table.add(f"{label}: naive copy, 10 records per call, re-embedding", rate=naive_rate,
              note=f"backfill is {rate / naive_rate:.1f} x faster")


async def main(n: int) -> None:
    table = Table("stores")
    work = Path(tempfile.mkdtemp(prefix="memshift-sbench-"))
    embedder = BatchingEmbedder(SentenceTransformerModel())
    src = EmbeddedBackend(work / "src.db", embedder)
    await src.open()
    await fill(src, n, embedder.info.dimension)
    pages = await pages_of(src)
    await src.close()
    pg = PostgresServer().start()
    try:
        await measure(table, f"PostgreSQL, {n} entities", f"{pg.dsn}?schema=backfill", work, embedder, pages,
                      f"sqlite:///{work}/src.db", {"raw": f"{pg.dsn}?schema=raw", "naive": f"{pg.dsn}?schema=naive"})
    finally:
        pg.stop()
    await measure(table, f"Qdrant local mode, {n} entities", f"qdrant+local:///{work}/q-backfill", work, embedder,
                  pages, f"sqlite:///{work}/src.db",
                  {"raw": f"qdrant+local:///{work}/q-raw", "naive": f"qdrant+local:///{work}/q-naive"})
    bolt = ArcadeDBServer().start()
    try:
        await measure(table, f"Neo4j (ArcadeDB over Bolt), {n} entities", f"{bolt.uri}?prefix=Backfill", work,
                      embedder, pages, f"sqlite:///{work}/src.db",
                      {"warm": f"{bolt.uri}?prefix=Warm", "raw": f"{bolt.uri}?prefix=Raw",
                       "naive": f"{bolt.uri}?prefix=Naive"})
        hybrid = f"hybrid:?graph={bolt.uri}?prefix=HBackfill&vectors=qdrant+local:///{work}/h-backfill"
        await measure(table, f"Hybrid Neo4j+Qdrant local, {n} entities", hybrid, work, embedder, pages,
                      f"sqlite:///{work}/src.db",
                      {"raw": f"hybrid:?graph={bolt.uri}?prefix=HRaw&vectors=qdrant+local:///{work}/h-raw",
                       "naive": f"hybrid:?graph={bolt.uri}?prefix=HNaive&vectors=qdrant+local:///{work}/h-naive"})
    finally:
        bolt.stop()
    print()
    table.print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=20_000)
    ns = parser.parse_args()
    asyncio.run(main(ns.entities))
    sys.exit(0)
