"""`SearchNodes` at scale, on the embedded store and on PostgreSQL: the substring index against a scan.

    python -m bench.search [--entities 100000] [--calls 200]

One scope of N entities (3 observations each), loaded with generated vectors through each store's own `apply`.
Measured in the store (the proxy adds its transport, about 0.2 ms): a needle of three or more characters, which the
trigram index answers, and the same matching done by scanning the scope (the baseline: what every search cost before
the index, and what a two-character needle still costs).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from adapters import semantics
from adapters.base import Backend
from adapters.embedded import EmbeddedBackend
from adapters.model import Entity, Graph
from adapters.postgres import PostgresBackend
from bench import generated
from bench.__main__ import Table
from bench.generated import GeneratedVectorsOnly
from bench.scale import TOPICS
from tests.servers import PostgresServer

SCOPE = "agent"


async def load(store: Backend, n: int) -> None:
    await generated.load(store, SCOPE, [
        Entity(f"person-{i:06d}", "person", tuple(f"note {k}: met person-{i:06d} at the {TOPICS[(i + k) % 10]} club"
                                                  for k in range(3))) for i in range(n)], seed=5)


async def scan(store: Backend, needle: str) -> Graph:
    """The documented matching by reading the whole scope (what a store without the index does)."""
    entities, cursor = [], None
    while True:
        page = await store.read_graph(SCOPE, cursor, 5000)
        entities += [e for e in page.entities if semantics.entity_hit(needle, e)]
        if page.next_cursor is None:
            return Graph(tuple(entities), ())
        cursor = page.next_cursor


async def measure(table: Table, label: str, store: Backend, n: int, calls: int) -> None:
    def needle(i: int) -> str:
        return f"PERSON-{(i * 7919) % n:06d}"  # one hit, in another case

    idx: list[float] = []
    for i in range(calls):
        t = time.perf_counter()
        got = await store.search_nodes(SCOPE, needle(i))
        idx.append(time.perf_counter() - t)
        assert [e.name for e in got.entities] == [needle(i).lower()]
    base: list[float] = []
    for i in range(max(5, calls // 40)):
        t = time.perf_counter()
        await scan(store, semantics.lowered(needle(i)))
        base.append(time.perf_counter() - t)
    short: list[float] = []
    for i in range(max(5, calls // 40)):
        t = time.perf_counter()
        await store.search_nodes(SCOPE, f"{i % 10}7")  # two characters: no trigram, scanned
        short.append(time.perf_counter() - t)
    table.add(f"{label}, {n:,} entities: the scope scanned (baseline)", base)
    table.add(f"{label}, {n:,} entities: SearchNodes, indexed needle", idx,
              note=f"{statistics.median(base) / statistics.median(idx):,.0f} x faster than the scan p50")
    table.add(f"{label}, {n:,} entities: SearchNodes, 2-character needle (scanned)", short)


async def main(n: int, calls: int) -> None:
    table = Table("search")
    work = Path(tempfile.mkdtemp(prefix="memshift-bench-search-"))
    embedded = EmbeddedBackend(work / "memory.db", GeneratedVectorsOnly())
    await embedded.open()
    await load(embedded, n)
    await measure(table, "embedded store", embedded, n, calls)
    await embedded.close()
    server = PostgresServer().start()
    try:
        pg = PostgresBackend(f"{server.dsn}?schema=search", GeneratedVectorsOnly())
        await pg.open()
        await load(pg, n)
        await measure(table, "PostgreSQL", pg, n, calls)
        await pg.close()
    finally:
        server.stop()
    print()
    table.print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=200)
    ns = parser.parse_args()
    asyncio.run(main(ns.entities, ns.calls))
