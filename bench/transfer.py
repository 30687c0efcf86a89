"""`make bench` (transfer part): the MCP door and moving memory in and out, next to baselines of the same run.

    python -m bench.transfer [--entities 5000] [--calls 500]

- MCP `open_nodes` over Streamable HTTP (the SDK's own client) against the same call over gRPC.
- memory.jsonl import and export (`memshift import/export`), against the Memory API calls they are made of.
- memshift-jsonl backup and restore (the admin API), against the store's own `apply` of the same records, in-process.
A proxy runs in its own process on the embedded store, as `make run` starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder, SentenceTransformerModel
from adapters.model import Relation
from bench.__main__ import Table, entity_text, free_port, start, timed, wait_ready
from memshift.v1 import admin_pb2_grpc
from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc as pb_grpc
from proxy.cli import transfer as transfer_cli
from proxy.formats import backup, jsonl
from proxy.runtime.config import Limits

TOKEN = "bench-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def proxy(work: Path, name: str) -> tuple[subprocess.Popen[bytes], int, int, int]:
    port, admin, mcp = free_port(), free_port(), free_port()
    proc = start(["-m", "proxy.cli", "serve"], {
        "MEMSHIFT_LISTEN": f"127.0.0.1:{port}", "MEMSHIFT_ADMIN_LISTEN": f"127.0.0.1:{admin}",
        "MEMSHIFT_MCP_LISTEN": f"127.0.0.1:{mcp}", "MEMSHIFT_ADMIN_TOKEN": TOKEN,
        "MEMSHIFT_STORE": f"sqlite:///{work / name}.db", "MEMSHIFT_CONTROL": f"sqlite:///{work / name}-control.db",
        "MEMSHIFT_LOG_LEVEL": "WARNING"}, work)
    return proc, port, admin, mcp


async def main(n: int, calls: int) -> None:
    table = Table("transfer")
    work = Path(tempfile.mkdtemp(prefix="memshift-bench-transfer-"))
    source = work / "memory.jsonl"
    with source.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(jsonl.entity_line(entity_text(i)) + "\n")
        for i in range(n // 2):
            f.write(jsonl.relation_line(Relation(f"e{i:05d}", f"e{(i * 7 + 1) % n:05d}", "knows")) + "\n")
    records = n + n // 2
    procs: list[subprocess.Popen[bytes]] = []
    try:
        a = proxy(work, "a")
        b = proxy(work, "b")
        procs += [a[0], b[0]]
        await wait_ready(f"127.0.0.1:{a[1]}", a[0])
        await wait_ready(f"127.0.0.1:{b[1]}", b[0])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{a[1]}") as ch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{a[2]}") as ach, \
                grpc.aio.insecure_channel(f"127.0.0.1:{b[2]}") as bch:
            memory = pb_grpc.MemoryStub(ch)

            # memory.jsonl in: the Memory API calls it makes, then the command itself into another scope
            t = time.perf_counter()
            batch = [entity_text(i) for i in range(n, 2 * n)]  # texts of their own: no embedding cached
            for i in range(0, n, transfer_cli.ENTITY_BATCH):
                await memory.CreateEntities(pb.CreateEntitiesRequest(scope="baseline", entities=[
                    pb.Entity(name=e.name, entity_type=e.entity_type, observations=e.observations)
                    for e in batch[i:i + transfer_cli.ENTITY_BATCH]]))
            base_rate = n / (time.perf_counter() - t)
            table.add(f"CreateEntities, batches of {transfer_cli.ENTITY_BATCH} (baseline)", rate=base_rate)
            got = await transfer_cli.import_file(memory, source, "bench", dry_run=False)
            table.add(f"memshift import memory.jsonl, {records} records", rate=got["rate"],
                      note=f"{got['rate'] / base_rate:.2f} x CreateEntities batches")

            # memory.jsonl out: ReadGraph paging alone, then the command
            t = time.perf_counter()
            token, count = "", 0
            while True:
                page = await memory.ReadGraph(pb.ReadGraphRequest(scope="bench", page_token=token))
                count += len(page.entities) + len(page.relations)
                token = page.next_page_token
                if not token:
                    break
            page_rate = count / (time.perf_counter() - t)
            table.add("ReadGraph paging alone (baseline)", rate=page_rate)
            got = await transfer_cli.export_file(memory, "bench", io.StringIO())
            table.add(f"memshift export --format mcp-jsonl, {count} records", rate=got["rate"],
                      note=f"{got['rate'] / page_rate:.2f} x ReadGraph paging")

            # memshift-jsonl: the store's own apply of the same records is the floor
            backup_file = work / "backup.jsonl"
            with backup_file.open("w", encoding="utf-8") as sink:
                got = await transfer_cli.export_backup(admin_pb2_grpc.MigrationAdminStub(ach), None, sink, True,
                                                       AUTH)
            exported = got["records"]
            table.add(f"memshift export --format memshift-jsonl, {exported} records with vectors",
                      rate=got["rate"])
            got = await transfer_cli.import_backup(admin_pb2_grpc.MigrationAdminStub(bch), backup_file, False, AUTH)
            lines, restore_rate = got["records"], got["rate"]
            embedder = BatchingEmbedder(SentenceTransformerModel())
            floor_store = EmbeddedBackend(work / "floor.db", embedder)
            await floor_store.open()
            with backup_file.open(encoding="utf-8") as f:
                _, body = backup.parse(f, Limits())
                items = [item for _, item in body]
            spent = 0.0
            for i in range(0, len(items), transfer_cli.BACKUP_CHUNK):
                chunk = items[i:i + transfer_cli.BACKUP_CHUNK]
                recs = [r for r in chunk if not isinstance(r, backup.VectorLine)]
                vecs = backup.vector_map(v for v in chunk if isinstance(v, backup.VectorLine))
                t = time.perf_counter()
                await floor_store.apply(recs, vecs)
                spent += time.perf_counter() - t
            await floor_store.close()
            floor = len(items) / spent
            table.add("the store's own apply of those lines, in-process (floor)", rate=floor)
            table.add(f"memshift import of that backup into an empty proxy, {lines} lines", rate=restore_rate,
                      note=f"{restore_rate / floor:.2f} x the store's own apply")

            # the MCP door: one open_nodes, over gRPC and over Streamable HTTP
            one = pb.OpenNodesRequest(scope="bench", names=["e00001"])
            g_lat, g_rate = await timed(calls, lambda i: memory.OpenNodes(one))
            table.add("gRPC OpenNodes, 1 entity (baseline)", g_lat, g_rate)
            http = create_mcp_http_client(headers={"Memshift-Scope": "bench"})
            async with http, streamable_http_client(f"http://127.0.0.1:{a[3]}/mcp", http_client=http) as (r, w), \
                    ClientSession(r, w) as session:
                await session.initialize()
                m_lat, m_rate = await timed(calls, lambda i: session.call_tool("open_nodes", {"names": ["e00001"]}))
            ratio = statistics.median(m_lat) / statistics.median(g_lat)
            table.add("MCP open_nodes over Streamable HTTP, 1 entity", m_lat, m_rate,
                      note=f"{ratio:.1f} x gRPC p50")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    print()
    table.print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entities", type=int, default=5000)
    parser.add_argument("--calls", type=int, default=500)
    ns = parser.parse_args()
    asyncio.run(main(ns.entities, ns.calls))
