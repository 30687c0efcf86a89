"""Qdrant: the memory store as points (adapters.points) in five collections, through the official
`AsyncQdrantClient`.

- `qdrant+local:///path` (or `qdrant+local:///:memory:`) runs the client's local mode in-process; `qdrant://host:6333`
  (`qdrants://` for TLS, `?api_key_file=` or $QDRANT_API_KEY) talks to a server. The same code serves both.
- `<prefix>_entities` carries the vectors (named vector `text`, cosine; its size is checked against the embedder's),
  `_observations` and `_relations` are payload-only points, `_scopes` lists the scopes, `_meta` the model.
- Local mode has one writer: the store object that opened the path (one proxy). See adapters.points for how
  apply-if-newer holds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from qdrant_client import AsyncQdrantClient, models

from adapters.embedder import Embedder, EmbeddingInfo, Vector
from adapters.model import EmbeddingMismatch, StoreUnavailable
from adapters.points import META_ID, Payload, PointsBackend, Where, point_id, scope_id
from adapters.records import Kind

__all__ = ["VECTOR", "QdrantBackend", "parse_spec", "point_id", "vector_collection"]

VECTOR = "text"
_SCROLL = 1024


def _ids(ids: list[str]) -> models.PointIdsList:
    return models.PointIdsList(points=list[models.ExtendedPointId](ids))


def _match(**fields: Any) -> models.Filter:
    return models.Filter(must=[models.FieldCondition(key=k, match=models.MatchAny(any=v) if isinstance(v, list)
                                                     else models.MatchValue(value=v)) for k, v in fields.items()])


async def vector_collection(client: AsyncQdrantClient, name: str, dim: int, label: str) -> set[str]:
    """Create collection `name` with the cosine vector `text` of size `dim`, or check the size of the existing one;
    returns the names of the collections that existed."""
    try:
        existing = {c.name for c in (await client.get_collections()).collections}
    except Exception as exc:
        raise StoreUnavailable(f"{label}: cannot reach Qdrant: {exc}") from exc
    if name in existing:
        params = (await client.get_collection(name)).config.params.vectors
        size = params[VECTOR].size if isinstance(params, dict) else None
        if size != dim:
            raise EmbeddingMismatch(f"{label}: collection {name} holds vectors of size {size}, but the configured"
                                    f" model has dimension {dim}")
    else:
        await client.create_collection(name, vectors_config={
            VECTOR: models.VectorParams(size=dim, distance=models.Distance.COSINE)})
    return existing


def parse_spec(spec: str) -> dict[str, Any]:
    """Client arguments and collection prefix from a `qdrant+local:///path` or `qdrant[s]://host:port` spec."""
    parts = urlsplit(spec)
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", "memshift")
    if parts.scheme == "qdrant+local":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        args: dict[str, Any] = {"location": ":memory:"} if path in ("", ":memory:") else {"path": path}
    else:
        key = query.pop("api_key", None) or os.environ.get("QDRANT_API_KEY")
        if key_file := query.pop("api_key_file", None):
            with open(key_file, encoding="utf-8") as f:
                key = f.read().strip()
        args = {"url": f"{'https' if parts.scheme == 'qdrants' else 'http'}://{parts.hostname}:{parts.port or 6333}",
                "api_key": key}
    return {"client": args, "prefix": prefix}


def _filter(w: Where) -> models.Filter:
    must: list[models.Condition] = [models.FieldCondition(
        key=k, match=models.MatchAny(any=v) if isinstance(v, list) else models.MatchValue(value=v))
        for k, v in w.equal.items()]
    if w.version_below is not None:
        must.append(models.FieldCondition(key="version", range=models.Range(lt=w.version_below)))
    should: list[models.Condition] = [models.FieldCondition(key=k, match=models.MatchValue(value=v))
                                      for k, v in w.any_of.items()]
    return models.Filter(must=must, should=should or None)


class QdrantPoints:
    """adapters.points' driver for Qdrant."""

    conditional = False

    def __init__(self, spec: str) -> None:
        parsed = parse_spec(spec)
        self._client_args: dict[str, Any] = parsed["client"]
        p = parsed["prefix"]
        self._c = {Kind.ENTITY: f"{p}_entities", Kind.OBSERVATION: f"{p}_observations",
                   Kind.RELATION: f"{p}_relations"}
        self._scopes_c, self._meta_c = f"{p}_scopes", f"{p}_meta"
        where = self._client_args.get("path") or self._client_args.get("url") or ":memory:"
        self.label = f"qdrant:{where}/{p}"
        self._client: AsyncQdrantClient | None = None

    @property
    def _q(self) -> AsyncQdrantClient:
        if self._client is None:
            raise StoreUnavailable(f"{self.label} is not open")
        return self._client

    async def open(self, info: EmbeddingInfo) -> None:
        self._client = AsyncQdrantClient(**self._client_args)
        existing = await vector_collection(self._client, self._c[Kind.ENTITY], info.dimension, self.label)
        for name in (self._c[Kind.OBSERVATION], self._c[Kind.RELATION], self._scopes_c, self._meta_c):
            if name not in existing:
                await self._client.create_collection(name, vectors_config={})
        found = await self._client.retrieve(self._meta_c, [META_ID], with_payload=True)
        if found:
            model = (found[0].payload or {}).get("embedding_model")
            if model != info.model:
                raise EmbeddingMismatch(f"{self.label} was written with embedding model {model!r}, but the configured"
                                        f" model is {info.model!r}; migrate with re-embedding")
        else:
            await self._client.upsert(self._meta_c, [models.PointStruct(id=META_ID, vector={}, payload={
                "embedding_model": info.model, "embedding_dim": info.dimension})])

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def _scroll(self, collection: str, flt: models.Filter | None,
                      with_vectors: bool = False) -> list[models.Record]:
        out: list[models.Record] = []
        offset = None
        while True:
            points, offset = await self._q.scroll(collection, scroll_filter=flt, limit=_SCROLL, offset=offset,
                                                  with_payload=True, with_vectors=with_vectors)
            out += points
            if offset is None:
                return out

    async def get(self, kind: Kind, ids: Sequence[str]) -> list[Payload]:
        return [p.payload or {} for p in await self._q.retrieve(self._c[kind], list(ids), with_payload=True)]

    async def find(self, kind: Kind, where: Where) -> list[Payload]:
        return [p.payload or {} for p in await self._scroll(self._c[kind], _filter(where))]

    async def put(self, kind: Kind, rows: Sequence[tuple[str, Payload]]) -> None:
        await self._q.upsert(self._c[kind], [models.PointStruct(id=i, vector={}, payload=pl) for i, pl in rows])

    async def remove(self, kind: Kind, where: Where | None = None, ids: Sequence[str] = ()) -> None:
        if ids:
            await self._q.delete(self._c[kind], _ids(list(ids)))
        if where is not None:
            await self._q.delete(self._c[kind], models.FilterSelector(filter=_filter(where)))

    async def count(self, kind: Kind, where: Where) -> int:
        return (await self._q.count(self._c[kind], count_filter=_filter(where), exact=True)).count

    async def set_vectors(self, rows: Sequence[tuple[str, str, Vector]]) -> None:
        await self._q.update_vectors(self._c[Kind.ENTITY], [models.PointVectors(
            id=i, vector={VECTOR: np.asarray(v, dtype=np.float32).tolist()}) for i, _, v in rows])
        await self._q.batch_update_points(self._c[Kind.ENTITY], [  # one call, not one per entity
            models.SetPayloadOperation(set_payload=models.SetPayload(payload={"vector_text": text}, points=[i]))
            for i, text, _ in rows])

    async def drop_vectors(self, ids: Sequence[str]) -> None:
        await self._q.delete_vectors(self._c[Kind.ENTITY], [VECTOR], points=_ids(list(ids)))

    async def with_vectors(self, ids: Sequence[str] | None, where: Where | None) -> list[tuple[Payload, Vector | None]]:
        if ids is not None:
            found = await self._q.retrieve(self._c[Kind.ENTITY], list(ids), with_payload=True, with_vectors=True)
        else:
            found = await self._scroll(self._c[Kind.ENTITY], _filter(where or Where()), with_vectors=True)
        return [(p.payload or {}, np.asarray(p.vector[VECTOR], dtype=np.float32)
                 if isinstance(p.vector, dict) and VECTOR in p.vector else None) for p in found]

    async def nearest(self, vector: Vector, where: Where, limit: int,
                      min_score: float | None) -> list[tuple[Payload, float]]:
        found = await self._q.query_points(self._c[Kind.ENTITY], query=np.asarray(vector, np.float32).tolist(),
                                           using=VECTOR, query_filter=_filter(where), limit=limit,
                                           with_payload=True, score_threshold=min_score)
        return [(p.payload or {}, float(p.score)) for p in found.points]

    async def scopes(self) -> list[str]:
        return sorted((p.payload or {})["scope"] for p in await self._scroll(self._scopes_c, None))

    async def add_scopes(self, scopes: set[str]) -> None:
        await self._q.upsert(self._scopes_c, [models.PointStruct(id=scope_id(s), vector={}, payload={"scope": s})
                                              for s in scopes])


class QdrantBackend(PointsBackend):
    def __init__(self, spec: str, embedder: Embedder, max_pending_texts: int = 128) -> None:
        super().__init__(QdrantPoints(spec), embedder, max_pending_texts)
