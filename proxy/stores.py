"""Store specs: one URL-like string names a store, for the config and for `admin start --to`.

    sqlite:///relative/path.db   sqlite:////absolute/path.db   sqlite:///:memory:
    postgresql://user@host:5432/db?schema=memshift&password_file=/run/secrets/pg
    qdrant+local:///path/to/dir   qdrant+local:///:memory:   qdrant://host:6333?api_key_file=PATH   qdrants://host

A PostgreSQL password comes from the spec, $PGPASSWORD or `password_file`; specs are logged only redacted.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from adapters.base import Backend
from adapters.embedded import EmbeddedBackend
from adapters.embedder import Embedder
from adapters.postgres import PostgresBackend
from adapters.qdrant import QdrantBackend


class StoreSpecError(ValueError):
    pass


def redact(spec: str) -> str:
    """The spec without credentials, for logs and status."""
    parts = urlsplit(spec)
    if parts.password is None and parts.username is None:
        return spec
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return parts._replace(netloc=f"***@{host}").geturl()


def sqlite_path(spec: str) -> str:
    """The file of a sqlite:/// spec (":memory:" for sqlite:///:memory:)."""
    scheme, sep, rest = spec.partition("://")
    if not sep:
        raise StoreSpecError(f"store spec {spec!r} has no scheme; e.g. sqlite:///./data/memory.db")
    if scheme != "sqlite" or not rest.startswith("/") or len(rest) < 2:
        raise StoreSpecError(f"store spec {spec!r}: expected sqlite:///relative.db or sqlite:////absolute.db")
    return rest[1:]


def backend_for(spec: str, embedder: Embedder) -> Backend:
    scheme, sep, _ = spec.partition("://")
    if not sep:
        raise StoreSpecError(f"store spec {spec!r} has no scheme; e.g. sqlite:///./data/memory.db")
    if scheme == "sqlite":
        return EmbeddedBackend(sqlite_path(spec), embedder)
    if scheme in ("postgresql", "postgres"):
        try:
            return PostgresBackend(spec, embedder)
        except (ValueError, OSError) as exc:
            raise StoreSpecError(f"store spec {redact(spec)}: {exc}") from None
    if scheme in ("qdrant+local", "qdrant", "qdrants"):
        try:
            return QdrantBackend(spec, embedder)
        except (ValueError, OSError) as exc:
            raise StoreSpecError(f"store spec {redact(spec)}: {exc}") from None
    raise StoreSpecError(f"store spec {redact(spec)}: unknown scheme {scheme!r}; supported: sqlite, postgresql, "
                         "qdrant+local, qdrant, qdrants")


# Store spec scheme -> OpenTelemetry `db.system.name`.
_SYSTEMS = {"sqlite": "sqlite", "postgresql": "postgresql", "postgres": "postgresql", "bolt": "neo4j",
            "neo4j": "neo4j", "neo4j+s": "neo4j", "qdrant": "qdrant", "qdrant+local": "qdrant", "hybrid": "hybrid"}


def system_of(spec: str) -> str:
    scheme = spec.partition(":")[0]
    return _SYSTEMS.get(scheme, scheme or "other")
