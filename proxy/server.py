"""The grpc.aio server: the Memory service, standard health checking and reflection, graceful shutdown.

Shutdown follows grpc's graceful-shutdown example: on SIGTERM or SIGINT the health status turns NOT_SERVING (so
load balancers and Kubernetes stop sending), the server stops taking new calls, in-flight calls get `grace_seconds`
to finish, then the stores close; the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapters.base import Backend
from adapters.embedder import BatchingEmbedder, SentenceTransformerModel
from memshift.v1 import memory_pb2, memory_pb2_grpc
from proxy.clock import HybridClock
from proxy.config import Config, EmbeddingConfig
from proxy.router import Router
from proxy.servicer import MemoryServicer
from proxy.stores import backend_for, redact

log = logging.getLogger("memshift.server")
MEMORY_SERVICE = memory_pb2.DESCRIPTOR.services_by_name["Memory"].full_name


def build_embedder(config: EmbeddingConfig) -> BatchingEmbedder:
    model = SentenceTransformerModel(config.model_path, config.model_name)
    return BatchingEmbedder(model, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000)


@dataclass
class MemshiftServer:
    """One running proxy. `start()` returns the bound port (useful with listen port 0 in tests)."""

    config: Config
    embedder: BatchingEmbedder
    backend: Backend | None = None

    async def start(self) -> int:
        if self.backend is None:
            self.backend = backend_for(self.config.store, self.embedder)
        await self.backend.open()
        self.router = Router(self.backend, HybridClock(self.config.resolved_node_id()), self.embedder,
                             self.config.limits)
        limit = self.config.limits.max_message_bytes
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ])
        memory_pb2_grpc.add_MemoryServicer_to_server(MemoryServicer(self.router), self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (MEMORY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self.port = int(self._server.add_insecure_port(self.config.listen))
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        await self._server.start()
        for service in ("", MEMORY_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"listen": self.config.listen, "port": self.port,
                                   "store": redact(self.config.store), "node_id": self.config.resolved_node_id()})
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.config.grace_seconds if grace is None else grace)
        if self.backend is not None:
            await self.backend.close()
        log.info("stopped")

    async def wait(self) -> None:
        await self._server.wait_for_termination()


async def serve(config: Config) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    embedder = build_embedder(config.embedding)
    server = MemshiftServer(config, embedder)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
        log.info("shutting down", extra={"grace_seconds": config.grace_seconds})
    finally:
        await server.stop()
        with contextlib.suppress(Exception):
            await embedder.close()
