"""A large migration while agents work: an embedded store of N entities moved to PostgreSQL through a running proxy.

    python -m bench.scale --entities 100000 [--agents 8] [--agent-rate 4] [--json FILE]

1. Builds the source: N entities in 8 scopes, 2 to 5 observations each, one relation each, with vectors generated
   (unit length, the model's dimension, recorded under the model's name: a copy that keeps vectors never recomputes
   them, so their values do not change its speed). Built through the store's own `apply`.
2. Baseline, in the same run and on the same PostgreSQL server: the same data loaded with binary COPY into a store's
   own tables (its primary keys and trigram index in place), then its vector index built as the store builds it.
3. A proxy (its own process) serves the source; 8 agents write to it at a steady pace the whole time (a new entity or
   a new observation per call). Through the admin API: StartMigration (backfill), Advance to DualWrite, Verify,
   Advance to Completed.
Reports the backfill rate against the baseline, agents' write latency before / during the backfill / after cutover,
the proxy's RSS growth, Verify's rate and the wall time from start to Completed; figures in bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pgvector.asyncpg import register_vector

from adapters import semantics
from adapters.embedded import EmbeddedBackend
from adapters.postgres import PostgresBackend
from adapters.records import EntityRecord, ObservationRecord, Record, RelationRecord, embedding_text, text_hash
from bench.__main__ import Table, serve, wait_ready
from bench.generated import GeneratedVectorsOnly, unit_vectors
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import admin_pb2_grpc, memory_pb2_grpc
from memshift.v1 import memory_pb2 as pb
from tests.servers import PostgresServer

SCOPES = 8
CHUNK = 5000  # entities generated (and applied, and copied) at a time
TOPICS = ["tea", "chess", "astronomy", "cooking", "python", "jazz", "hiking", "finance", "poetry", "robots"]
TYPES = ["person", "project", "place", "tool", "idea"]
AUTH = (("authorization", "Bearer scale"),)


@dataclass
class Chunk:
    records: list[Record] = field(default_factory=list)
    vectors: dict[tuple[str, str], tuple[str, npt.NDArray[np.float32]]] = field(default_factory=dict)
    entity_rows: list[tuple[object, ...]] = field(default_factory=list)


def name_of(i: int) -> str:
    return f"n{i:07d}"


def chunks(n: int) -> Iterator[Chunk]:
    """The source's records, entity by entity (an entity, its observations and its relation together, so each
    page's vectors match their entity's complete text), with the rows COPY loads for the same data."""
    rng = np.random.default_rng(11)
    version = itertools.count(1)
    for start in range(0, n, CHUNK):
        out = Chunk()
        stop = min(n, start + CHUNK)
        vecs = unit_vectors(rng, stop - start)
        for i in range(start, stop):
            scope, name, etype = f"team-{i % SCOPES}", name_of(i), TYPES[i % len(TYPES)]
            v = next(version)
            obs = tuple(f"note {k} on {name}: likes {TOPICS[(i + k) % 10]} and {TOPICS[(i * 7 + k) % 10]}"
                        for k in range(2 + i % 4))
            target = i + SCOPES if i + SCOPES < n else i - SCOPES
            out.records.append(EntityRecord(scope, name, etype, v, v))
            out.records += [ObservationRecord(scope, name, o, v, v + k) for k, o in enumerate(obs)]
            if target >= 0:
                out.records.append(RelationRecord(scope, name, "works_with", name_of(target), v))
            text = embedding_text(name, etype, obs)
            out.vectors[(scope, name)] = (text_hash(text), vecs[i - start])
            out.entity_rows.append((scope, name, etype, "{}", v, v, 0, False, text_hash(text), text_hash(text),
                                    vecs[i - start], semantics.search_document(name, etype, obs)))
        yield out


async def build_source(path: Path, n: int) -> int:
    store = EmbeddedBackend(path, GeneratedVectorsOnly())
    await store.open()
    count = 0
    t = time.perf_counter()
    for chunk in chunks(n):
        await store.apply(chunk.records, chunk.vectors)
        count += len(chunk.records)
        progress("source", count, t)
    await store.close()
    print(file=sys.stderr)
    return count


def progress(label: str, done: int, since: float, total: int | None = None) -> None:
    rate = done / max(1e-9, time.perf_counter() - since)
    eta = f", ETA {(total - done) / rate:,.0f} s" if total and rate else ""
    print(f"\r  {label}: {done:,} records, {rate:,.0f}/s{eta}   ", end="", file=sys.stderr, flush=True)


async def copy_baseline(dsn: str, n: int, index_workers: int | None) -> tuple[float, float, float]:
    """COPY of the same data into a fresh store's own tables (binary, through the driver; primary keys in place,
    the search index not), then the indexes built as the store builds them after a bulk load: the trigram index of
    search documents and the vector index, with the same workers as the backfill's target. Generating the rows is
    not timed. Returns the rate of the COPY alone, the rate with the index builds, and the builds' seconds."""
    workers = f"&index_workers={index_workers}" if index_workers is not None else ""
    store = PostgresBackend(f"{dsn}?schema=baseline{workers}", GeneratedVectorsOnly())  # type: ignore[arg-type]
    await store.open()
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "baseline, public"})
    await register_vector(conn)
    await conn.execute("DROP INDEX entities_search_trgm")  # built after the load, as the backfill's end does
    secs, count = 0.0, 0
    e_cols = ["scope", "name", "entity_type", "metadata", "version", "created", "purged", "deleted", "embed_hash",
              "vector_hash", "embedding", "search_doc"]
    try:
        for chunk in chunks(n):
            obs = [(r.scope, r.entity, r.text, r.version, r.created, r.deleted) for r in chunk.records
                   if isinstance(r, ObservationRecord)]
            rels = [(r.scope, r.source, r.relation_type, r.target, "{}", r.version, r.deleted) for r in chunk.records
                    if isinstance(r, RelationRecord)]
            t = time.perf_counter()
            await conn.copy_records_to_table("entities", records=chunk.entity_rows, columns=e_cols)
            await conn.copy_records_to_table("observations", records=obs, columns=[
                "scope", "entity", "text", "version", "created", "deleted"])
            await conn.copy_records_to_table("relations", records=rels, columns=[
                "scope", "source", "relation_type", "target", "metadata", "version", "deleted"])
            secs += time.perf_counter() - t
            count += len(chunk.records)
            progress("COPY baseline", count, time.perf_counter() - secs)
        copy_secs = secs
        t = time.perf_counter()
        await conn.execute("CREATE INDEX entities_search_trgm ON entities USING gin (search_doc gin_trgm_ops)"
                           " WITH (gin_pending_list_limit=256)")
        await store.embed_stale()  # nothing is stale
        await store.build_indexes()  # the vector index, as after a backfill
        secs += time.perf_counter() - t
    finally:
        await conn.close()
        await store.close()
    print(file=sys.stderr)
    return count / copy_secs, count / secs, secs - copy_secs


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Agents:
    """8 agents writing at a steady pace, each latency filed under the migration's stage when the call started."""

    memory: memory_pb2_grpc.MemoryStub
    count: int
    rate: float  # writes per second per agent
    stage: str = "before"
    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: int = 0
    acknowledged: list[tuple[str, str, str]] = field(default_factory=list)  # (scope, entity, observation)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        await asyncio.gather(*(self._agent(a) for a in range(self.count)))

    async def _agent(self, a: int) -> None:
        scope = f"team-{a % SCOPES}"
        start = time.perf_counter() + a / (self.count * self.rate)  # agents are not in step with each other
        for k in itertools.count():
            if self._stop.is_set():
                return
            await asyncio.sleep(max(0.0, start + k / self.rate - time.perf_counter()))
            name, note = f"agent{a}-{k // 2:06d}", f"agent {a} learned fact {k} about {TOPICS[k % 10]}"
            stage, t = self.stage, time.perf_counter()
            try:
                if k % 2 == 0:
                    await self.memory.CreateEntities(pb.CreateEntitiesRequest(scope=scope, entities=[
                        pb.Entity(name=name, entity_type="memory", observations=[note])]))
                else:
                    await self.memory.AddObservations(pb.AddObservationsRequest(scope=scope, observations=[
                        pb.ObservationAddition(entity_name=name, contents=[note])]))
            except grpc.aio.AioRpcError:
                self.failures += 1
                continue
            self.latencies.setdefault(stage, []).append(time.perf_counter() - t)
            if os.environ.get("SCALE_TRACE") and time.perf_counter() - t > 0.2:
                print(f"\nslow {stage} write at {time.time():.1f}: {1000 * (time.perf_counter() - t):.0f} ms",
                      file=sys.stderr)
            self.acknowledged.append((scope, name, note))

    def stop(self) -> None:
        self._stop.set()


async def serving(channel: grpc.aio.Channel) -> None:
    """Until the proxy reports SERVING: a store of a million entities takes a while to open (the proxy answers
    UNAVAILABLE meanwhile, as it should)."""
    health = health_pb2_grpc.HealthStub(channel)
    t = time.perf_counter()
    request, up = health_pb2.HealthCheckRequest(), health_pb2.HealthCheckResponse.SERVING
    while (await health.Check(request)).status != up:  # noqa: ASYNC110 - polling another process, as a probe does
        await asyncio.sleep(0.5)
    print(f"  proxy serving after {time.perf_counter() - t:.1f} s", file=sys.stderr)


async def status(admin: admin_pb2_grpc.MigrationAdminStub) -> apb.MigrationStatus:
    return await admin.GetStatus(apb.GetStatusRequest(), metadata=AUTH)


async def migrate(work: Path, source: Path, target: str, total: int, agents: int, agent_rate: float,
                  table: Table, baseline: float, copy_only: float, index_secs: float, batch_size: int,
                  window: float) -> dict[str, float]:
    proc, port, admin_port = serve(work, f"sqlite:///{source}", "scale")
    figures: dict[str, float] = {}
    try:
        await wait_ready(f"127.0.0.1:{port}", proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as mch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{admin_port}") as ach:
            await serving(mch)
            admin = admin_pb2_grpc.MigrationAdminStub(ach)
            crew = Agents(memory_pb2_grpc.MemoryStub(mch), agents, agent_rate)
            writing = asyncio.ensure_future(crew.run())
            await asyncio.sleep(window)  # agents' latency with no migration
            rss_before = peak = rss_mb(proc.pid)

            started = time.perf_counter()
            crew.stage = "backfill"
            await admin.StartMigration(apb.StartMigrationRequest(target=target, batch_size=batch_size, workers=2),
                                       metadata=AUTH)
            while not (st := await status(admin)).backfill.complete:
                peak = max(peak, rss_mb(proc.pid))
                b = st.backfill
                crew.stage = f"backfill: {b.step}" if b.step else "backfill"  # agents' latency per step
                eta = f", ETA {b.eta_seconds:,.0f} s" if b.eta_seconds >= 0 else ""
                print(f"\r  backfill: {b.done:,}/{b.total:,} records, {b.rate_per_second:,.0f}/s{eta}   ",
                      end="", file=sys.stderr, flush=True)
                await asyncio.sleep(1)
            backfill_secs = time.perf_counter() - started
            during = st.counters
            # The copy's own figures, as the engine recorded them: seconds copying, and the finish (the vector
            # index built after the load) apart.
            history = await admin.GetHistory(apb.GetHistoryRequest(limit=20), metadata=AUTH)
            finish = next(c.figures for c in history.changes if c.reason == "backfill complete")
            copy_secs, settle_secs = float(finish["copy_seconds"]), float(finish["settle_seconds"])
            index_done = float(finish["index_seconds"])
            read = int(finish["records_read"])
            if os.environ.get("SCALE_TRACE"):
                print(f"\nbackfill from {time.time() - backfill_secs:.1f} to {time.time():.1f}", file=sys.stderr)
            print(file=sys.stderr)
            crew.stage = "dual write"
            await admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
            await asyncio.sleep(window / 2)  # dual-writing alone, then with Verify walking both stores
            crew.stage = "dual write: verify"

            t = time.perf_counter()
            last = None
            async for last in admin.Verify(apb.VerifyRequest(), metadata=AUTH):
                peak = max(peak, rss_mb(proc.pid))
                print(f"\r  verify: {last.compared:,} records compared   ", end="", file=sys.stderr, flush=True)
            verify_secs = time.perf_counter() - t
            print(file=sys.stderr)
            assert last is not None and last.done

            await admin.Advance(apb.AdvanceRequest(expected_phase=apb.DUAL_WRITE), metadata=AUTH)
            wall = time.perf_counter() - started
            crew.stage = "after cutover"
            peak = max(peak, rss_mb(proc.pid))
            await asyncio.sleep(window)
            crew.stop()
            await writing

            # Every write the agents had acknowledged is served by the new primary.
            memory = memory_pb2_grpc.MemoryStub(mch)
            lost = 0
            latest: dict[tuple[str, str], set[str]] = {}
            for scope, name, note in crew.acknowledged:
                latest.setdefault((scope, name), set()).add(note)
            for (scope, name), notes in latest.items():
                got = await memory.OpenNodes(pb.OpenNodesRequest(scope=scope, names=[name]))
                held = set(got.entities[0].observations) if got.entities else set()
                lost += len(notes - held)

        p = {s: lat for s, lat in crew.latencies.items()}
        before = p.get("before", [0.0])
        for stage_name in ("before", "backfill", "backfill: settling", "backfill: indexing", "dual write",
                           "dual write: verify", "after cutover"):
            lat = p.get(stage_name)
            if lat:
                ratio = np.percentile(lat, 99) / np.percentile(before, 99)
                table.add(f"agent writes ({agents} agents, {agents * agent_rate:g}/s), {stage_name}", lat,
                          note=f"{ratio:.2f} x p99 before" if stage_name != "before" else "",
                          p99_vs_before=float(ratio))
        rate = total / backfill_secs
        # The copy is its pages and the texts and search documents they left to the end; the index builds after
        # it are the baseline's own, left out of both figures here and compared end to end below.
        copy_rate = read / (copy_secs + settle_secs)
        table.add(f"backfill's copy into PostgreSQL, {read:,} records read (index builds left out)", rate=copy_rate,
                  note=f"{copy_rate / copy_only:.2f} x COPY alone (goal >= 0.7); pages {copy_secs:,.1f} s,"
                  f" texts settled {settle_secs:,.1f} s", seconds=copy_secs + settle_secs,
                  vs_copy_alone=copy_rate / copy_only, records_read=read, records_at_start=total,
                  read_vs_start=read / total, pages_seconds=copy_secs, settle_seconds=settle_secs)
        table.add(f"backfill to PostgreSQL end to end, {total:,} records (vectors kept, index built)", rate=rate,
                  note=f"{rate / baseline:.2f} x COPY + indexes (goal >= 0.9); indexes {index_done:,.1f} s"
                  f" (baseline's {index_secs:,.1f} s)", seconds=backfill_secs, vs_copy=rate / baseline,
                  index_seconds=index_done)
        table.add("agent writes whose new-store half was late or failed (during the backfill)",
                  note=f"{during.secondary_late:,} late, {during.secondary_failures:,} failed of "
                  f"{during.dual_writes:,}; {during.repairs_done:,} keys repaired",
                  late=during.secondary_late, failed=during.secondary_failures, dual_writes=during.dual_writes,
                  repaired=during.repairs_done)
        table.add("Verify", rate=(last.compared / verify_secs), seconds=verify_secs,
                  note=f"{last.compared:,} records, {last.differences} differences")
        table.add("start to Completed (wall)", note=f"{wall:,.0f} s", seconds=wall)
        table.add("proxy RSS growth", note=f"{peak - rss_before:,.0f} MB (from {rss_before:,.0f} MB)",
                  rss_growth_mb=peak - rss_before, rss_before_mb=rss_before)
        table.add("acknowledged agent writes lost", note=f"{lost} of {len(crew.acknowledged)} "
                  f"({crew.failures} calls refused)", lost=lost, acknowledged=len(crew.acknowledged))
        figures.update(backfill_rate=rate, verify_rate=last.compared / verify_secs, wall=wall)
    finally:
        proc.terminate()
        proc.wait(30)
    return figures


async def main(n: int, agents: int, agent_rate: float, json_out: Path | None, batch_size: int,
               index_workers: int | None, window: float = 20.0) -> None:
    table = Table("scale")
    work = Path(tempfile.mkdtemp(prefix="memshift-scale-"))
    server = PostgresServer().start()
    try:
        dsn = server.dsn
        conn = await asyncpg.connect(dsn)
        # The vector index of a million entities is built in memory when it fits (pgvector's advice); the same
        # setting serves the baseline and the backfill.
        await conn.execute("ALTER SYSTEM SET maintenance_work_mem = '2GB'")
        await conn.execute("SELECT pg_reload_conf()")
        await conn.close()
        t = time.perf_counter()
        total = await build_source(work / "source.db", n)
        table.add(f"build the source: {n:,} entities, {total:,} records, through the store's apply",
                  rate=total / (time.perf_counter() - t))
        copy_only, baseline, index_secs = await copy_baseline(dsn, n, index_workers)
        table.add("PostgreSQL COPY of the same data alone (baseline)", rate=copy_only)
        table.add("PostgreSQL COPY of the same data + search and vector indexes (baseline)", rate=baseline,
                  note=f"indexes {index_secs:,.1f} s", index_seconds=index_secs)
        # The benchmark's own heap out of full collections too: its pauses would count as the proxy's latency.
        gc.collect()
        gc.freeze()
        target = f"{dsn}?schema=memory" + (f"&index_workers={index_workers}" if index_workers is not None else "")
        await migrate(work, work / "source.db", target, total, agents, agent_rate, table, baseline, copy_only,
                      index_secs, batch_size, window)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print()
    table.print()
    if json_out is not None:
        write_json(json_out, {"bench": "scale", "entities": n, "index_workers": index_workers, "rows": table.raw})


def write_json(path: Path, figures: dict[str, object]) -> None:
    path.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"figures also in {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--agent-rate", type=float, default=4.0, help="writes per second per agent")
    parser.add_argument("--batch-size", type=int, default=500, help="the backfill's records per page")
    parser.add_argument("--index-workers", type=int, default=None,
                        help="the target's index_workers (parallel workers building its vector index)")
    parser.add_argument("--window", type=float, default=20.0,
                        help="seconds the agents' latency is measured before the migration and after cutover")
    parser.add_argument("--json", type=Path, default=None)
    ns = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    asyncio.run(main(ns.entities, ns.agents, ns.agent_rate, ns.json, ns.batch_size, ns.index_workers,
                     ns.window))
