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

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
from qdrant_client import AsyncQdrantClient, models

from adapters.embedder import Embedder, EmbeddingInfo, Vector
from adapters.errors import EmbeddingMismatch, StoreUnavailable
from adapters.points import META_ID, Payload, PointsBackend, Where, matches, point_id, scope_id
from adapters.records import Kind
from adapters.specs import StoreSpec, parse

__all__ = ["VECTOR", "QdrantBackend", "parse_spec", "point_id", "vector_collection"]

VECTOR = "text"
_SCROLL = 1024


def _ids(ids: list[str]) -> models.PointIdsList:
    return models.PointIdsList(points=list[models.ExtendedPointId](ids))


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


def parse_spec(spec: StoreSpec | str) -> dict[str, Any]:
    """Client arguments and collection prefix from a `qdrant+local:///path` or `qdrant[s]://host:port` spec."""
    spec = parse(spec) if isinstance(spec, str) else spec
    prefix = spec.options.get("prefix", "memshift")
    if spec.local:
        args: dict[str, Any] = {"location": ":memory:"} if spec.path == ":memory:" else {"path": spec.path}
    else:
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        args = {"url": f"{'https' if spec.scheme == 'qdrants' else 'http'}://{host}:{spec.port or 6333}",
                "api_key": spec.secret.read() or None}
    return {"client": args, "prefix": prefix}


# The filter and point classes: the client's (`models`) or Qdrant Edge's, which mirror them (adapters.qdrant_edge).
CLIENT = SimpleNamespace(Filter=models.Filter, FieldCondition=models.FieldCondition, MatchValue=models.MatchValue,
                         MatchAny=models.MatchAny, Range=models.Range, Point=models.PointStruct)


def _filter(w: Where, m: Any = CLIENT) -> Any:
    must: list[Any] = [m.FieldCondition(key=k, match=m.MatchAny(any=v) if isinstance(v, list) else m.MatchValue(
        value=v)) for k, v in w.equal.items()]
    if w.version_below is not None:
        must.append(_below(w.version_below, m=m))
    should: list[Any] = [m.FieldCondition(key=k, match=m.MatchValue(value=v)) for k, v in w.any_of.items()]
    return m.Filter(must=must, should=should or None)


_OWNERS = {Kind.OBSERVATION: ("entity",), Kind.RELATION: ("source", "target")}


class _ChildIndex:
    """Local mode only: every observation and relation point, by the entity it hangs from, in memory.

    The client's local mode has no payload indexes: a filtered scroll or delete tests every point, so finding one
    batch's observations cost time in proportion to the whole collection (a 20,000-entity backfill slowed tenfold
    from its first pages to its last). One process owns a local path, so this index, built at open and kept by the
    writes, is exact; it answers every lookup by entity and leaves the database only reads and writes by id.
    """

    def __init__(self) -> None:
        self._by_owner: dict[Kind, dict[tuple[str, str], dict[str, Payload]]] = {k: {} for k in _OWNERS}
        self._where: dict[Kind, dict[str, Payload]] = {k: {} for k in _OWNERS}

    @staticmethod
    def owners(kind: Kind, p: Payload) -> set[tuple[str, str]]:
        return {(p["scope"], p[f]) for f in _OWNERS[kind]}

    def add(self, kind: Kind, point: str, p: Payload) -> None:
        self.drop(kind, [point])
        self._where[kind][point] = p
        for owner in self.owners(kind, p):
            self._by_owner[kind].setdefault(owner, {})[point] = p

    def drop(self, kind: Kind, points: Sequence[str]) -> None:
        for point in points:
            old = self._where[kind].pop(point, None)
            if old is not None:
                for owner in self.owners(kind, old):
                    held = self._by_owner[kind][owner]
                    del held[point]
                    if not held:
                        del self._by_owner[kind][owner]

    def lookup(self, kind: Kind, w: Where) -> dict[str, Payload]:
        """The points matching `w`: through the owners it names, else (a rare whole-collection filter) all."""
        scope = w.equal.get("scope")
        names: set[str] = set()
        for f in _OWNERS[kind]:
            for source in (w.equal, w.any_of):
                value = source.get(f)
                names |= set(value) if isinstance(value, list) else {value} if value is not None else set()
        if isinstance(scope, str) and names:
            found: dict[str, Payload] = {}
            for name in names:
                found.update(self._by_owner[kind].get((scope, name), {}))
        else:
            found = self._where[kind]
        # lists become sets once here: a walk over every entity names them all, and membership in a list per point
        # would make it quadratic
        w = Where({k: frozenset(v) if isinstance(v, list) else v for k, v in w.equal.items()}, w.version_below,
                  w.any_of)
        return {i: p for i, p in found.items() if matches(p, w)}


CONDITIONAL_SINCE = (1, 16)  # the first Qdrant server whose upserts take an `update_filter`


# Qdrant compares ranges as 64-bit floats, exact only up to 2**53; versions are 63-bit integers, and two written in
# the same millisecond differ only in their low bits. So every point also carries its version in two halves that a
# float holds exactly, and "below V" is decided on them: high half below, or equal and low half below.
_LOW_BITS = 26


def _halves(payload: Payload) -> dict[str, int]:
    """The exact halves of a payload's version (and an entity's purge point)."""
    return {f"{f}_{half}": value for f in ("version", "purged") if isinstance(payload.get(f), int)
            for half, value in (("hi", payload[f] >> _LOW_BITS), ("lo", payload[f] & ((1 << _LOW_BITS) - 1)))}


def _below(value: int, field: str = "version", m: Any = CLIENT) -> Any:
    hi, lo = value >> _LOW_BITS, value & ((1 << _LOW_BITS) - 1)
    return m.Filter(should=[
        m.FieldCondition(key=f"{field}_hi", range=m.Range(lt=hi)),
        m.Filter(must=[m.FieldCondition(key=f"{field}_hi", match=m.MatchValue(value=hi)),
                       m.FieldCondition(key=f"{field}_lo", range=m.Range(lt=lo))])])


def _server_version(text: str) -> tuple[int, int]:
    try:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


class QdrantPoints:
    """adapters.points' driver for Qdrant.

    Every record write is conditional in Qdrant itself (`update_filter`: only where the stored version is lower),
    so any number of proxies can share one server (1.16 or later) and none overwrites a newer record with an older
    one. Local mode takes the same conditional writes (the client implements them), though its one writer never
    needs them."""

    def __init__(self, spec: StoreSpec | str) -> None:
        parsed = parse_spec(spec)
        self._client_args: dict[str, Any] = parsed["client"]
        p = parsed["prefix"]
        self._c = {Kind.ENTITY: f"{p}_entities", Kind.OBSERVATION: f"{p}_observations",
                   Kind.RELATION: f"{p}_relations"}
        self._scopes_c, self._meta_c = f"{p}_scopes", f"{p}_meta"
        where = self._client_args.get("path") or self._client_args.get("url") or ":memory:"
        self.label = f"qdrant:{where}/{p}"
        self._client: AsyncQdrantClient | None = None
        self._index = _ChildIndex() if "url" not in self._client_args else None  # a server indexes its payloads
        self._m: Any = CLIENT
        self.conditional = True
        self._too_old = ""  # a server without conditional writes: its version, for the fleet's refusal

    @property
    def _q(self) -> AsyncQdrantClient:
        if self._client is None:
            raise StoreUnavailable(f"{self.label} is not open")
        return self._client

    def fleet_problem(self) -> str | None:
        if self._index is not None:
            return (f"{self.label} is Qdrant's local mode: files one process owns, so one proxy, not a fleet; "
                    f"give the fleet a Qdrant server ({'.'.join(map(str, CONDITIONAL_SINCE))} or later)")
        if self._too_old:
            return (f"{self.label} is Qdrant {self._too_old}, older than {'.'.join(map(str, CONDITIONAL_SINCE))}:"
                    " it has no conditional writes, so proxies sharing it could overwrite a newer record with an"
                    " older one; upgrade it, or run a single proxy")
        return None

    async def open(self, info: EmbeddingInfo) -> None:
        self._client = AsyncQdrantClient(**self._client_args)
        existing = await vector_collection(self._client, self._c[Kind.ENTITY], info.dimension, self.label)
        if self._index is None:
            version = (await self._client.info()).version
            if _server_version(version) < CONDITIONAL_SINCE:
                self._too_old, self.conditional = version, False
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
        await self._add_version_halves()
        if self._index is not None:
            for kind in _OWNERS:
                for point in await self._scroll(self._c[kind], None):
                    self._index.add(kind, str(point.id), point.payload or {})
        else:  # a server filters through payload indexes: the fields every lookup names
            for kind, fields in {Kind.ENTITY: ("scope", "name"), Kind.OBSERVATION: ("scope", "entity"),
                                 Kind.RELATION: ("scope", "source", "target")}.items():
                for f in fields:
                    await self._client.create_payload_index(self._c[kind], f, models.PayloadSchemaType.KEYWORD)

    async def _add_version_halves(self) -> None:
        """Points written before versions (and purge points) were also stored in halves get them (once)."""
        lacking = models.Filter(must=[models.IsEmptyCondition(is_empty=models.PayloadField(key="version_hi"))])
        for kind in Kind:
            for point in await self._scroll(self._c[kind], lacking):
                if halves := _halves(point.payload or {}):
                    await self._q.set_payload(self._c[kind], halves, _ids([str(point.id)]))

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def _scroll(self, collection: str, flt: models.Filter | None,
                      with_vectors: bool = False) -> list[models.Record]:
        out: list[models.Record] = []
        offset = None
        while True:
            # Local mode tests every point against the filter on each call, so pages would cost O(n) each: it
            # is asked for everything at once (it holds it all in memory anyway).
            limit = _SCROLL if self._index is None else 1 << 30
            points, offset = await self._q.scroll(collection, scroll_filter=flt, limit=limit, offset=offset,
                                                  with_payload=True, with_vectors=with_vectors)
            out += points
            if offset is None:
                return out

    async def get(self, kind: Kind, ids: Sequence[str]) -> list[Payload]:
        return [p.payload or {} for p in await self._q.retrieve(self._c[kind], list(ids), with_payload=True)]

    async def find(self, kind: Kind, where: Where) -> list[Payload]:
        if self._index is not None and kind in _OWNERS:
            return list(self._index.lookup(kind, where).values())
        return [p.payload or {} for p in await self._scroll(self._c[kind], _filter(where))]

    async def put(self, kind: Kind, rows: Sequence[tuple[str, Payload]]) -> None:
        rows = [(i, {**pl, **_halves(pl)}) for i, pl in rows]
        points = [self._m.Point(id=i, vector={}, payload=pl) for i, pl in rows]
        if not self.conditional:
            await self._upsert_if(self._c[kind], points, None)
            held = dict(rows)
        else:
            held = await self._put_if_newer(self._c[kind], points)
        if self._index is not None and kind in _OWNERS:
            for i, pl in held.items():
                self._index.add(kind, i, pl)

    async def _upsert_if(self, collection: str, points: list[Any], bound: Any) -> None:
        await self._q.upsert(collection, points, update_filter=bound)

    async def _payloads(self, collection: str, ids: list[Any]) -> dict[str, Payload]:
        return {str(p.id): p.payload or {} for p in await self._q.retrieve(collection, ids, with_payload=True)}

    async def _put_if_newer(self, collection: str, points: list[Any]) -> dict[str, Payload]:
        """Write each point only over an older one, checked by Qdrant; returns what the points hold afterwards.

        A filter is one bound for a whole call, so the batch goes in one call bounded by its lowest version (and,
        for entities, its lowest purge point). Read back, a point still behind is settled alone: below its own
        version it is written bounded by that version; an entity holding a lower purge point gets the newer record
        with the higher purge point, set on exactly the state read (purge points merge by max whatever the
        version). Each round is lost only to another writer's write, so a few rounds settle it."""
        m = self._m
        floor = min((p.payload or {})["version"] for p in points)
        bound = _below(floor, m=m)
        if "purged" in (points[0].payload or {}):  # entities: nor over a higher purge point (merged below)
            bound = m.Filter(must=[bound, _below(min((p.payload or {})["purged"] for p in points) + 1, "purged", m)])
        await self._upsert_if(collection, points, bound)
        held = await self._payloads(collection, [p.id for p in points])
        for p in points:
            mine = p.payload or {}
            for _ in range(8):
                now = held.get(str(p.id))
                newer = now is None or now["version"] < mine["version"]
                if "purged" in mine and now is not None and (newer or now["purged"] < mine["purged"]):
                    merged = {**(mine if newer else now), "purged": max(now["purged"], mine["purged"])}
                    point = m.Point(id=p.id, vector={}, payload={**merged, **_halves(merged)})
                    bound = m.Filter(must=[m.FieldCondition(key=k, match=m.MatchValue(value=now[k]))
                                           for k in ("version", "purged")])
                elif newer:
                    point, bound = p, _below(mine["version"], m=m)
                else:
                    break
                await self._upsert_if(collection, [point], bound)
                held.update(await self._payloads(collection, [p.id]))
        return held

    async def remove(self, kind: Kind, where: Where | None = None, ids: Sequence[str] = ()) -> None:
        if self._index is not None and kind in _OWNERS:
            gone = list(ids) + (list(self._index.lookup(kind, where)) if where is not None else [])
            if gone:
                await self._q.delete(self._c[kind], _ids(gone))
                self._index.drop(kind, gone)
            return
        if ids:
            await self._q.delete(self._c[kind], _ids(list(ids)))
        if where is not None:
            await self._q.delete(self._c[kind], models.FilterSelector(filter=_filter(where)))

    async def count(self, kind: Kind, where: Where) -> int:
        return (await self._q.count(self._c[kind], count_filter=_filter(where), exact=True)).count

    async def set_vectors(self, rows: Sequence[tuple[str, str, Vector]]) -> None:
        # One whole-point write each (payload read back by id, cheap): updating the vector and the payload apart
        # costs local mode two commits per point, and its commits are most of what a write costs it.
        held = {str(p.id): p.payload or {} for p in await self._q.retrieve(
            self._c[Kind.ENTITY], [i for i, _, _ in rows], with_payload=True)}
        points = [models.PointStruct(id=i, vector={VECTOR: np.asarray(v, dtype=np.float32).tolist()},
                                     payload={**held[i], "vector_text": text}) for i, text, v in rows if i in held]
        if self._index is not None:  # local mode: this store object is the only writer
            await self._q.upsert(self._c[Kind.ENTITY], points)
            return
        # A server may be shared: write each only onto the entity version it was read from (one call a version).
        by_version: dict[int, list[models.PointStruct]] = {}
        for p in points:
            by_version.setdefault((p.payload or {})["version"], []).append(p)
        for version, group in by_version.items():
            await self._q.upsert(self._c[Kind.ENTITY], group, update_filter=models.Filter(must=[
                models.FieldCondition(key="version", match=models.MatchValue(value=version))]))

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
    def __init__(self, spec: StoreSpec | str, embedder: Embedder, max_pending_texts: int = 128) -> None:
        super().__init__(QdrantPoints(spec), embedder, max_pending_texts)
