"""Qdrant: the memory store as points in four collections, through the official `AsyncQdrantClient`.

- `qdrant+local:///path` (or `qdrant+local:///:memory:`) runs the client's local mode in-process; `qdrant://host:6333`
  (`qdrants://` for TLS, `?api_key_file=` or $QDRANT_API_KEY) talks to a server. The same code serves both.
- Point ids are deterministic: uuid5 of kind, scope and key, so the same record lands on the same point anywhere.
- `entities` carries the vectors (named vector `text`, cosine; its size is checked against the embedder's),
  `observations` and `relations` are payload-only points, so graph reads work without another store; `scopes`
  lists the scopes, which lets `list_records` walk keys in order one scope at a time.
- Qdrant has no conditional writes. Apply-if-newer holds because every write is a read-decide-write under this
  store's write lock: the records a batch touches (and their entities' purge points) are read, the rules decide
  (the same rules as every store: newer version wins, purge points merge by max, children older than a purge point
  are deleted or never written), and only the winners are written. One store object is the only writer of its
  collections — true for local mode (one client per path) and for a single proxy; a fleet sharing one Qdrant server
  serialises writers per scope through the control store's lease (docs/design.md, Fleet) before this guarantee extends
  to it. `tests/test_convergence.py` checks convergence for every interleaving against this store too.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from qdrant_client import AsyncQdrantClient, models

from adapters import semantics
from adapters.base import VectorMap, WriteResult
from adapters.embedder import Embedder, EmbeddingInfo, Vector
from adapters.embedding_queue import PendingEmbeddings
from adapters.export import ExportInParts
from adapters.model import (
    EmbeddingMismatch,
    Entity,
    Graph,
    GraphPage,
    Relation,
    ScoredEntity,
    SearchResult,
    StoreUnavailable,
)
from adapters.planned import Plan, PlannedWrites
from adapters.records import (
    Counts,
    EntityRecord,
    Kind,
    ObservationRecord,
    Record,
    RecordKey,
    RecordPage,
    RelationRecord,
    decode_cursor,
    embedding_text,
    encode_cursor,
    text_hash,
)

T = TypeVar("T")
_NS = uuid.UUID("6f1c4a52-9d7e-4f0b-8a38-2b5e0c9d1e47")
VECTOR = "text"
_SCROLL = 1024


def point_id(key: RecordKey) -> str:
    kind, scope, parts = key
    return str(uuid.uuid5(_NS, "\x1f".join([str(int(kind)), scope, *parts])))


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


def _record(kind: Kind, p: dict[str, Any]) -> Record:
    if kind == Kind.ENTITY:
        return EntityRecord(p["scope"], p["name"], p["entity_type"], p["version"], p["created"], p["purged"],
                            p["deleted"], dict(p["metadata"]))
    if kind == Kind.OBSERVATION:
        return ObservationRecord(p["scope"], p["entity"], p["text"], p["version"], p["created"], p["deleted"])
    return RelationRecord(p["scope"], p["source"], p["relation_type"], p["target"], p["version"], p["deleted"],
                          dict(p["metadata"]))


def _payload(r: Record) -> dict[str, Any]:
    if isinstance(r, EntityRecord):
        return {"scope": r.scope, "name": r.name, "entity_type": r.entity_type, "metadata": dict(r.metadata),
                "version": r.version, "created": r.created, "purged": r.purged, "deleted": r.deleted}
    if isinstance(r, ObservationRecord):
        return {"scope": r.scope, "entity": r.entity, "text": r.text, "version": r.version, "created": r.created,
                "deleted": r.deleted}
    return {"scope": r.scope, "source": r.source, "relation_type": r.relation_type, "target": r.target,
            "metadata": dict(r.metadata), "version": r.version, "deleted": r.deleted}


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


class QdrantBackend(PlannedWrites, ExportInParts):
    def __init__(self, spec: str, embedder: Embedder, max_pending_texts: int = 128) -> None:
        parsed = parse_spec(spec)
        self._client_args: dict[str, Any] = parsed["client"]
        p = parsed["prefix"]
        self._c = {Kind.ENTITY: f"{p}_entities", Kind.OBSERVATION: f"{p}_observations",
                   Kind.RELATION: f"{p}_relations"}
        self._scopes_c, self._meta_c = f"{p}_scopes", f"{p}_meta"
        where = self._client_args.get("path") or self._client_args.get("url") or ":memory:"
        self._label = f"qdrant:{where}/{p}"
        self._embedder = embedder
        self._client: AsyncQdrantClient | None = None
        self._lock = asyncio.Lock()  # the single writer: read-decide-write stays atomic
        self._embeddings = PendingEmbeddings(embedder, self._store_vectors, max_pending_texts)

    @property
    def name(self) -> str:
        return self._label

    @property
    def embedding(self) -> EmbeddingInfo:
        return self._embedder.info

    @property
    def _q(self) -> AsyncQdrantClient:
        if self._client is None:
            raise StoreUnavailable(f"{self.name} is not open")
        return self._client

    # --- lifecycle -------------------------------------------------------------------------------------------------
    async def open(self) -> None:
        self._client = AsyncQdrantClient(**self._client_args)
        existing = await vector_collection(self._client, self._c[Kind.ENTITY], self.embedding.dimension, self.name)
        dim = self.embedding.dimension
        for name in (self._c[Kind.OBSERVATION], self._c[Kind.RELATION], self._scopes_c, self._meta_c):
            if name not in existing:
                await self._client.create_collection(name, vectors_config={})
        meta_id = str(uuid.uuid5(_NS, "meta"))
        found = await self._client.retrieve(self._meta_c, [meta_id], with_payload=True)
        if found:
            model = (found[0].payload or {}).get("embedding_model")
            if model != self.embedding.model:
                raise EmbeddingMismatch(f"{self.name} was written with embedding model {model!r}, but the configured"
                                        f" model is {self.embedding.model!r}; migrate with re-embedding")
        else:
            await self._client.upsert(self._meta_c, [models.PointStruct(id=meta_id, vector={}, payload={
                "embedding_model": self.embedding.model, "embedding_dim": dim})])
        await self.embed_stale()

    async def close(self) -> None:
        await self._embeddings.settled()
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    # --- plumbing --------------------------------------------------------------------------------------------------
    async def _scroll(self, kind: Kind | str, flt: models.Filter | None,
                      with_vectors: bool = False) -> list[models.Record]:
        collection = self._c[kind] if isinstance(kind, Kind) else kind
        out: list[models.Record] = []
        offset = None
        while True:
            points, offset = await self._q.scroll(collection, scroll_filter=flt, limit=_SCROLL, offset=offset,
                                                  with_payload=True, with_vectors=with_vectors)
            out += points
            if offset is None:
                return out

    async def _fetch(self, keys: Sequence[RecordKey]) -> dict[RecordKey, Record]:
        out: dict[RecordKey, Record] = {}
        for kind in Kind:
            ids = [point_id(k) for k in dict.fromkeys(keys) if k[0] == kind]
            if ids:
                for p in await self._q.retrieve(self._c[kind], ids, with_payload=True):
                    rec = _record(kind, p.payload or {})
                    out[rec.key] = rec
        return out

    async def _upsert(self, records: list[Record]) -> None:
        for kind in Kind:
            points = [models.PointStruct(id=point_id(r.key), vector={}, payload=_payload(r))
                      for r in records if r.key[0] == kind]
            if points:
                await self._q.upsert(self._c[kind], points)
        scopes = {r.scope for r in records}
        if scopes:
            await self._q.upsert(self._scopes_c, [models.PointStruct(
                id=str(uuid.uuid5(_NS, "scope\x1f" + s)), vector={}, payload={"scope": s}) for s in scopes])

    async def _apply_records(self, records: Sequence[Record]) -> semantics.ApplyPlan:
        """Apply-if-newer for a batch, under the write lock (see the module docstring)."""
        plan = semantics.plan_apply(records, await self._fetch(semantics.apply_keys(records)))
        await self._upsert(plan.writes)
        for scope, name, purged in plan.purges:
            older = models.FieldCondition(key="version", range=models.Range(lt=purged))
            at = models.FieldCondition(key="scope", match=models.MatchValue(value=scope))
            await self._q.delete(self._c[Kind.OBSERVATION], models.FilterSelector(filter=models.Filter(must=[
                at, older, models.FieldCondition(key="entity", match=models.MatchValue(value=name))])))
            await self._q.delete(self._c[Kind.RELATION], models.FilterSelector(filter=models.Filter(
                must=[at, older], should=[models.FieldCondition(key="source", match=models.MatchValue(value=name)),
                                          models.FieldCondition(key="target", match=models.MatchValue(value=name))])))
        return plan

    async def _texts(self, keys: set[tuple[str, str]] | list[tuple[str, str]],
                     childless_only: bool = False) -> dict[tuple[str, str], str]:
        """The embedding text of each live entity among `keys`."""
        out: dict[tuple[str, str], str] = {}
        by_scope: dict[str, list[str]] = {}
        for scope, name in keys:
            by_scope.setdefault(scope, []).append(name)
        for scope, names in by_scope.items():
            ents = await self._q.retrieve(self._c[Kind.ENTITY], [point_id(semantics.entity_key(scope, n))
                                                                  for n in names], with_payload=True)
            obs: dict[str, list[tuple[int, str]]] = {}
            for p in await self._scroll(Kind.OBSERVATION, _match(scope=scope, entity=list(names), deleted=False)):
                pl = p.payload or {}
                obs.setdefault(pl["entity"], []).append((pl["created"], pl["text"]))
            for p in ents:
                pl = p.payload or {}
                if pl["deleted"] or (childless_only and obs.get(pl["name"])):
                    continue
                texts = tuple(t for _, t in sorted(obs.get(pl["name"], [])))
                out[(scope, pl["name"])] = embedding_text(pl["name"], pl["entity_type"], texts)
        return out

    async def _store_vectors(self, ready: dict[tuple[str, str], tuple[str, Vector]]) -> None:
        async with self._lock:
            current = await self._texts(list(ready))
            keep = {k: v for k, v in ready.items() if current.get(k) == v[0]}  # a newer write embeds its own text
            if not keep:
                return
            ids = {k: point_id(semantics.entity_key(*k)) for k in keep}
            await self._q.update_vectors(self._c[Kind.ENTITY], [models.PointVectors(
                id=ids[k], vector={VECTOR: np.asarray(v, dtype=np.float32).tolist()}) for k, (_, v) in keep.items()])
            await self._q.batch_update_points(self._c[Kind.ENTITY], [  # one call, not one per entity
                models.SetPayloadOperation(set_payload=models.SetPayload(payload={"vector_text": text},
                                                                         points=[ids[k]]))
                for k, (text, _) in keep.items()])

    async def _write_locked(self, records: Sequence[Record]) -> tuple[semantics.ApplyPlan, dict[tuple[str, str], str]]:
        """Apply and mark for re-embedding; the caller holds the write lock."""
        applied = await self._apply_records(records)
        texts = await self._texts(applied.touched)
        # Vectors of entities whose text changed are dropped until recomputed: never a stale hit.
        stale = [point_id(semantics.entity_key(*k)) for k in texts]  # live entities only: they exist
        if stale:
            await self._q.delete_vectors(self._c[Kind.ENTITY], [VECTOR], points=_ids(stale))
        return applied, texts

    async def _committed(self, records: Sequence[Record], vectors: VectorMap | None = None) -> semantics.ApplyPlan:
        async with self._lock:
            applied, texts = await self._write_locked(records)
        await self._embeddings.after_write(texts, vectors)
        return applied

    # --- the memory API --------------------------------------------------------------------------------------------
    async def _planned(self, scope: str, keys: list[RecordKey], plan: Plan[T], size: int) -> WriteResult[T]:
        async with self._lock:  # plan and write in one hold: nothing changes in between
            answer, effects = plan(await self._fetch(keys))
            _, texts = await self._write_locked(effects)
        await self._embeddings.after_write(texts)
        return WriteResult(answer, effects)

    # --- reads -----------------------------------------------------------------------------------------------------
    async def _entities(self, scope: str, names: Sequence[str]) -> list[Entity]:
        if not names:
            return []
        found = await self._q.retrieve(self._c[Kind.ENTITY], [point_id(semantics.entity_key(scope, n))
                                                               for n in names], with_payload=True)
        live = {pl["name"]: pl for p in found if not (pl := p.payload or {})["deleted"]}
        obs: dict[str, list[tuple[int, str]]] = {}
        if live:
            for p in await self._scroll(Kind.OBSERVATION, _match(scope=scope, entity=list(live), deleted=False)):
                pl = p.payload or {}
                obs.setdefault(pl["entity"], []).append((pl["created"], pl["text"]))
        return [Entity(n, live[n]["entity_type"], tuple(t for _, t in sorted(obs.get(n, []))),
                       dict(live[n]["metadata"])) for n in sorted(live)]

    async def _relations(self, scope: str) -> list[Relation]:
        rels = [Relation(pl["source"], pl["target"], pl["relation_type"], dict(pl["metadata"]))
                for p in await self._scroll(Kind.RELATION, _match(scope=scope, deleted=False))
                if (pl := p.payload or {})]
        return sorted(rels, key=lambda r: r.key)

    async def _graph(self, scope: str, names: Sequence[str]) -> Graph:
        entities = await self._entities(scope, names)
        found = {e.name for e in entities}
        rels = [r for r in await self._relations(scope) if r.source in found or r.target in found] if found else []
        return Graph(tuple(entities), tuple(rels))

    async def _live_names(self, scope: str) -> list[str]:
        return sorted((p.payload or {})["name"] for p in await self._scroll(Kind.ENTITY, _match(scope=scope,
                                                                                                 deleted=False)))

    async def read_graph(self, scope: str, cursor: str | None, limit: int) -> GraphPage:
        kind, after = decode_cursor(cursor) if cursor else (Kind.ENTITY, ("",))
        entities: list[Entity] = []
        if kind == Kind.ENTITY:
            names = [n for n in await self._live_names(scope) if n > after[0]][: limit + 1]
            entities = await self._entities(scope, names[:limit])
            if len(names) > limit:
                return GraphPage(tuple(entities), (), encode_cursor(Kind.ENTITY, [names[limit - 1]]))
        room = limit - len(entities)
        rel_after = after if kind == Kind.RELATION else ("", "", "")
        rows = [r for r in await self._relations(scope) if r.key > rel_after][: room + 1]
        rels = rows[:room]
        nxt = None
        if len(rows) > room:
            nxt = encode_cursor(Kind.RELATION, rels[-1].key if rels else rel_after)
        return GraphPage(tuple(entities), tuple(rels), nxt)

    async def search_nodes(self, scope: str, query: str) -> Graph:
        needle = semantics.lowered(query)
        ents = [p.payload or {} for p in await self._scroll(Kind.ENTITY, _match(scope=scope, deleted=False))]
        hits = {e["name"] for e in ents if semantics.search_hit(needle, e["name"], e["entity_type"])}
        live = {e["name"] for e in ents}
        for p in await self._scroll(Kind.OBSERVATION, _match(scope=scope, deleted=False)):
            pl = p.payload or {}
            if pl["entity"] in live and semantics.search_hit(needle, pl["text"]):
                hits.add(pl["entity"])
        return await self._graph(scope, sorted(hits))

    async def open_nodes(self, scope: str, names: Sequence[str]) -> Graph:
        return await self._graph(scope, list(dict.fromkeys(names)))

    async def semantic_search(self, scope: str, vector: Vector, limit: int, min_score: float | None,
                              entity_types: Sequence[str]) -> SearchResult:
        await self._embeddings.settled(scope)
        flt = _match(scope=scope, deleted=False, **({"entity_type": list(entity_types)} if entity_types else {}))
        found = await self._q.query_points(self._c[Kind.ENTITY], query=np.asarray(vector, np.float32).tolist(),
                                           using=VECTOR, query_filter=flt, limit=limit, with_payload=True,
                                           score_threshold=min_score)
        hits = sorted(((p.payload or {})["name"], float(p.score)) for p in found.points)
        hits.sort(key=lambda h: (-h[1], h[0]))  # ties broken by name, as every store does
        by_name = {e.name: e for e in await self._entities(scope, [n for n, _ in hits])}
        results = tuple(ScoredEntity(by_name[n], s) for n, s in hits if n in by_name)
        names = {r.entity.name for r in results}
        rels = [r for r in await self._relations(scope) if r.source in names or r.target in names] if names else []
        return SearchResult(results, tuple(rels))

    # --- replication -----------------------------------------------------------------------------------------------
    async def apply(self, records: Sequence[Record], vectors: VectorMap | None = None) -> int:
        return (await self._committed(records, vectors)).count if records else 0

    async def replace_if(self, items: Sequence[tuple[RecordKey, Record | None, int | None]]) -> list[RecordKey]:
        moved: list[RecordKey] = []
        touched: set[tuple[str, str]] = set()
        async with self._lock:
            stored = await self._fetch([k for k, _, _ in items])
            for key, record, expected in items:
                current = stored.get(key)
                if (current.version if current else None) != expected:
                    moved.append(key)
                    continue
                await self._q.delete(self._c[key[0]], models.PointIdsList(points=[point_id(key)]))
                if key[0] != Kind.RELATION:
                    touched.add((key[1], key[2][0]))
                if record is not None:
                    touched |= (await self._apply_records([record])).touched
            texts = await self._texts(touched)
            stale = [point_id(semantics.entity_key(*k)) for k in texts]
            if stale:
                await self._q.delete_vectors(self._c[Kind.ENTITY], [VECTOR], points=_ids(stale))
        await self._embeddings.after_write(texts)
        return moved

    async def child_keys(self, scope: str, name: str) -> list[RecordKey]:
        obs: list[RecordKey] = [(Kind.OBSERVATION, scope, (name, (p.payload or {})["text"]))
                                for p in await self._scroll(Kind.OBSERVATION, _match(scope=scope, entity=name))]
        rels: list[RecordKey] = []
        for side in ("source", "target"):
            for p in await self._scroll(Kind.RELATION, _match(scope=scope, **{side: name})):
                key = _record(Kind.RELATION, p.payload or {}).key
                if key not in rels:
                    rels.append(key)
        return obs + rels

    async def embed_stale(self) -> int:
        await self._embeddings.settled()
        async with self._lock:
            live = await self._scroll(Kind.ENTITY, _match(deleted=False), with_vectors=True)
            keys = [((pl := p.payload or {})["scope"], pl["name"]) for p in live]
            texts = await self._texts(keys)
            have = {((p.payload or {})["scope"], (p.payload or {})["name"]): (p.payload or {}).get("vector_text")
                    for p in live if isinstance(p.vector, dict) and VECTOR in p.vector}
            stale = {k: t for k, t in texts.items() if have.get(k) != t}
        await self._embeddings.embed(stale)
        return len(stale)

    async def get_records(self, keys: Sequence[RecordKey]) -> list[Record]:
        found = await self._fetch(keys)
        return [found[k] for k in keys if k in found]

    async def _scopes(self) -> list[str]:
        return sorted((p.payload or {})["scope"] for p in await self._scroll(self._scopes_c, None))

    async def list_records(self, after: RecordKey | None, limit: int, tombstones: bool = False) -> RecordPage:
        """Key order, one scope at a time: a scope's records of one kind are read and sorted together (a scope is
        one agent's or team's memory, so this stays small while the walk over every scope streams)."""
        out: list[Record] = []
        scopes = await self._scopes()
        for kind in Kind:
            if after and kind < after[0]:
                continue
            for scope in scopes:
                if len(out) >= limit:
                    break
                if after and kind == after[0] and scope < after[1]:
                    continue
                flt = _match(scope=scope) if tombstones else _match(scope=scope, deleted=False)
                recs = [_record(kind, p.payload or {}) for p in await self._scroll(kind, flt)]
                if kind == Kind.OBSERVATION and not tombstones:
                    live = set(await self._live_names(scope))
                    recs = [r for r in recs if isinstance(r, ObservationRecord) and r.entity in live]
                recs.sort(key=lambda r: r.key)
                if after and kind == after[0] and scope == after[1]:
                    recs = [r for r in recs if r.key > after]
                out += recs[: limit - len(out)]
        return RecordPage(tuple(out), out[-1].key if len(out) >= limit else None)

    async def get_vectors(self, keys: Sequence[tuple[str, str]],
                          childless_only: bool = False) -> dict[tuple[str, str], tuple[str, Vector]]:
        await self._embeddings.settled()
        texts = await self._texts(list(dict.fromkeys(keys)), childless_only)
        if not texts:
            return {}
        found = await self._q.retrieve(self._c[Kind.ENTITY], [point_id(semantics.entity_key(*k)) for k in texts],
                                       with_payload=True, with_vectors=True)
        out: dict[tuple[str, str], tuple[str, Vector]] = {}
        for p in found:
            pl = p.payload or {}
            key = (pl["scope"], pl["name"])
            if isinstance(p.vector, dict) and VECTOR in p.vector and pl.get("vector_text") == texts.get(key):
                out[key] = (text_hash(texts[key]), np.asarray(p.vector[VECTOR], dtype=np.float32))
        return out

    async def count(self, scope: str | None = None) -> Counts:
        at = {"scope": scope} if scope is not None else {}
        ents = await self._scroll(Kind.ENTITY, _match(deleted=False, **at))
        live = {((p.payload or {})["scope"], (p.payload or {})["name"]) for p in ents}
        obs = sum(1 for p in await self._scroll(Kind.OBSERVATION, _match(deleted=False, **at))
                  if ((p.payload or {})["scope"], (p.payload or {})["entity"]) in live)
        rels = (await self._q.count(self._c[Kind.RELATION], count_filter=_match(deleted=False, **at),
                                    exact=True)).count
        return Counts(len(live), obs, rels)

    async def purge_tombstones(self, before_version: int) -> int:
        n = 0
        async with self._lock:
            flt = models.Filter(must=[models.FieldCondition(key="deleted", match=models.MatchValue(value=True)),
                                      models.FieldCondition(key="version", range=models.Range(lt=before_version))])
            for kind in (Kind.OBSERVATION, Kind.RELATION, Kind.ENTITY):
                n += (await self._q.count(self._c[kind], count_filter=flt, exact=True)).count
                await self._q.delete(self._c[kind], models.FilterSelector(filter=flt))
        return n
