"""Shared fixtures: the real embedding model (loaded once), fresh stores of every kind, a running proxy."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapters.base import Backend
from adapters.embedder import BatchingEmbedder, SentenceTransformerModel
from memshift.v1 import memory_pb2_grpc
from proxy.runtime.config import Config
from proxy.transports.server import MemshiftServer
from tests.servers import ArcadeDBServer, ChromaServer, PostgresServer, reference_memory_server
from tests.stores import STORE_KINDS, make_store

StoreFactory = Callable[[], Awaitable[Backend]]
ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="session")
def embedder() -> BatchingEmbedder:
    return BatchingEmbedder(SentenceTransformerModel())


@pytest.fixture(scope="session")
def servers() -> Iterator[dict[str, str]]:
    """The real servers the stores run on, started once for the session: store kind -> address."""
    postgres = PostgresServer().start()
    chroma = ChromaServer().start()
    try:
        # A real Neo4j when NEO4J_URI names one (bolt://user:password@host:7687), else ArcadeDB's Bolt server.
        neo4j_uri = os.environ.get("NEO4J_URI")
        arcadedb = None if neo4j_uri else ArcadeDBServer().start()
        try:
            yield {"postgres": postgres.dsn, "neo4j": arcadedb.uri if arcadedb else str(neo4j_uri),
                   "chroma": chroma.url}
        finally:
            if arcadedb is not None:
                arcadedb.stop()
    finally:
        chroma.stop()
        postgres.stop()


@pytest.fixture(params=STORE_KINDS)
async def store_factory(request: pytest.FixtureRequest, embedder: BatchingEmbedder, servers: dict[str, str],
                        tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[StoreFactory]:
    """Makes fresh, opened stores of one kind; closes them after the test."""
    opened: list[Backend] = []

    async def make() -> Backend:
        store = make_store(request.param, embedder, tmp_path_factory.mktemp(request.param), servers)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def backend(store_factory: StoreFactory) -> Backend:
    return await store_factory()


@pytest.fixture
async def server(embedder: BatchingEmbedder, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MemshiftServer]:
    d = tmp_path_factory.mktemp("proxy")
    srv = MemshiftServer(Config(listen="127.0.0.1:0", mcp_listen="127.0.0.1:0", store=f"sqlite:///{d}/memory.db", control=f"sqlite:///{d}/control.db",
                                admin_listen="127.0.0.1:0", admin_token=ADMIN_TOKEN, node_id=1), embedder)
    await srv.start()
    yield srv
    await srv.stop(grace=1)


@pytest.fixture
async def stub(server: MemshiftServer) -> AsyncIterator[memory_pb2_grpc.MemoryStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield memory_pb2_grpc.MemoryStub(channel)


@pytest.fixture
async def cluster(embedder: BatchingEmbedder, tmp_path: Path) -> AsyncIterator[Any]:
    """A running proxy with clients on both ports (tests.cluster.Cluster), stopped after the test."""
    from tests.cluster import boot, shutdown  # tests.cluster imports this module

    c = await boot(embedder, tmp_path)
    yield c
    await shutdown(c)


@pytest.fixture(scope="session")
def reference_server() -> Path:
    """The MCP reference memory server itself, installed from npm into the project's .cache/ (once)."""
    entry = reference_memory_server()
    if entry is None:
        pytest.skip("Node.js is not on this machine")
    return entry
