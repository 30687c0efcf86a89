"""`make bench`: latency and throughput through the proxy, next to baselines measured in the same run.

Servers run in their own processes (as in production, a sidecar), the client here. Prints one table.
    python -m bench [--entities 10000] [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np

from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder, SentenceTransformerModel
from adapters.model import Entity
from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc as pb_grpc

SCOPE = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def entity_text(i: int) -> Entity:
    topics = ["tea", "chess", "astronomy", "cooking", "python", "jazz", "hiking", "finance", "poetry", "robots"]
    return Entity(f"e{i:05d}", "thing", (f"fact {i} about {topics[i % 10]} and {topics[(i * 7) % 10]}",))


RESULTS = Path(__file__).resolve().parent / "results"


class Table:
    """The printed table, and the same figures unrounded in bench/results/<name>.json (for comparing runs)."""

    def __init__(self, name: str = "proxy") -> None:
        self.name = name
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.raw: list[dict[str, object]] = []

    def add(self, name: str, lat: list[float] | None = None, rate: float | None = None, note: str = "",
            **figures: object) -> None:
        p50 = f"{statistics.median(lat) * 1000:.3f}" if lat else "-"
        p99 = f"{np.percentile(lat, 99) * 1000:.3f}" if lat else "-"
        self.rows.append((name, p50, p99, f"{rate:,.0f}" if rate else "-", note))
        self.raw.append({"benchmark": name, "p50_ms": statistics.median(lat) * 1000 if lat else None,
                         "p99_ms": float(np.percentile(lat, 99)) * 1000 if lat else None, "per_second": rate,
                         "vs_baseline": note, **figures})
        # Said as soon as measured: a long run stopped part-way still leaves what it had measured.
        print(f"  measured {name}: {' | '.join(c for c in self.rows[-1][1:] if c != '-')}", file=sys.stderr)

    def print(self) -> None:
        head = ("benchmark", "p50 ms", "p99 ms", "ops/s", "vs baseline")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(5)]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
        print(line(head))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in self.rows:
            print(line(r))
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"{self.name}.json"
        out.write_text(json.dumps({"bench": self.name, "at": time.time(), "rows": self.raw}, indent=1) + "\n")
        print(f"\nfigures in {out}")


async def timed(n: int, call: Callable[[int], Awaitable[object]], warmup: int = 50) -> tuple[list[float], float]:
    for i in range(warmup):
        await call(i)
    lat = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        await call(i)
        lat.append(time.perf_counter() - t)
    return lat, n / (time.perf_counter() - start)


async def wait_ready(target: str, proc: subprocess.Popen[bytes]) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        try:
            await asyncio.wait_for(ch.channel_ready(), 90)
        except TimeoutError:
            proc.kill()
            raise SystemExit(f"server at {target} did not start") from None


ROOT = Path(__file__).resolve().parent.parent


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """A server process of the benchmark, run in the benchmark's own temporary directory `cwd`: a default path
    (./data/control.db, ./data/memory.db) then lands there, never in a checkout where `make run` left state."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # BENCH_SERVER_LOG=FILE keeps the servers' stderr (their logs) for a look at what a slow figure hid.
    log = os.environ.get("BENCH_SERVER_LOG")
    stderr = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child process owns it
    return subprocess.Popen([sys.executable, *args], env={**os.environ, **env, "PYTHONPATH": path}, cwd=cwd,
                            stderr=stderr)


def serve(work: Path, store: str, token: str) -> tuple[subprocess.Popen[bytes], int, int]:
    """`memshift serve` on `store` in its own process, with its control store in `work` and `token` for the admin
    API: the process, its Memory port and its admin port."""
    port, admin_port = free_port(), free_port()
    proc = start(["-m", "proxy.cli", "serve"], {
        "MEMSHIFT_LISTEN": f"127.0.0.1:{port}", "MEMSHIFT_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "MEMSHIFT_MCP_LISTEN": "127.0.0.1:0", "MEMSHIFT_STORE": store,
        "MEMSHIFT_CONTROL": f"sqlite:///{work}/control.db", "MEMSHIFT_ADMIN_TOKEN": token,
        "MEMSHIFT_LOG_LEVEL": "WARNING"}, work)
    return proc, port, admin_port


async def main(n_entities: int, calls: int) -> None:
    table = Table()
    work = Path(tempfile.mkdtemp(prefix="memshift-bench-"))
    embedder = BatchingEmbedder(SentenceTransformerModel())
    ents = [entity_text(i) for i in range(n_entities)]

    # The model's own batched rate, on the texts the proxy will embed, is measured in turns with the concurrent
    # creates below (a single pass here drifted by a fifth from the one beside the creates).
    model = embedder._model
    model.encode(["warm up"] * 64)
    sample = [f"{e.name} {e.entity_type} {e.observations[0]}" for e in ents[:1024]]

    # Preload a store file with n_entities real embeddings (through the store, batched).
    db = work / "memory.db"
    store = EmbeddedBackend(db, embedder)
    await store.open()
    for i in range(0, n_entities, 1000):
        await store.create_entities(SCOPE, ents[i:i + 1000], 1 + i)
    q = (await embedder.embed(["who knows about jazz and poetry?"]))[0]
    lat, rate = await timed(calls // 4, lambda i: store.semantic_search(SCOPE, q, 10, None, []))
    table.add(f"store semantic search, {n_entities} entities, vector given", lat, rate)
    await store.close()
    async def library_encode(i: int) -> None:  # what a user's own code would call, on the caller's thread
        model.library_encode([f"query number {i} about jazz"])

    qlat, qrate = await timed(200, library_encode, warmup=5)
    table.add("query embedding alone: the library's encode, one text (baseline)", qlat, qrate)

    noop_port, proxy_port = free_port(), free_port()
    noop = start(["-m", "bench.noop_server", str(noop_port)], {}, work)
    proxy = start(["-m", "proxy.cli", "serve"], {
        "MEMSHIFT_LISTEN": f"127.0.0.1:{proxy_port}", "MEMSHIFT_STORE": f"sqlite:///{db}", "MEMSHIFT_LOG_LEVEL":
        "WARNING", "MEMSHIFT_CONTROL": f"sqlite:///{work}/control.db"}, work)
    try:
        await wait_ready(f"127.0.0.1:{noop_port}", noop)
        await wait_ready(f"127.0.0.1:{proxy_port}", proxy)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{noop_port}") as nch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{proxy_port}") as pch:
            floor, proxied = pb_grpc.MemoryStub(nch), pb_grpc.MemoryStub(pch)
            one = pb.OpenNodesRequest(scope=SCOPE, names=["e00001"])
            f_lat, f_rate = await timed(calls, lambda i: floor.OpenNodes(one))
            table.add("no-op gRPC handler, OpenNodes (transport floor)", f_lat, f_rate)
            p_lat, p_rate = await timed(calls, lambda i: proxied.OpenNodes(one))
            overhead = (statistics.median(p_lat) - statistics.median(f_lat)) * 1000
            table.add("proxy OpenNodes, 1 entity", p_lat, p_rate, f"+{overhead:.3f} ms p50 over floor")

            same_q = pb.SemanticSearchRequest(scope=SCOPE, query="who knows about jazz and poetry?", limit=10)
            s_lat, s_rate = await timed(calls // 4, lambda i: proxied.SemanticSearch(same_q))
            table.add(f"proxy SemanticSearch, {n_entities} entities, query embedding cached", s_lat, s_rate)
            s2_lat, s2_rate = await timed(calls // 10, lambda i: proxied.SemanticSearch(
                pb.SemanticSearchRequest(scope=SCOPE, query=f"question {i} about robots", limit=10)), warmup=5)
            table.add("proxy SemanticSearch, fresh query (embedding included)", s2_lat, s2_rate,
                      f"{statistics.median(s2_lat) / statistics.median(qlat):.2f} x p50, "
                      f"{np.percentile(s2_lat, 99) / np.percentile(qlat, 99):.2f} x p99 of the query embedding")
            sn_lat, sn_rate = await timed(calls // 10, lambda i: proxied.SearchNodes(
                pb.SearchNodesRequest(scope=SCOPE, query=f"e0{i % 10}01")), warmup=5)
            table.add(f"proxy SearchNodes (substring), {n_entities} entities", sn_lat, sn_rate)
            rg_lat, rg_rate = await timed(calls // 10, lambda i: proxied.ReadGraph(
                pb.ReadGraphRequest(scope=SCOPE, page_size=100)), warmup=5)
            table.add("proxy ReadGraph, page of 100", rg_lat, rg_rate)
            ao_lat, ao_rate = await timed(calls // 4, lambda i: proxied.AddObservations(pb.AddObservationsRequest(
                scope=SCOPE, observations=[pb.ObservationAddition(entity_name=f"e{i % 1000:05d}",
                                                                  contents=[f"added note {i}"])])), warmup=5)
            table.add("proxy AddObservations, 1 observation (re-embeds)", ao_lat, ao_rate)
            de_lat, de_rate = await timed(calls // 4, lambda i: proxied.DeleteRelations(pb.DeleteRelationsRequest(
                scope=SCOPE, relations=[pb.Relation(**{"from": f"e{i:05d}"}, to="x", relation_type="r")])))
            table.add("proxy DeleteRelations, 1 relation", de_lat, de_rate)

            # 16 concurrent clients, each creating one new entity per call: the micro-batcher's job. The model's
            # own rate drifts by a fifth between minutes on this shared machine, so the two are measured in turns,
            # three rounds each, and the medians compared.
            per_client, clients, rounds = max(8, n_entities // 160), 16, 3
            c_lat: list[float] = []
            c_rates: list[float] = []
            m_rates: list[float] = []

            async def client(r: int, c: int) -> None:
                for j in range(per_client):
                    i = n_entities + (r * clients + c) * per_client + j
                    e = entity_text(i)
                    t0 = time.perf_counter()
                    await proxied.CreateEntities(pb.CreateEntitiesRequest(scope=SCOPE, entities=[
                        pb.Entity(name=e.name, entity_type=e.entity_type, observations=e.observations)]))
                    c_lat.append(time.perf_counter() - t0)

            for r in range(rounds):
                t = time.perf_counter()
                model.encode(sample, 64)
                m_rates.append(len(sample) / (time.perf_counter() - t))
                t = time.perf_counter()
                await asyncio.gather(*(client(r, c) for c in range(clients)))
                # Writes are acknowledged once committed; the clock stops only when every vector is stored too
                # (a semantic search in the scope waits for its pending embeddings).
                await proxied.SemanticSearch(pb.SemanticSearchRequest(scope=SCOPE, query="who knows about jazz?"))
                c_rates.append(clients * per_client / (time.perf_counter() - t))
            c_rate, m_rate = statistics.median(c_rates), statistics.median(m_rates)
            table.add("model encode, batches of 64, in turns with the next row (baseline)", rate=m_rate)
            table.add("proxy CreateEntities, 16 concurrent clients, 1 entity/call", c_lat, c_rate,
                      f"{c_rate / m_rate:.2f} x model batched rate", model_rates=m_rates, proxy_rates=c_rates)
    finally:
        for p in (noop, proxy):
            p.terminate()
            p.wait(10)
    print()
    table.print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=2000)
    ns = parser.parse_args()
    asyncio.run(main(ns.entities, ns.calls))
