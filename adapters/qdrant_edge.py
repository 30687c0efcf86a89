"""Qdrant Edge: the memory store as points (adapters.points) in Qdrant's embeddable engine, `qdrant-edge-py`.

`qdrant+edge:///path/to/dir` keeps one Edge shard a collection under that directory (`<prefix>_entities`, ...,
`prefix` from the query string, default `memshift`). Edge is Qdrant's storage engine in-process: payload indexes,
conditional upserts, the same filters as a server, and writes that do not commit to disk one point at a time as the
client's local mode does (see docs/benchmarks.md). The layout, the exact version halves and the conditional writes
are the Qdrant driver's (adapters.qdrant), which this one extends with Edge's classes and calls. Like local mode it
is files one process owns: one proxy, not a fleet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np

from adapters.embedder import Embedder, EmbeddingInfo, Vector
from adapters.errors import EmbeddingMismatch, StoreUnavailable
from adapters.points import META_ID, Payload, PointsBackend, Where, scope_id
from adapters.qdrant import VECTOR, QdrantPoints, _filter
from adapters.records import Kind
from adapters.specs import StoreSpec, parse

T = TypeVar("T")
_SCROLL = 1024
_INDEXED = {Kind.ENTITY: ("scope", "name"), Kind.OBSERVATION: ("scope", "entity"),
            Kind.RELATION: ("scope", "source", "target")}


class EdgePoints(QdrantPoints):
    """adapters.points' driver for Qdrant Edge: the Qdrant driver's rules over Edge shards."""

    def __init__(self, spec: StoreSpec | str) -> None:
        spec = parse(spec) if isinstance(spec, str) else spec
        path, prefix = spec.path, spec.options.get("prefix", "memshift")
        self._dir = Path(path)
        self._c = {Kind.ENTITY: f"{prefix}_entities", Kind.OBSERVATION: f"{prefix}_observations",
                   Kind.RELATION: f"{prefix}_relations"}
        self._scopes_c, self._meta_c = f"{prefix}_scopes", f"{prefix}_meta"
        self.label = f"qdrant-edge:{path}/{prefix}"
        self._index = None  # Edge indexes payloads itself
        self.conditional = True
        self._too_old = ""
        self._shards: dict[str, Any] = {}
        self._executor: ThreadPoolExecutor | None = None
        import qdrant_edge as qe  # only a proxy using Edge loads it

        self._qe = qe

        # Edge's binding reads a Python bool in a match as an integer, which then matches no stored boolean; so
        # `deleted` is also stored as 0 or 1 (`deleted_n`), and every match on it goes there.
        def field(key: str, **condition: Any) -> Any:
            return qe.FieldCondition(key="deleted_n" if key == "deleted" else key, **condition)

        def value(value: Any) -> Any:
            return qe.MatchValue(value=int(value) if isinstance(value, bool) else value)

        self._m = SimpleNamespace(Filter=qe.Filter, FieldCondition=field, MatchValue=value, MatchAny=qe.MatchAny,
                                  Range=qe.RangeFloat, Point=qe.Point)

    def fleet_problem(self) -> str | None:
        return f"{self.label} is Qdrant Edge: files one process owns, so one proxy, not a fleet"

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreUnavailable(f"{self.label} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args))

    def _shard(self, name: str) -> Any:
        return self._shards[name]

    async def open(self, info: EmbeddingInfo) -> None:
        qe = self._qe
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qdrant-edge")
        self._dir.mkdir(parents=True, exist_ok=True)
        flat = qe.EdgeConfig(vectors={"none": qe.EdgeVectorParams(size=1, distance=qe.Distance.Cosine)})
        vectors = qe.EdgeConfig(vectors={VECTOR: qe.EdgeVectorParams(size=info.dimension,
                                                                      distance=qe.Distance.Cosine)})

        def shard(name: str, config: Any) -> Any:
            path = self._dir / name
            if path.exists():
                return qe.EdgeShard.load(str(path), config)
            return qe.EdgeShard.create(str(path), config)

        for name in (*self._c.values(), self._scopes_c, self._meta_c):
            config = vectors if name == self._c[Kind.ENTITY] else flat
            try:
                self._shards[name] = await self._call(shard, name, config)
            except Exception as exc:  # an existing shard made for another dimension
                raise EmbeddingMismatch(f"{self.label}: cannot open {name} with vectors of dimension "
                                        f"{info.dimension}: {exc}") from exc
        meta = await self._payloads(self._meta_c, [META_ID])
        if meta:
            model = meta[META_ID].get("embedding_model")
            if model != info.model:
                raise EmbeddingMismatch(f"{self.label} was written with embedding model {model!r}, but the configured"
                                        f" model is {info.model!r}; migrate with re-embedding")
        else:
            await self._upsert_if(self._meta_c, [qe.Point(id=META_ID, vector={}, payload={
                "embedding_model": info.model, "embedding_dim": info.dimension})], None)
        for kind, fields in _INDEXED.items():
            for f in fields:
                await self._call(self._shard(self._c[kind]).update,
                                 qe.UpdateOperation.create_field_index(f, qe.PayloadSchemaType.Keyword))

    async def close(self) -> None:
        if self._executor is None:
            return

        def shut() -> None:
            for s in self._shards.values():
                s.flush()
                s.close()

        await self._call(shut)
        self._shards.clear()
        executor, self._executor = self._executor, None
        executor.shutdown(wait=True)

    # --- the primitives the Qdrant driver's rules are written on -------------------------------------------------
    async def _upsert_if(self, collection: str, points: list[Any], bound: Any) -> None:
        await self._call(self._shard(collection).update, self._qe.UpdateOperation.upsert_points(points, bound))

    async def _payloads(self, collection: str, ids: list[Any]) -> dict[str, Payload]:
        found = await self._call(self._shard(collection).retrieve, list(ids), True, False)
        return {str(p.id): dict(p.payload or {}) for p in found}

    async def _scroll_edge(self, collection: str, flt: Any, with_vector: bool = False) -> list[Any]:
        out: list[Any] = []
        offset = None
        while True:
            request = self._qe.ScrollRequest(offset=offset, limit=_SCROLL, filter=flt, with_payload=True,
                                             with_vector=with_vector)
            points, offset = await self._call(self._shard(collection).scroll, request)
            out += points
            if offset is None:
                return out

    # --- the driver -------------------------------------------------------------------------------------------
    async def put(self, kind: Kind, rows: Sequence[tuple[str, Payload]]) -> None:
        await super().put(kind, [(i, {**pl, "deleted_n": int(pl["deleted"])}) for i, pl in rows])

    async def get(self, kind: Kind, ids: Sequence[str]) -> list[Payload]:
        return list((await self._payloads(self._c[kind], list(ids))).values()) if ids else []

    async def find(self, kind: Kind, where: Where) -> list[Payload]:
        return [dict(p.payload or {}) for p in await self._scroll_edge(self._c[kind], _filter(where, self._m))]

    async def remove(self, kind: Kind, where: Where | None = None, ids: Sequence[str] = ()) -> None:
        op = self._qe.UpdateOperation
        if ids:
            await self._call(self._shard(self._c[kind]).update, op.delete_points(list(ids)))
        if where is not None:
            await self._call(self._shard(self._c[kind]).update, op.delete_points_by_filter(_filter(where, self._m)))

    async def count(self, kind: Kind, where: Where) -> int:
        request = self._qe.CountRequest(exact=True, filter=_filter(where, self._m))
        return int(await self._call(self._shard(self._c[kind]).count, request))

    async def set_vectors(self, rows: Sequence[tuple[str, str, Vector]]) -> None:
        held = await self._payloads(self._c[Kind.ENTITY], [i for i, _, _ in rows])  # one writer: no race
        points = [self._qe.Point(id=i, vector={VECTOR: np.asarray(v, dtype=np.float32).tolist()},
                                 payload={**held[i], "vector_text": text}) for i, text, v in rows if i in held]
        if points:
            await self._upsert_if(self._c[Kind.ENTITY], points, None)

    async def drop_vectors(self, ids: Sequence[str]) -> None:
        await self._call(self._shard(self._c[Kind.ENTITY]).update,
                         self._qe.UpdateOperation.delete_vectors(list(ids), [VECTOR]))

    async def with_vectors(self, ids: Sequence[str] | None, where: Where | None) -> list[tuple[Payload, Vector | None]]:
        if ids is not None:
            found = await self._call(self._shard(self._c[Kind.ENTITY]).retrieve, list(ids), True, True) if ids else []
        else:
            found = await self._scroll_edge(self._c[Kind.ENTITY], _filter(where or Where(), self._m), True)
        out: list[tuple[Payload, Vector | None]] = []
        for p in found:
            vector = (p.vector or {}).get(VECTOR) if isinstance(p.vector, dict) else None
            out.append((dict(p.payload or {}), np.asarray(vector, dtype=np.float32) if vector else None))
        return out

    async def nearest(self, vector: Vector, where: Where, limit: int,
                      min_score: float | None) -> list[tuple[Payload, float]]:
        qe = self._qe
        request = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(np.asarray(vector, np.float32).tolist(),
                                                                         using=VECTOR),
                                  filter=_filter(where, self._m), with_payload=True, score_threshold=min_score)
        return [(dict(p.payload or {}), float(p.score))
                for p in await self._call(self._shard(self._c[Kind.ENTITY]).query, request)]

    async def scopes(self) -> list[str]:
        return sorted(p.payload["scope"] for p in await self._scroll_edge(self._scopes_c, None))

    async def add_scopes(self, scopes: set[str]) -> None:
        await self._upsert_if(self._scopes_c, [self._qe.Point(id=scope_id(s), vector={}, payload={"scope": s})
                                               for s in sorted(scopes)], None)


class QdrantEdgeBackend(PointsBackend):
    def __init__(self, spec: StoreSpec | str, embedder: Embedder, max_pending_texts: int = 128) -> None:
        super().__init__(EdgePoints(spec), embedder, max_pending_texts)
