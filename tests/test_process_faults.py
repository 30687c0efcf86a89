"""Faults at the level of processes: the proxy SIGKILLed during a pipelined backfill and started again, SIGTERM
while the new store (a real PostgreSQL) is down. Each ends with a direct read of both stores against what the agents
were told."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder
from adapters.postgres import PostgresBackend
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import admin_pb2_grpc, memory_pb2_grpc
from memshift.v1 import memory_pb2 as pb
from tests.conftest import ADMIN_TOKEN
from tests.servers import PostgresServer, free_port
from tests.test_migration_e2e import Agent, graph_of

AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


@dataclass
class ProxyProcess:
    """`memshift serve` in a process of its own, as it runs in production."""

    dir: Path
    grace: float = 10.0

    def __post_init__(self) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "MEMSHIFT_LISTEN": f"127.0.0.1:{self.port}",
               "MEMSHIFT_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
               "MEMSHIFT_MCP_LISTEN": "127.0.0.1:0", "MEMSHIFT_ADMIN_TOKEN": ADMIN_TOKEN,
               "MEMSHIFT_STORE": f"sqlite:///{self.dir}/old.db", "MEMSHIFT_CONTROL": f"sqlite:///{self.dir}/control.db",
               "MEMSHIFT_GRACE_SECONDS": str(self.grace), "MEMSHIFT_LOG_LEVEL": "WARNING"}
        log = open(self.dir / "proxy.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve"], env=env, stdout=log, stderr=log)

    async def ready(self) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            await asyncio.wait_for(ch.channel_ready(), 90)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, within: float) -> int:
        assert self.proc is not None
        return self.proc.wait(within)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyProcess]:
    p = ProxyProcess(tmp_path)
    yield p
    p.kill()


@pytest.fixture
async def channels(proxy: ProxyProcess) -> AsyncIterator[tuple[memory_pb2_grpc.MemoryStub,
                                                                admin_pb2_grpc.MigrationAdminStub]]:
    proxy.start()
    await proxy.ready()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as m, \
            grpc.aio.insecure_channel(f"127.0.0.1:{proxy.admin_port}") as a:
        yield memory_pb2_grpc.MemoryStub(m), admin_pb2_grpc.MigrationAdminStub(a)


async def _wait(admin: admin_pb2_grpc.MigrationAdminStub, done: object, limit: float = 90) -> apb.MigrationStatus:
    deadline = time.monotonic() + limit
    while True:
        try:
            st = await admin.GetStatus(apb.GetStatusRequest(), metadata=AUTH, timeout=5)
            if done(st):  # type: ignore[operator]
                return st
        except grpc.aio.AioRpcError:
            pass  # restarting
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def _verify(admin: admin_pb2_grpc.MigrationAdminStub) -> apb.VerifyProgress:
    last = None
    async for progress in admin.Verify(apb.VerifyRequest(), metadata=AUTH):
        last = progress
    assert last is not None and last.done
    return last


async def _seed(memory: memory_pb2_grpc.MemoryStub, n: int) -> None:
    for i in range(0, n, 100):
        await memory.CreateEntities(pb.CreateEntitiesRequest(scope="seed", entities=[
            pb.Entity(name=f"s{j:04d}", entity_type="seed", observations=[f"seed fact {j}"])
            for j in range(i, min(n, i + 100))]))


async def _direct(tmp: Path, target: str, embedder: BatchingEmbedder, agents: list[Agent], seeded: int) -> None:
    for direct in (EmbeddedBackend(tmp / "old.db", embedder), PostgresBackend(target, embedder)):
        await direct.open()
        try:
            for agent in agents:
                assert await graph_of(direct, agent.scope) == (agent.entities, agent.relations), direct.name
            assert len((await graph_of(direct, "seed"))[0]) == seeded
        finally:
            await direct.close()


async def test_sigkill_during_a_pipelined_backfill_loses_nothing(
        proxy: ProxyProcess, channels: tuple[memory_pb2_grpc.MemoryStub, admin_pb2_grpc.MigrationAdminStub],
        servers: dict[str, str], embedder: BatchingEmbedder, tmp_path: Path) -> None:
    memory, admin = channels
    target = f"{servers['postgres']}?schema=sigkill_{tmp_path.name[-6:]}"
    await _seed(memory, 600)
    agents = [Agent(f"agent-{i}", memory) for i in range(3)]
    rng = random.Random(11)
    await admin.StartMigration(apb.StartMigrationRequest(target=target, batch_size=25, workers=3, rate_limit=400),
                               metadata=AUTH)
    for _ in range(40):
        await rng.choice(agents).step(rng)
    st = await _wait(admin, lambda s: s.backfill.done >= 100)
    assert not st.backfill.complete, "the kill must land mid-copy"
    proxy.signal(signal.SIGKILL)
    assert await asyncio.to_thread(proxy.wait, 10) == -signal.SIGKILL
    proxy.start()
    await proxy.ready()
    st = await _wait(admin, lambda s: s.phase == apb.DATA_MIGRATION)
    for _ in range(40):
        await rng.choice(agents).step(rng)
    st = await _wait(admin, lambda s: s.backfill.complete and s.repair_queue_depth == 0)
    await admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
    result = await _verify(admin)
    assert result.differences == 0, [d.key for d in result.samples]
    await _direct(tmp_path, target, embedder, agents, 600)


async def test_sigterm_while_the_new_store_is_down_ends_within_the_grace_period(
        tmp_path: Path, embedder: BatchingEmbedder) -> None:
    pg = PostgresServer(crash_safe=True).start()
    proxy = ProxyProcess(tmp_path, grace=3.0)
    try:
        proxy.start()
        await proxy.ready()
        target = f"{pg.dsn}?schema=sigterm_down"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as m, \
                grpc.aio.insecure_channel(f"127.0.0.1:{proxy.admin_port}") as a:
            memory, admin = memory_pb2_grpc.MemoryStub(m), admin_pb2_grpc.MigrationAdminStub(a)
            await _seed(memory, 100)
            await admin.StartMigration(apb.StartMigrationRequest(target=target), metadata=AUTH)
            await _wait(admin, lambda s: s.backfill.complete)
            await admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
            pg.halt()
            agent = Agent("agent-0", memory)
            rng = random.Random(3)
            for _ in range(30):
                await agent.step(rng)  # acknowledged from the primary; queued for the new store
            st = await _wait(admin, lambda s: s.secondary_unreachable != "")
            assert st.repair_queue_depth > 0
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        # It ends cleanly instead of waiting on a store that will never answer (30 s bounds only a hang; how long it
        # takes is printed here and measured in bench/, not asserted).
        code = await asyncio.to_thread(proxy.wait, 30)
        took = time.monotonic() - started
        assert code == 0, f"exit {code} after {took:.1f} s"
        print(f"SIGTERM with the new store down: exited after {took:.2f} s (grace {proxy.grace} s)")
        started = time.monotonic()
        proxy.start()  # the new store still down: the process starts and serves from the primary
        await proxy.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as m:
            reply = await health_pb2_grpc.HealthStub(m).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            agent.memory = memory_pb2_grpc.MemoryStub(m)
            for _ in range(10):
                await agent.step(rng)  # served from the primary, owed to the new store
        print(f"process start to SERVING with the new store down: {time.monotonic() - started:.2f} s "
              "(the embedding model's load included)")
        pg.resume()  # the queue survived both restarts: the proxy repairs the new store
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.admin_port}") as a:
            admin = admin_pb2_grpc.MigrationAdminStub(a)
            await _wait(admin, lambda s: s.repair_queue_depth == 0 and s.secondary_unreachable == "")
            assert (await _verify(admin)).differences == 0
        proxy.kill()
        await _direct(tmp_path, target, embedder, [agent], 100)
    finally:
        proxy.kill()
        pg.resume_if_halted()
        pg.stop()


async def test_the_models_idle_workers_sleep_instead_of_spinning(proxy: ProxyProcess,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's OpenMP workers must wait passively in the serving process: spinning between a forward pass's parallel
    regions, they take the cores the event loop needs. The OpenMP runtime itself reports what it read: by default
    it spins 300,000 times before sleeping, asked to wait passively not once."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_DISPLAY_ENV", "VERBOSE")
    proxy.start()
    await proxy.ready()
    proxy.kill()
    log = (proxy.dir / "proxy.log").read_text(errors="replace")
    assert "GOMP_SPINCOUNT = '0'" in log and "GOMP_SPINCOUNT = '300000'" not in log, log[-2000:]
