"""The store a spec names, built and ready to open (`backend_for`); specs themselves are read by `adapters.specs`.

Qdrant's local mode and Edge, and ChromaDB (local or server) take one writer: one proxy, not a fleet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from adapters.base import Backend
from adapters.chroma import ChromaBackend
from adapters.embedded import EmbeddedBackend
from adapters.embedder import Embedder
from adapters.errors import StoreSpecError
from adapters.hybrid import HybridBackend
from adapters.neo4j import Neo4jBackend
from adapters.postgres import PostgresBackend
from adapters.qdrant import QdrantBackend
from adapters.qdrant_edge import QdrantEdgeBackend
from adapters.specs import StoreSpec, parse, redact, scrub_secrets

__all__ = ["backend_for", "redact", "system_of"]

# Scheme -> the store built from its spec.
_STORES: Mapping[str, Callable[[StoreSpec, Embedder], Backend]] = {
    **dict.fromkeys(("postgresql", "postgres"), PostgresBackend),
    **dict.fromkeys(("qdrant+local", "qdrant", "qdrants"), QdrantBackend),
    "qdrant+edge": QdrantEdgeBackend,
    **dict.fromkeys(("chroma+local", "chroma", "chromas"), ChromaBackend),
    **dict.fromkeys(("bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc"), Neo4jBackend),
    "hybrid": HybridBackend,
}
# A store's kind -> its OpenTelemetry `db.system.name`.
_SYSTEMS = {"sqlite": "sqlite", "postgresql": "postgresql", "qdrant": "qdrant", "qdrant-edge": "qdrant",
            "neo4j": "neo4j", "hybrid": "hybrid", "chroma": "chroma"}


def backend_for(spec: str, embedder: Embedder) -> Backend:
    """The store `spec` names, not yet opened; a spec that cannot be used is a StoreSpecError naming the part."""
    parsed = parse(spec)
    if parsed.kind == "sqlite":
        return EmbeddedBackend(parsed.path, embedder)
    try:
        return _STORES[parsed.scheme](parsed, embedder)
    except ValueError as exc:  # a store's own option it cannot take (StoreSpecError included, already shown)
        if isinstance(exc, StoreSpecError):
            raise
        raise StoreSpecError(scrub_secrets(f"store spec {parsed.shown}: {exc}", spec)) from None


def system_of(spec: str) -> str:
    try:
        return _SYSTEMS[parse(spec).kind]
    except StoreSpecError:
        return "other"
