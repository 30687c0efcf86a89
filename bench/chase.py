"""The backfill under agents writing new keys as fast as the proxy accepts them: does it end, what does it read?

    python -m bench.chase [--entities 20000] [--writers 4]

A source (embedded store, N entities with one observation each, generated vectors) moves to another embedded store
while writer tasks create new entities through the engine's write path, each key after every key the copy has yet
to read (the pattern that made the copy chase the end of the key range). Two runs on fresh copies of the source:

- full speed: the writers write back to back, as fast as the proxy takes them;
- a tenth: the same writers paced at a tenth of the rate the full-speed run reached (the baseline, same run).

Reported per run: the records that existed at the start, the records the copy read (goal: at most 1.02 times
those), the copy's time from the start to complete (goal: full speed at most 1.5 times a tenth), and the agents'
write rate and p99 during the copy. Figures in bench/results/chase.json.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder, SentenceTransformerModel
from adapters.model import Entity
from bench.__main__ import Table
from bench.migration import engine_on, fill, settle
from proxy.engine.control import MigrationOptions
from proxy.routing import ops


async def run(work: Path, source: Path, embedder: BatchingEmbedder, n: int, writers: int,
              pace: float | None, tag: str) -> dict[str, float]:
    """One migration of a fresh copy of `source` with `writers` agents writing new keys until the copy is complete;
    `pace`: each writer's writes per second (None: back to back)."""
    a = work / f"{tag}-a.db"
    shutil.copy(source, a)
    engine, control = await engine_on(work, embedder, f"sqlite:///{a}")
    counts = await engine.stores.primary.count()
    existing = counts.entities + counts.observations + counts.relations
    await settle(engine)
    done = asyncio.Event()
    latencies: list[float] = []
    serial = iter(range(10**9))

    async def agent(w: int) -> None:
        while not done.is_set():
            i = next(serial)
            t = time.perf_counter()
            # After every key of the source ("e" + 7 digits): the end of the key range the copy walks towards.
            await engine.writer.write(ops.CreateEntities("bench", [Entity(f"e{n + i:07d}-{tag}", "thing",
                                                                          (f"written during the copy {i}",))]))
            latencies.append(time.perf_counter() - t)
            if pace:
                await asyncio.sleep(max(0.0, 1 / pace - (time.perf_counter() - t)))

    started = time.perf_counter()
    await engine.start_migration(f"sqlite:///{work}/{tag}-b.db", MigrationOptions(batch_size=500), "bench")
    agents = [asyncio.create_task(agent(w)) for w in range(writers)]
    while not engine.state.backfill_complete:  # noqa: ASYNC110 - polling the engine's state, as an operator does
        await asyncio.sleep(0.01)
    took = time.perf_counter() - started
    done.set()
    await asyncio.gather(*agents)
    s = engine.state
    await engine.stop()
    await control.close()
    latencies.sort()
    return {"existing": existing, "read": s.backfill_done, "copied": s.backfill_copied, "seconds": took,
            "writes": len(latencies), "write_rate": len(latencies) / took,
            "write_p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000 if latencies else 0.0}


async def main(n: int, writers: int) -> None:
    table = Table("chase")
    work = Path(tempfile.mkdtemp(prefix="memshift-chase-"))
    embedder = BatchingEmbedder(SentenceTransformerModel())
    source = work / "source.db"
    seed = EmbeddedBackend(source, embedder)
    await seed.open()
    await fill(seed, n)
    await seed.close()
    fast = await run(work, source, embedder, n, writers, None, "fast")
    slow = await run(work, source, embedder, n, writers, fast["write_rate"] / 10 / writers, "slow")
    for name, r in (("full speed", fast), ("a tenth", slow)):
        table.add(f"backfill of {n:,} entities, agents at {name}: records read / existing",
                  rate=r["read"] / r["seconds"], note=f"{r['read'] / r['existing']:.3f}x (goal <= 1.02)", run=r)
        table.add(f"agents' writes during that copy ({r['write_rate']:,.0f}/s)",
                  note=f"p99 {r['write_p99_ms']:.1f} ms, {r['writes']:,.0f} writes")
    table.add("copy time, agents at full speed / at a tenth",
              note=f"{fast['seconds']:.1f} s / {slow['seconds']:.1f} s = {fast['seconds'] / slow['seconds']:.2f}x "
                   "(goal <= 1.5)", ratio=fast["seconds"] / slow["seconds"])
    table.print()
    await embedder.close()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=20000)
    parser.add_argument("--writers", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.entities, args.writers))
