"""Every store kind the conformance suite runs against. A new store adds one entry here.

Server-backed kinds get the address of the server the test session started (tests/servers.py); every store made
gets a fresh namespace on it (a PostgreSQL schema, a Neo4j label prefix, a ChromaDB collection prefix), so tests
never see each other's data.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from adapters.base import Backend, ExportPage
from adapters.chroma import ChromaBackend
from adapters.embedded import EmbeddedBackend
from adapters.embedder import Embedder
from adapters.export import ExportInParts
from adapters.hybrid import HybridBackend
from adapters.neo4j import Neo4jBackend
from adapters.postgres import PostgresBackend
from adapters.qdrant import QdrantBackend
from adapters.qdrant_edge import QdrantEdgeBackend
from adapters.records import Record

STORE_KINDS = ["embedded", "postgres", "qdrant", "qdrant-edge", "neo4j", "hybrid", "chroma-local", "chroma"]
# No Qdrant server installs here; given one (QDRANT_URL=qdrant://host:6333), every suite runs against it too.
if os.environ.get("QDRANT_URL"):
    STORE_KINDS.append("qdrant-server")
_fresh = itertools.count()


def make_store(kind: str, embedder: Embedder, workdir: Path, servers: dict[str, str]) -> Backend:
    if kind == "embedded":
        return EmbeddedBackend(workdir / "memory.db", embedder)
    if kind == "postgres":
        return PostgresBackend(f"{servers['postgres']}?schema=t{next(_fresh)}_{workdir.name[-8:].replace('-', '_')}",
                               embedder, pool_size=4)
    if kind == "qdrant":
        return QdrantBackend(f"qdrant+local:///{workdir / 'qdrant'}", embedder)
    if kind == "neo4j":  # a fresh label prefix per store on the session's Bolt server
        return Neo4jBackend(f"{servers['neo4j']}?prefix=T{next(_fresh)}{workdir.name[-8:].replace('-', '_')}", embedder)
    if kind == "hybrid":
        graph = f"{servers['neo4j']}?prefix=H{next(_fresh)}{workdir.name[-8:].replace('-', '_')}"
        return HybridBackend(f"hybrid:?graph={graph}&vectors=qdrant+local:///{workdir / 'vectors'}", embedder)
    if kind == "qdrant-edge":
        return QdrantEdgeBackend(f"qdrant+edge:///{workdir / 'edge'}", embedder)
    if kind == "qdrant-server":
        return QdrantBackend(f"{os.environ['QDRANT_URL']}?prefix=t{next(_fresh)}{workdir.name[-8:].replace('-', '_')}",
                             embedder)
    if kind == "chroma-local":
        return ChromaBackend(f"chroma+local:///{workdir / 'chroma'}", embedder)
    if kind == "chroma":  # a fresh collection prefix per store on the session's server
        return ChromaBackend(f"{servers['chroma']}?prefix=t{next(_fresh)}{workdir.name[-8:].replace('-', '_')}",
                             embedder)
    raise ValueError(f"unknown store kind {kind}")


def same_export(a: ExportPage, b: ExportPage) -> bool:
    if (a.records, a.next_after) != (b.records, b.next_after) or (a.vectors is None) != (b.vectors is None):
        return False
    if a.vectors is None or b.vectors is None:
        return True
    return a.vectors.keys() == b.vectors.keys() and all(
        a.vectors[k][0] == b.vectors[k][0] and np.array_equal(a.vectors[k][1], b.vectors[k][1]) for k in a.vectors)


async def walk_checking_parts(store: Backend, size: int) -> list[Record]:
    """Every record of `store` as a backfill pages through it with `export_page`, each page checked against the list
    and vector calls it stands for (`ExportInParts`) at the same position."""
    walked: list[Record] = []
    after = None
    while True:
        page = await store.export_page(after, size, vectors=True)
        assert same_export(page, await ExportInParts.export_page(store, after, size, vectors=True))
        walked += page.records
        if page.next_after is None:
            return walked
        after = page.next_after
