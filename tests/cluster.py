"""A running proxy with clients on both ports, for end-to-end tests: boot it, drive it, wait on its status."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from adapters.base import Backend
from adapters.embedder import BatchingEmbedder
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import admin_pb2_grpc, memory_pb2_grpc
from memshift.v1 import memory_pb2 as pb
from proxy.runtime.config import Config
from proxy.runtime.telemetry import Telemetry, TelemetryConfig
from proxy.transports.server import MemshiftServer
from tests.conftest import ADMIN_TOKEN

AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"), ("x-memshift-actor", "pytest"))


@dataclass
class Cluster:
    dir: Path
    server: MemshiftServer
    memory: memory_pb2_grpc.MemoryStub
    admin: admin_pb2_grpc.MigrationAdminStub
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"sqlite:///{self.dir}/new.db"


async def boot(embedder: BatchingEmbedder, d: Path, *, telemetry: Telemetry | None = None,
               wrap_store: Callable[[str, Backend], Backend] | None = None,
               telemetry_config: TelemetryConfig | None = None, store: str | None = None,
               **settings: Any) -> Cluster:
    settings.setdefault("mcp_listen", "127.0.0.1:0")
    settings.setdefault("listen", "127.0.0.1:0")
    config = Config(store=store or f"sqlite:///{d}/old.db", control=f"sqlite:///{d}/control.db",
                    admin_listen="127.0.0.1:0", admin_token=ADMIN_TOKEN, node_id=2,
                    telemetry=telemetry_config or TelemetryConfig(), **settings)
    server = MemshiftServer(config, embedder, telemetry=telemetry, wrap_store=wrap_store)
    await server.start()
    mch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    ach = grpc.aio.insecure_channel(f"127.0.0.1:{server.admin_port}")
    return Cluster(d, server, memory_pb2_grpc.MemoryStub(mch), admin_pb2_grpc.MigrationAdminStub(ach), [mch, ach])


async def shutdown(c: Cluster) -> None:
    for ch in c.channels:
        await ch.close()
    await c.server.stop(grace=1)


async def status(c: Cluster) -> apb.MigrationStatus:
    return await c.admin.GetStatus(apb.GetStatusRequest(), metadata=AUTH)


async def wait_for(c: Cluster, check: object, limit_s: float = 60) -> apb.MigrationStatus:
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        st = await status(c)
        if check(st):  # type: ignore[operator]
            return st
        assert asyncio.get_running_loop().time() < deadline, f"timed out; status: {st}"
        await asyncio.sleep(0.05)


async def until(ready: Callable[[], Awaitable[bool] | bool], limit_s: float = 60) -> None:
    """Wait for `ready` (a counter or a state reached), failing after `limit_s` on a broken build: tests wait on
    what they can observe, never a fixed time."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        answer = ready()
        if await answer if inspect.isawaitable(answer) else answer:
            return
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def run_verify(c: Cluster, **kw: bool) -> apb.VerifyProgress:
    last = None
    async for progress in c.admin.Verify(apb.VerifyRequest(**kw), metadata=AUTH):
        last = progress
    assert last is not None and last.done
    return last


async def seed(c: Cluster, n: int, scope: str = "seed") -> None:
    for i in range(0, n, 100):
        await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope=scope, entities=[
            pb.Entity(name=f"s{j:04d}", entity_type="seed", observations=[f"seed fact {j}"])
            for j in range(i, min(n, i + 100))]))


async def self_signed(d: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 and its key, made with openssl: (cert, key)."""
    key, cert = d / "tls.key", d / "tls.crt"
    proc = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
        "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    assert await proc.wait() == 0
    return cert, key
