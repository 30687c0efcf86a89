"""Store specs: one URL-like string names a store, for the config and for `admin start --to`.

    sqlite:///relative/path.db   sqlite:////absolute/path.db   sqlite:///:memory:
    postgresql://user@host:5432/db?schema=memshift&password_file=/run/secrets/pg
    qdrant+local:///path/to/dir   qdrant+local:///:memory:   qdrant://host:6333?api_key_file=PATH   qdrants://host
    qdrant+edge:///path/to/dir   (Qdrant's embeddable engine, qdrant-edge-py)
    bolt://user@host:7687/database?prefix=Memshift&password_file=PATH   (also neo4j://, bolt+s://, neo4j+s://)
    hybrid:?graph=bolt://host:7687&vectors=qdrant://host:6333
    chroma+local:///path/to/dir   chroma://host:8000?tenant=T&database=D&prefix=P&token_file=PATH   chromas://host

Passwords come from the spec, a `password_file`/`api_key_file`/`token_file`, or the environment ($PGPASSWORD,
$NEO4J_USERNAME and $NEO4J_PASSWORD, $QDRANT_API_KEY, $CHROMA_TOKEN); specs are logged only redacted.
Qdrant's local mode and Edge, and ChromaDB (local or server) take one writer: one proxy, not a fleet.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit

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
from proxy.redaction import redact, scrub_secrets

__all__ = ["backend_for", "redact", "sqlite_path", "system_of"]




def sqlite_path(spec: str) -> str:
    """The file of a sqlite:/// spec (":memory:" for sqlite:///:memory:)."""
    scheme, sep, rest = spec.partition("://")
    if not sep:
        raise StoreSpecError(f"store spec {redact(spec)!r} has no scheme; e.g. sqlite:///./data/memory.db")
    if scheme != "sqlite" or not rest.startswith("/") or len(rest) < 2:
        raise StoreSpecError(f"store spec {redact(spec)!r}: expected sqlite:///relative.db or sqlite:////absolute.db")
    return rest[1:]


# Scheme of a store behind a server -> (its OpenTelemetry `db.system.name`, the store).
_SERVER_STORES: dict[str, tuple[str, Callable[[str, Embedder], Backend]]] = {
    **dict.fromkeys(("postgresql", "postgres"), ("postgresql", PostgresBackend)),
    **dict.fromkeys(("qdrant+local", "qdrant", "qdrants"), ("qdrant", QdrantBackend)),
    "qdrant+edge": ("qdrant", QdrantEdgeBackend),
    **dict.fromkeys(("chroma+local", "chroma", "chromas"), ("chroma", ChromaBackend)),
    **dict.fromkeys(("bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc"), ("neo4j", Neo4jBackend)),
}


def backend_for(spec: str, embedder: Embedder) -> Backend:
    scheme, sep, _ = spec.partition("://")
    if spec.startswith("hybrid:"):
        make: Callable[[str, Embedder], Backend] = HybridBackend
    elif not sep:
        raise StoreSpecError(f"store spec {redact(spec)!r} has no scheme; e.g. sqlite:///./data/memory.db")
    elif scheme == "sqlite":
        return EmbeddedBackend(sqlite_path(spec), embedder)
    elif scheme in _SERVER_STORES:
        make = _SERVER_STORES[scheme][1]
    else:
        raise StoreSpecError(f"store spec {redact(spec)}: unknown scheme {scheme!r}; supported: sqlite, postgresql, "
                             "qdrant+local, qdrant+edge, qdrant, qdrants, bolt, neo4j (and their +s forms), hybrid, "
                             "chroma+local, chroma, chromas")
    _check_address(spec)
    try:
        return make(spec, embedder)
    except (ValueError, OSError) as exc:  # a malformed spec, or an unreadable password file
        raise StoreSpecError(scrub_secrets(f"store spec {redact(spec)}: {exc}", spec)) from None


def _check_address(spec: str) -> None:
    """The host and port of a server store's spec, checked before anything connects: a port that is not a number
    from 1 to 65535 names itself, where the driver would fail later with a message the caller could not act on."""
    for part in ([spec] if not spec.startswith("hybrid:") else dict(parse_qsl(urlsplit(spec).query)).values()):
        if "://" not in part:
            continue
        netloc = urlsplit(part).netloc.rpartition("@")[2]
        host, colon, port = netloc.rpartition(":") if not netloc.endswith("]") else (netloc, "", "")
        if colon and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise StoreSpecError(f"store spec {redact(spec)}: port {port!r} is not a number from 1 to 65535")
        if colon and not host:
            raise StoreSpecError(f"store spec {redact(spec)}: the host is missing before port {port}")


# Store spec scheme -> OpenTelemetry `db.system.name`.
_SYSTEMS = {"sqlite": "sqlite", "hybrid": "hybrid", **{s: system for s, (system, _) in _SERVER_STORES.items()}}


def system_of(spec: str) -> str:
    scheme = spec.partition(":")[0]
    return _SYSTEMS.get(scheme, scheme or "other")
