"""Neo4j + Qdrant as one store: the graph and every record in Neo4j, the entity vectors in Qdrant.

Spec: `hybrid:?graph=bolt://host:7687?prefix=P&vectors=qdrant://host:6333` (each part a full store spec; an `&`
inside one must be written `%26`). The proxy sees one store; Neo4j is the source of truth.

Two systems cannot commit together, so a write is ordered to never show a split state and to repair itself:
1. the records commit in Neo4j, with the entity's wanted text hash (`embed_hash`);
2. the vector is upserted into Qdrant, its point carrying the text hash it was computed from;
3. Neo4j's `vector_hash` is set to that hash, only while the entity still wants it.
A search takes candidates from Qdrant and keeps only those Neo4j confirms (live, `vector_hash = embed_hash`, and
the point's hash equal to them): a vector that failed to land, a stale one or one of a deleted entity is never
served. A half-failed write (2 or 3 failing) keeps its computed vectors and retries them before the next write or
search; across a restart, the open's `embed_stale` finds every entity whose `vector_hash` lags and re-embeds it.
Vector writes are serialised within the store, so an older text's vector never lands after a newer one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from neo4j import AsyncManagedTransaction
from qdrant_client import AsyncQdrantClient, models

from adapters import qdrant, semantics
from adapters.base import VectorMap
from adapters.embedder import Embedder, Vector
from adapters.errors import StoreUnavailable
from adapters.neo4j import Neo4jBackend
from adapters.records import text_hash
from adapters.specs import StoreSpec, parse

log = logging.getLogger("memshift.store.hybrid")
Key = tuple[str, str]
T = TypeVar("T")


class HybridBackend(Neo4jBackend):
    def __init__(self, spec: StoreSpec | str, embedder: Embedder, max_pending_texts: int = 128) -> None:
        spec = parse(spec) if isinstance(spec, str) else spec
        if spec.kind != "hybrid":
            raise spec.problem("expected hybrid:?graph=bolt://...&vectors=qdrant://...")
        self.spec = spec  # the spec it was built from: the same store opened again
        super().__init__(spec.parts["graph"], embedder, max_pending_texts)
        parsed = qdrant.parse_spec(spec.parts["vectors"])
        self._qdrant_args: dict[str, Any] = parsed["client"]
        self._collection = f"{parsed['prefix']}_entity_vectors"
        self._label = f"hybrid:{self._label}+qdrant:{self._collection}"
        self._qdrant: AsyncQdrantClient | None = None
        self._vector_lock = asyncio.Lock()
        self._unsynced: dict[Key, tuple[str, Vector]] = {}  # computed vectors a failed write has yet to land

    @property
    def _vq(self) -> AsyncQdrantClient:
        if self._qdrant is None:
            raise StoreUnavailable(f"{self.name} is not open")
        return self._qdrant

    async def open(self) -> None:
        self._qdrant = AsyncQdrantClient(**self._qdrant_args)
        await qdrant.vector_collection(self._qdrant, self._collection, self.embedding.dimension, self.name)
        await super().open()

    async def close(self) -> None:
        await super().close()
        if self._qdrant is not None:
            client, self._qdrant = self._qdrant, None
            await client.close()

    async def _detect_vector_support(self) -> None:
        """Vectors live in Qdrant: no vector index in Neo4j."""

    # --- vectors ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _point(key: Key) -> str:
        return qdrant.point_id(semantics.entity_key(*key))

    async def _store_vectors(self, ready: dict[Key, tuple[str, Vector]]) -> None:
        async with self._vector_lock:
            self._unsynced.update(ready)
            await self._land(dict(self._unsynced))

    async def _land(self, ready: dict[Key, tuple[str, Vector]]) -> None:
        """Steps 2 and 3 of the module docstring, for the entities that still want these texts."""
        wanted = await self._live(list(ready))
        hashes = {k: text_hash(t) for k, (t, _) in ready.items()}
        land = {k: v for k, (_, v) in ready.items() if k in wanted and wanted[k]["embed_hash"] == hashes[k]}
        if land:
            await self._vq.upsert(self._collection, [models.PointStruct(
                id=self._point(k), vector={qdrant.VECTOR: np.asarray(v, dtype=np.float32).tolist()},
                payload={"scope": k[0], "name": k[1], "entity_type": wanted[k]["entity_type"], "hash": hashes[k]})
                for k, v in land.items()])
            await self._write_after(f"UNWIND $rows AS r MATCH (e:{self.E} {{scope: r.s, name: r.n}})"
                                    " WHERE e.embed_hash = r.h SET e.vector_hash = r.h",
                                    rows=[{"s": s, "n": n, "h": hashes[(s, n)]} for s, n in land])
        for k in ready:
            self._unsynced.pop(k, None)

    async def _resync(self) -> None:
        """Land the vectors a half-failed write left behind (a no-op when there are none). Still failing, the
        caller goes on: its own work does not need them, and a search only ever serves confirmed vectors."""
        if not self._unsynced:
            return
        async with self._vector_lock:
            if not self._unsynced:
                return
            try:
                await self._land(dict(self._unsynced))
            except Exception as exc:
                log.warning("%s: %d vectors still waiting for Qdrant: %s", self.name, len(self._unsynced), exc)
                return
            log.info("%s: repaired the vectors a failed write left behind", self.name)

    async def _committed(self, scopes: set[str],
                         body: Callable[[AsyncManagedTransaction], Awaitable[tuple[T, set[Key]]]],
                         vectors: VectorMap | None = None) -> T:
        await self._resync()
        return await super()._committed(scopes, body, vectors)

    async def _confirmed(self, hits: dict[Key, str]) -> set[Key]:
        """The candidates whose point hash Neo4j confirms as the live entity's current vector."""
        live = await self._live(list(hits))
        return {k for k, r in live.items() if r["vector_hash"] == r["embed_hash"] == hits[k]}

    async def _nearest(self, scope: str, vector: Vector, limit: int, min_score: float | None,
                       entity_types: Sequence[str]) -> list[tuple[str, float]]:
        await self._resync()
        must = [models.FieldCondition(key="scope", match=models.MatchValue(value=scope))]
        if entity_types:
            must.append(models.FieldCondition(key="entity_type", match=models.MatchAny(any=list(entity_types))))
        query = np.asarray(vector, dtype=np.float32).tolist()
        k = max(limit * 2, 16)
        while True:  # stale points (deleted entities, vectors of old texts) are skipped: ask for more
            found = (await self._vq.query_points(self._collection, query=query, using=qdrant.VECTOR,
                                                 query_filter=models.Filter(must=list(must)), limit=k,
                                                 with_payload=True, score_threshold=min_score)).points
            hits = {(scope, (p.payload or {})["name"]): (p.payload or {})["hash"] for p in found}
            ok = await self._confirmed(hits)
            out = [((p.payload or {})["name"], float(p.score)) for p in found
                   if (scope, (p.payload or {})["name"]) in ok]
            if len(out) >= limit or len(found) < k:
                return out[:limit]
            k *= 4

    async def _load_vectors(self, keys: list[Key]) -> dict[Key, Vector]:
        found = await self._vq.retrieve(self._collection, [self._point(k) for k in keys], with_payload=True,
                                        with_vectors=True)
        hits = {((p.payload or {})["scope"], (p.payload or {})["name"]): (p.payload or {})["hash"] for p in found}
        ok = await self._confirmed(hits)
        out: dict[Key, Vector] = {}
        for p in found:
            key = ((p.payload or {})["scope"], (p.payload or {})["name"])
            if isinstance(p.vector, dict) and key in ok:
                out[key] = np.asarray(p.vector[qdrant.VECTOR], dtype=np.float32)
        return out

    async def purge_tombstones(self, before_version: int) -> int:
        n = await super().purge_tombstones(before_version)
        # Points of entities that are no longer live are never served (see `_confirmed`); drop them here.
        offset = None
        while True:
            points, offset = await self._vq.scroll(self._collection, limit=1024, offset=offset, with_payload=True)
            alive = await self._live([((p.payload or {})["scope"], (p.payload or {})["name"]) for p in points])
            dead = [p.id for p in points if ((p.payload or {})["scope"], (p.payload or {})["name"]) not in alive]
            if dead:
                await self._vq.delete(self._collection, models.PointIdsList(points=dead))
            if offset is None:
                return n
