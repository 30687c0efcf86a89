"""What agents feel in a flood: 2,000 small calls and 50 large ones at once, against a proxy that sheds load beyond
its in-flight budget and against the same proxy with no budget (the baseline), in the same run. Prints a table and
writes a JSON file.

    python -m bench.flood [--small 2000] [--large 50] [--json bench/results/flood.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.__main__ import free_port, start, wait_ready
from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc as pb_grpc


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


async def flood(port: int, health_port: int, small: int, large: int, clients: int = 20) -> dict[str, Any]:
    scope = "flood"
    # Many agents, each its own connection: one HTTP/2 connection alone caps its calls in flight at ~100 streams.
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(clients)]
    stubs = [pb_grpc.MemoryStub(ch) for ch in channels]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as hch:
        memory = stubs[0]
        await memory.CreateEntities(pb.CreateEntitiesRequest(scope=scope, entities=[
            pb.Entity(name=f"e{i:04d}", entity_type="t", observations=[f"fact {i}"]) for i in range(200)]))
        small_lat: list[float] = []
        shed = errors = 0

        async def one_small(i: int) -> None:
            nonlocal shed, errors
            t = time.perf_counter()
            try:
                await stubs[i % clients].OpenNodes(pb.OpenNodesRequest(scope=scope, names=[f"e{i % 200:04d}"]),
                                                   timeout=60)
                small_lat.append(time.perf_counter() - t)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    shed += 1
                else:
                    errors += 1

        async def one_large(i: int) -> None:
            nonlocal shed, errors
            try:
                stub = stubs[i % clients]
                await stub.ReadGraph(pb.ReadGraphRequest(scope=scope, page_size=200), timeout=60)
                await stub.SearchNodes(pb.SearchNodesRequest(scope=scope, query=f"fact {i}"), timeout=60)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    shed += 1
                else:
                    errors += 1

        health_lat: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            stub = health_pb2_grpc.HealthStub(hch)
            while not done.is_set():
                t = time.perf_counter()
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                health_lat.append(time.perf_counter() - t)
                await asyncio.sleep(0.01)

        prober = asyncio.ensure_future(probe())
        started = time.perf_counter()
        await asyncio.gather(*(one_small(i) for i in range(small)), *(one_large(i) for i in range(large)))
        wall = time.perf_counter() - started
        done.set()
        await prober
    for ch in channels:
        await ch.close()
    return {"small_p50_ms": _ms(small_lat, 50), "small_p99_ms": _ms(small_lat, 99), "small_ok": len(small_lat),
            "shed": shed, "errors": errors, "health_p50_ms": _ms(health_lat, 50),
            "health_p99_ms": _ms(health_lat, 99), "health_checks": len(health_lat), "wall_s": wall}


async def run(small: int, large: int, budget: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, calls in (("no budget (baseline)", 1_000_000), ("default budget (256 calls)", 256),
                        (f"budget of {budget} calls", budget)):
        work = Path(tempfile.mkdtemp(prefix="memshift-flood-"))
        port, admin, health = free_port(), free_port(), free_port()
        proc = start(["-m", "proxy.cli", "serve"], {
            "MEMSHIFT_LISTEN": f"127.0.0.1:{port}", "MEMSHIFT_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "MEMSHIFT_MCP_LISTEN": "127.0.0.1:0",
            "MEMSHIFT_HEALTH_LISTEN": f"127.0.0.1:{health}", "MEMSHIFT_STORE": f"sqlite:///{work}/m.db",
            "MEMSHIFT_CONTROL": f"sqlite:///{work}/c.db", "MEMSHIFT_LOG_LEVEL": "ERROR",
            "MEMSHIFT_MAX_INFLIGHT_CALLS": str(calls)}, work)
        try:
            await wait_ready(f"127.0.0.1:{port}", proc)
            results[name] = await flood(port, health, small, large)
            print(f"  measured {name}", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(15)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=50)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "flood.json"))
    ns = parser.parse_args()
    results = asyncio.run(run(ns.small, ns.large, ns.budget))
    base = results["no budget (baseline)"]
    head = ("proxy", "small p50 ms", "small p99 ms", "shed", "health p99 ms", "small p99 vs baseline")
    rows = [(name, f"{r['small_p50_ms']:.1f}", f"{r['small_p99_ms']:.1f}", str(r["shed"]),
             f"{r['health_p99_ms']:.1f}", f"{r['small_p99_ms'] / base['small_p99_ms']:.2f}x")
            for name, r in results.items()]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    Path(ns.json).write_text(json.dumps(results, indent=2))
    print(f"\none flood against each proxy; figures in {ns.json}")


if __name__ == "__main__":
    main()
