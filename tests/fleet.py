"""A fleet of real proxy processes (`memshift serve`) sharing one PostgreSQL control store, for tests and bench."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memshift.v1 import admin_pb2 as apb
from memshift.v1 import admin_pb2_grpc, memory_pb2_grpc
from proxy.engine.control_pg import PostgresControlStore
from tests.servers import free_port

TOKEN = "fleet-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"), ("x-memshift-actor", "fleet-test"))


@dataclass
class Proxy:
    node_id: int
    port: int
    admin_port: int
    proc: subprocess.Popen[bytes]
    log: Path
    channel: grpc.aio.Channel = field(init=False)
    admin_channel: grpc.aio.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.admin_port}")

    @property
    def memory(self) -> memory_pb2_grpc.MemoryStub:
        return memory_pb2_grpc.MemoryStub(self.channel)

    @property
    def admin(self) -> admin_pb2_grpc.MigrationAdminStub:
        return admin_pb2_grpc.MigrationAdminStub(self.admin_channel)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye to the fleet, the control store's connections just drop."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def start_proxy(node_id: int, workdir: Path, store: str, control: str, lease_seconds: float) -> Proxy:
    port, admin_port = free_port(), free_port()
    env = {**os.environ, "MEMSHIFT_LISTEN": f"127.0.0.1:{port}", "MEMSHIFT_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
           "MEMSHIFT_MCP_LISTEN": "127.0.0.1:0",
           "MEMSHIFT_STORE": store, "MEMSHIFT_CONTROL": control, "MEMSHIFT_ADMIN_TOKEN": TOKEN,
           "MEMSHIFT_NODE_ID": str(node_id), "MEMSHIFT_LEASE_SECONDS": str(lease_seconds),
           "MEMSHIFT_LOG_FORMAT": "text", "MEMSHIFT_LOG_LEVEL": "INFO", "HF_HUB_OFFLINE": "1"}
    log = workdir / f"proxy-{node_id}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
    return Proxy(node_id, port, admin_port, proc, log)


async def wait_serving(proxies: list[Proxy], limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    for p in proxies:
        while True:
            if not p.alive:
                raise RuntimeError(f"proxy {p.node_id} exited: {p.log.read_text()[-3000:]}")
            try:
                reply = await health_pb2_grpc.HealthStub(p.channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"proxy {p.node_id} not serving: {p.log.read_text()[-3000:]}")
            await asyncio.sleep(0.2)


async def stop_all(proxies: list[Proxy]) -> None:
    for p in proxies:
        if p.alive:
            p.proc.send_signal(signal.SIGTERM)
    for p in proxies:
        try:
            p.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        await p.channel.close()
        await p.admin_channel.close()


async def acknowledged(control: PostgresControlStore, revision: int, proxies: list[Proxy],
                       limit_s: float = 30) -> float:
    """Seconds until every running proxy has acknowledged `revision` (or a later one) in the control store."""
    t = time.perf_counter()
    running = {f"-{p.node_id}" for p in proxies if p.alive}
    while True:
        members = [m for m in await control.members() if any(m.node.endswith(n) for n in running)]
        if len(members) == len(running) and all(m.revision >= revision for m in members):
            return time.perf_counter() - t
        if time.perf_counter() - t > limit_s:
            raise TimeoutError(f"revision {revision} not acknowledged: {members}")
        await asyncio.sleep(0.002)


async def status(p: Proxy) -> apb.MigrationStatus:
    return await p.admin.GetStatus(apb.GetStatusRequest(), metadata=AUTH, timeout=10)
