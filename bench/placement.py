"""What scopes left out of a migration pay while a chosen set moves (docs/placement.md).

One proxy in its own process on the embedded store holds `--entities` entities in four `moved-*` scopes and as many
in four `stay-*` scopes. One agent per scope writes relations (no embedding: the write path alone), all eight at
once, and the `stay-*` agents' latency is taken in four windows: with no migration, while the `moved-*` scopes
migrate to a second store (start, backfill, DualWrite, cutover), with no migration again, and while the `stay-*`
scopes themselves migrate the same way — what they would pay if they were selected. The baseline is the two windows
without a migration taken together (one before, one after: a drift of the shared machine lands on both sides).
Prints a table and writes bench/results/placement.json.

    python -m bench.placement [--entities 4000] [--window 6]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from bench.__main__ import Table, serve, wait_ready
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import admin_pb2_grpc, memory_pb2_grpc
from memshift.v1 import memory_pb2 as pb

AUTH = (("authorization", "Bearer bench"),)
STAY = [f"stay-{i}" for i in range(4)]
MOVED = [f"moved-{i}" for i in range(4)]


async def seed(memory: memory_pb2_grpc.MemoryStub, scope: str, n: int) -> None:
    for i in range(0, n, 250):
        await memory.CreateEntities(pb.CreateEntitiesRequest(scope=scope, entities=[
            pb.Entity(name=f"e{j:05d}", entity_type="thing", observations=[f"fact {j} of {scope}"])
            for j in range(i, min(n, i + 250))]))


async def agents(memory: memory_pb2_grpc.MemoryStub, scopes: list[str], stop: asyncio.Event) -> list[float]:
    """One agent per scope writing relations back to back until `stop`; their latencies."""
    lat: list[float] = []
    counter = itertools.count()

    async def one(scope: str) -> None:
        while not stop.is_set():
            i = next(counter)
            rel = pb.Relation(**{"from": f"e{i % 50:05d}"}, to=f"e{(i * 7) % 50:05d}", relation_type=f"r{i}")
            t = time.perf_counter()
            await memory.CreateRelations(pb.CreateRelationsRequest(scope=scope, relations=[rel]))
            lat.append(time.perf_counter() - t)

    await asyncio.gather(*(one(s) for s in scopes))
    return lat


async def window(memory: memory_pb2_grpc.MemoryStub, seconds: float) -> list[float]:
    stop = asyncio.Event()
    stay = asyncio.ensure_future(agents(memory, STAY, stop))
    other = asyncio.ensure_future(agents(memory, MOVED, stop))
    await asyncio.sleep(seconds)
    stop.set()
    await other
    return await stay


async def migrate(admin: admin_pb2_grpc.MigrationAdminStub, request: apb.StartMigrationRequest) -> float:
    """A whole migration up to its cutover, with the window closed at once; seconds it took."""
    t = time.perf_counter()
    await admin.StartMigration(request, metadata=AUTH)
    while not (await admin.GetStatus(apb.GetStatusRequest(), metadata=AUTH)).backfill.complete:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    await admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
    await asyncio.sleep(1.0)  # some writes in DualWrite
    await admin.Advance(apb.AdvanceRequest(expected_phase=apb.DUAL_WRITE), metadata=AUTH)
    await admin.Advance(apb.AdvanceRequest(expected_phase=apb.COMPLETED), metadata=AUTH)
    return time.perf_counter() - t


async def during(memory: memory_pb2_grpc.MemoryStub, admin: admin_pb2_grpc.MigrationAdminStub,
                 request: apb.StartMigrationRequest) -> tuple[list[float], float]:
    """The `stay-*` agents' latencies while `request` migrates (the `moved-*` agents writing too), and its duration."""
    stop = asyncio.Event()
    stay = asyncio.ensure_future(agents(memory, STAY, stop))
    other = asyncio.ensure_future(agents(memory, MOVED, stop))
    took = await migrate(admin, request)
    stop.set()
    await other
    return await stay, took


async def main(moved: int, seconds: float) -> None:
    table = Table("placement")
    work = Path(tempfile.mkdtemp(prefix="memshift-placement-"))
    proc, port, admin_port = serve(work, f"sqlite:///{work}/a.db", "bench")
    try:
        await wait_ready(f"127.0.0.1:{port}", proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as mch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{admin_port}") as ach:
            memory, admin = memory_pb2_grpc.MemoryStub(mch), admin_pb2_grpc.MigrationAdminStub(ach)
            for scope in MOVED + STAY:
                await seed(memory, scope, max(50, moved // len(MOVED)))
            await memory.SemanticSearch(pb.SemanticSearchRequest(scope=STAY[0], query="settle"))  # embeddings stored
            await window(memory, 3.0)  # warm up
            base = await window(memory, seconds)
            chosen, took_chosen = await during(memory, admin, apb.StartMigrationRequest(
                target=f"sqlite:///{work}/b.db", scope_prefixes=["moved-"]))
            after = await window(memory, seconds)
            selected, took_selected = await during(memory, admin, apb.StartMigrationRequest(
                target=f"sqlite:///{work}/c.db", scope_prefixes=["stay-"]))
    finally:
        proc.terminate()
        proc.wait(15)
    p50 = statistics.median(base + after)
    records = moved * 2
    table.add("stay-* writes, no migration (before and after: the baseline)", base + after,
              len(base + after) / (2 * seconds), before_p50_ms=statistics.median(base) * 1000,
              after_p50_ms=statistics.median(after) * 1000)
    table.add(f"stay-* writes while moved-* ({records:,} records) migrate", chosen, len(chosen) / took_chosen,
              note=f"{statistics.median(chosen) / p50:.2f} x baseline p50", migration_seconds=took_chosen)
    table.add("stay-* writes while they migrate themselves", selected, len(selected) / took_selected,
              note=f"{statistics.median(selected) / p50:.2f} x baseline p50", migration_seconds=took_selected)
    table.print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entities", type=int, default=4000, help="entities in each set of four scopes")
    parser.add_argument("--window", type=float, default=6.0, help="seconds of each window without a migration")
    ns = parser.parse_args()
    asyncio.run(main(ns.entities, ns.window))
