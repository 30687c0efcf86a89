"""Memshift against the MCP reference memory server, one operation at a time from one client, in one run.

    python -m bench.reference [--sizes 1000,5000,50000] [--calls 200]

The reference (`@modelcontextprotocol/server-memory`, installed from npm into .cache/node by the project) runs on the
machine's Node.js over stdio and re-reads its memory.jsonl on every call; Memshift is a proxy in its own process on
the embedded store holding the same graph, reached over MCP Streamable HTTP. Both are driven by the official Python
MCP client, every tool the reference has, the two servers alternating round by round so a slow spell of this shared
machine lands on both alike. A last table measures Memshift's reads while its embedder works through a stream of
bulk creates (reads must not queue behind the model). Without Node.js the comparison is skipped with one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from adapters.embedded import EmbeddedBackend
from adapters.model import Entity, Relation
from bench import generated
from bench.__main__ import Table, free_port, start, wait_ready
from bench.generated import GeneratedVectorsOnly
from bench.scale import TOPICS
from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc as pb_grpc
from proxy.formats import jsonl
from tests.servers import reference_memory_server

SCOPE = "agent"


def entity(i: int) -> Entity:
    return Entity(f"e{i:05d}", ["person", "project", "place"][i % 3],
                  tuple(f"fact {k} of e{i:05d}: likes {TOPICS[(i + k) % 10]}" for k in range(3)))


def relation(i: int, n: int) -> Relation:
    return Relation(f"e{i:05d}", f"e{(i * 7 + 1) % n:05d}", "knows")


def write_jsonl(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(jsonl.entity_line(entity(i)) + "\n")
        for i in range(n // 2):
            f.write(jsonl.relation_line(relation(i, n)) + "\n")


async def build_store(path: Path, n: int) -> None:
    """The same graph in an embedded store, with generated vectors (none of these operations reads them)."""
    store = EmbeddedBackend(path, GeneratedVectorsOnly())
    await store.open()
    await generated.load(store, SCOPE, [entity(i) for i in range(n)], [relation(i, n) for i in range(n // 2)])
    await store.close()


def operations(n: int) -> list[tuple[str, Callable[[int, str], dict[str, Any]]]]:
    """Every tool of the reference server, with arguments for call i of side `tag` (each side its own new names)."""
    def e(i: int) -> str:
        return f"e{i % n:05d}"

    return [
        ("open_nodes", lambda i, t: {"names": [e(i * 13), e(i * 7 + 2)]}),
        ("search_nodes", lambda i, t: {"query": e(i * 31)}),
        ("create_entities", lambda i, t: {"entities": [
            {"name": f"new-{t}-{i}", "entityType": "note", "observations": [f"fresh fact {i}"]}]}),
        ("add_observations", lambda i, t: {"observations": [{"entityName": e(i), "contents": [f"note {t} {i}"]}]}),
        ("create_relations", lambda i, t: {"relations": [{"from": e(i), "to": e(i * 7), "relationType": f"r{t}{i}"}]}),
        ("delete_relations", lambda i, t: {"relations": [{"from": e(i), "to": e(i * 7), "relationType": f"r{t}{i}"}]}),
        ("delete_observations", lambda i, t: {"deletions": [{"entityName": e(i), "observations": [f"note {t} {i}"]}]}),
        ("delete_entities", lambda i, t: {"entityNames": [f"new-{t}-{i}"]}),
        ("read_graph", lambda i, t: {}),
    ]


@contextlib.asynccontextmanager
async def reference_session(entry: Path, memory_file: Path) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command="node", args=[str(entry)],
                                   env={**os.environ, "MEMORY_FILE_PATH": str(memory_file)})
    async with stdio_client(params) as (r, w), ClientSession(r, w) as session:
        await session.initialize()
        yield session


@contextlib.asynccontextmanager
async def memshift_session(work: Path, n: int) -> AsyncIterator[tuple[ClientSession, ClientSession,
                                                                       pb_grpc.MemoryStub]]:
    """Memshift's two MCP doors to one proxy: Streamable HTTP served by the proxy itself, and `memshift mcp`, the
    stdio command a client launches as it launches the reference server (a bridge to the proxy over gRPC)."""
    db = work / f"memshift-{n}.db"
    await build_store(db, n)
    port, mcp = free_port(), free_port()
    proc = start(["-m", "proxy.cli", "serve"], {
        "MEMSHIFT_LISTEN": f"127.0.0.1:{port}", "MEMSHIFT_ADMIN_LISTEN": "127.0.0.1:0",
        "MEMSHIFT_MCP_LISTEN": f"127.0.0.1:{mcp}", "MEMSHIFT_STORE": f"sqlite:///{db}",
        "MEMSHIFT_CONTROL": f"sqlite:///{work}/control-{n}.db", "MEMSHIFT_LOG_LEVEL": "WARNING"}, work)
    try:
        await wait_ready(f"127.0.0.1:{port}", proc)
        http = create_mcp_http_client(headers={"Memshift-Scope": SCOPE})
        bridge = StdioServerParameters(command=sys.executable, args=[
            "-m", "proxy.cli", "mcp", "--target", f"127.0.0.1:{port}", "--scope", SCOPE], cwd=str(work))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch, http, \
                streamable_http_client(f"http://127.0.0.1:{mcp}/mcp", http_client=http) as (r, w), \
                ClientSession(r, w) as session, stdio_client(bridge) as (sr, sw), ClientSession(sr, sw) as stdio:
            await session.initialize()
            await stdio.initialize()
            yield session, stdio, pb_grpc.MemoryStub(ch)
    finally:
        proc.terminate()
        proc.wait(10)


async def call(session: ClientSession, tool: str, args: dict[str, Any]) -> float:
    t = time.perf_counter()
    result = await session.call_tool(tool, args)
    spent = time.perf_counter() - t
    if result.is_error:
        raise SystemExit(f"{tool}({args}) failed: {result.content}")
    return spent


async def compare(table: Table, sessions: dict[str, ClientSession], n: int, calls: int) -> None:
    rounds = 10
    for tool, args in operations(n):
        lat: dict[str, list[float]] = {side: [] for side in sessions}
        # The whole graph is the one answer that grows with the store: fewer calls of it past 1,000 entities keep
        # the run within `make bench`'s ten minutes (at 5,000 entities each call moves about 2 MB).
        count = calls if tool != "read_graph" or n <= 1000 else max(10, calls // (2 if n <= 5000 else 10))
        counter = itertools.count()
        for r in range(rounds):
            for side in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
                for _ in range(count // rounds):
                    i = next(counter)
                    lat[side].append(await call(sessions[side], tool, args(i, side)))
        ref = lat["reference"]
        table.add(f"{n:,} entities, {tool}: reference server, stdio (baseline)", ref)
        for side, ours in lat.items():
            if side == "reference":
                continue
            p50 = statistics.median(ref) / statistics.median(ours)
            p99 = float(np.percentile(ref, 99) / np.percentile(ours, 99))
            table.add(f"{n:,} entities, {tool}: Memshift, {side}", ours,
                      note=f"{p50:.2f} x faster p50, {p99:.2f} x p99", faster_p50=p50, faster_p99=p99)


async def reads_while_embedding(table: Table, session: ClientSession, memory: pb_grpc.MemoryStub, n: int,
                                calls: int) -> None:
    """Memshift's reads while bulk creates keep its embedder busy (batches of 64 new entities, back to back)."""
    stop = asyncio.Event()

    async def bulk() -> None:
        for b in itertools.count():
            if stop.is_set():
                return
            await memory.CreateEntities(pb.CreateEntitiesRequest(scope=SCOPE, entities=[
                pb.Entity(name=f"bulk-{b}-{k}", entity_type="note",
                          observations=[f"bulk fact {b} {k} {TOPICS[k % 10]}"]) for k in range(64)]))

    writer = asyncio.ensure_future(bulk())
    try:
        await asyncio.sleep(1)
        for tool, args in operations(n)[:2]:
            lat = [await call(session, tool, args(i, "busy")) for i in range(calls)]
            table.add(f"{n:,} entities, {tool}: Memshift (stdio) while its embedder works", lat)
    finally:
        stop.set()
        await writer


async def main(sizes: list[int], calls: int) -> None:
    entry = reference_memory_server()
    if entry is None:
        print("bench.reference: skipped, Node.js is not on this machine (the reference server runs on it)")
        return
    table = Table("reference")
    work = Path(tempfile.mkdtemp(prefix="memshift-bench-reference-"))
    for n in sizes:
        memory_file = work / f"memory-{n}.jsonl"
        write_jsonl(memory_file, n)
        async with reference_session(entry, memory_file) as ref, \
                memshift_session(work, n) as (http, stdio, memory):
            await compare(table, {"reference": ref, "stdio (memshift mcp)": stdio, "Streamable HTTP": http}, n,
                          calls)
            await reads_while_embedding(table, stdio, memory, n, calls)
        print(f"  {n:,} entities done", file=sys.stderr)
    print()
    table.print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000,50000")
    parser.add_argument("--calls", type=int, default=200)
    ns = parser.parse_args()
    asyncio.run(main([int(s) for s in ns.sizes.split(",")], ns.calls))
