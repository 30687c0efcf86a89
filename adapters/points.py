"""The memory store over a point database: records as points with payloads, written once for every such database.

Qdrant (`adapters.qdrant`: local mode or a server), Qdrant Edge (`adapters.qdrant_edge`, the embeddable engine) and
ChromaDB (`adapters.chroma`: in-process or a server) hold the same layout, through a small driver each (`Points`,
below): three collections of points, one per record kind, and a registry of scopes. (The hybrid store keeps its
vectors in Qdrant with a layout of its own, `adapters.hybrid`.)
- Point ids are deterministic: uuid5 of kind, scope and key, so the same record lands on the same point anywhere.
- Entity points carry the vectors (cosine) with the text each was computed from (`vector_text`); observations and
  relations are payload-only points, so graph reads need no other store. The registry of scopes lets
  `list_records` walk keys in order one scope at a time.
- Apply-if-newer is a read-decide-write: the records a batch touches (and their entities' purge points) are read,
  the rules of `adapters.semantics` decide (newer version wins, purge points merge by max, children older than a
  purge point are deleted or never written), and only the winners are written. A driver that makes each write
  conditional on the stored version in the database (`Points.conditional`) keeps that true for any number of
  writers; otherwise this store object must be the only writer of its collections, which the lock below makes true
  within one process (local modes, one proxy), and `fleet_problem` says so to a fleet. `tests/test_convergence.py`
  checks every interleaving on each.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from adapters import semantics
from adapters.base import NoBulkPath, VectorMap, WriteResult
from adapters.embedder import Embedder, EmbeddingInfo, Vector
from adapters.embedding_queue import PendingEmbeddings
from adapters.export import ExportInParts
from adapters.model import Entity, Graph, GraphPage, Relation, ScoredEntity, SearchResult
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
Payload = dict[str, Any]
_NS = uuid.UUID("6f1c4a52-9d7e-4f0b-8a38-2b5e0c9d1e47")


def point_id(key: RecordKey) -> str:
    kind, scope, parts = key
    return str(uuid.uuid5(_NS, "\x1f".join([str(int(kind)), scope, *parts])))


def scope_id(scope: str) -> str:
    return str(uuid.uuid5(_NS, "scope\x1f" + scope))


META_ID = str(uuid.uuid5(_NS, "meta"))


@dataclass(frozen=True, slots=True)
class Where:
    """A payload filter every driver translates: each `equal` field matches its value (a list: any of them), the
    version is below `version_below` if given, and at least one `any_of` field matches its value if any are given."""

    equal: Mapping[str, Any] = field(default_factory=dict)
    version_below: int | None = None
    any_of: Mapping[str, Any] = field(default_factory=dict)


def where(**equal: Any) -> Where:
    return Where(equal)


def matches(payload: Payload, w: Where) -> bool:
    """What a driver's database decides for `w`, decided in Python (for a driver answering from memory)."""
    for k, v in w.equal.items():
        if (payload.get(k) not in v) if isinstance(v, list | set | frozenset) else payload.get(k) != v:
            return False
    if w.version_below is not None and not payload["version"] < w.version_below:
        return False
    return not w.any_of or any(payload.get(k) == v for k, v in w.any_of.items())


class Points(Protocol):
    """What a point database offers this store; one implementation per database (adapters.qdrant, .chroma)."""

    label: str
    conditional: bool  # True: `put` writes only where the stored version is lower (checked in the database)

    def fleet_problem(self) -> str | None:
        """Why several proxies may not write these collections at once, or None."""
        ...

    async def open(self, info: EmbeddingInfo) -> None:
        """Create the collections (entities with cosine vectors of `info.dimension`), or check the existing ones'
        model and dimension (EmbeddingMismatch naming both)."""
        ...

    async def close(self) -> None: ...

    async def get(self, kind: Kind, ids: Sequence[str]) -> list[Payload]: ...

    async def find(self, kind: Kind, where: Where) -> list[Payload]: ...

    async def put(self, kind: Kind, rows: Sequence[tuple[str, Payload]]) -> None:
        """Write whole payloads; an entity point written loses its vector (its text may have changed)."""
        ...

    async def remove(self, kind: Kind, where: Where | None = None, ids: Sequence[str] = ()) -> None: ...

    async def count(self, kind: Kind, where: Where) -> int: ...

    async def set_vectors(self, rows: Sequence[tuple[str, str, Vector]]) -> None:
        """(entity point id, the text it was computed from, vector) for each; the text goes to `vector_text`."""
        ...

    async def drop_vectors(self, ids: Sequence[str]) -> None: ...

    async def with_vectors(self, ids: Sequence[str] | None, where: Where | None) -> list[tuple[Payload, Vector | None]]:
        """Entity payloads with their vectors (None where there is none), by ids or by filter."""
        ...

    async def nearest(self, vector: Vector, where: Where, limit: int,
                      min_score: float | None) -> list[tuple[Payload, float]]:
        """Entities with a vector, by cosine similarity, best first."""
        ...

    async def scopes(self) -> list[str]: ...

    async def add_scopes(self, scopes: set[str]) -> None: ...


def record_of(kind: Kind, p: Payload) -> Record:
    if kind == Kind.ENTITY:
        return EntityRecord(p["scope"], p["name"], p["entity_type"], p["version"], p["created"], p["purged"],
                            p["deleted"], dict(p["metadata"]))
    if kind == Kind.OBSERVATION:
        return ObservationRecord(p["scope"], p["entity"], p["text"], p["version"], p["created"], p["deleted"])
    return RelationRecord(p["scope"], p["source"], p["relation_type"], p["target"], p["version"], p["deleted"],
                          dict(p["metadata"]))


def payload_of(r: Record) -> Payload:
    if isinstance(r, EntityRecord):
        return {"scope": r.scope, "name": r.name, "entity_type": r.entity_type, "metadata": dict(r.metadata),
                "version": r.version, "created": r.created, "purged": r.purged, "deleted": r.deleted}
    if isinstance(r, ObservationRecord):
        return {"scope": r.scope, "entity": r.entity, "text": r.text, "version": r.version, "created": r.created,
                "deleted": r.deleted}
    return {"scope": r.scope, "source": r.source, "relation_type": r.relation_type, "target": r.target,
            "metadata": dict(r.metadata), "version": r.version, "deleted": r.deleted}


class PointsBackend(PlannedWrites, ExportInParts, NoBulkPath):
    def __init__(self, points: Points, embedder: Embedder, max_pending_texts: int = 128) -> None:
        self._p = points
        self._embedder = embedder
        self._lock = asyncio.Lock()  # the single writer within this process: read-decide-write stays atomic
        self._embeddings = PendingEmbeddings(embedder, self._store_vectors, max_pending_texts)

    @property
    def name(self) -> str:
        return self._p.label

    @property
    def embedding(self) -> EmbeddingInfo:
        return self._embedder.info

    def fleet_problem(self) -> str | None:
        """Why a fleet of proxies may not share this store, or None (see adapters.base.fleet_problem)."""
        return self._p.fleet_problem()

    # --- lifecycle -------------------------------------------------------------------------------------------------
    async def open(self) -> None:
        await self._p.open(self.embedding)
        await self.embed_stale()

    async def close(self) -> None:
        await self._embeddings.settled()
        await self._p.close()

    # --- plumbing --------------------------------------------------------------------------------------------------
    async def _fetch(self, keys: Sequence[RecordKey]) -> dict[RecordKey, Record]:
        out: dict[RecordKey, Record] = {}
        for kind in Kind:
            ids = [point_id(k) for k in dict.fromkeys(keys) if k[0] == kind]
            if ids:
                for p in await self._p.get(kind, ids):
                    rec = record_of(kind, p)
                    out[rec.key] = rec
        return out

    async def _upsert(self, records: list[Record]) -> None:
        for kind in Kind:
            rows = [(point_id(r.key), payload_of(r)) for r in records if r.key[0] == kind]
            if rows:
                await self._p.put(kind, rows)
        if records:
            await self._p.add_scopes({r.scope for r in records})

    async def _apply_records(self, records: Sequence[Record]) -> semantics.ApplyPlan:
        """Apply-if-newer for a batch, under the write lock (see the module docstring)."""
        plan = semantics.plan_apply(records, await self._fetch(semantics.apply_keys(records)))
        await self._upsert(plan.writes)
        for scope, name, purged in plan.purges:
            await self._p.remove(Kind.OBSERVATION, Where({"scope": scope, "entity": name}, version_below=purged))
            await self._p.remove(Kind.RELATION, Where({"scope": scope}, version_below=purged,
                                                      any_of={"source": name, "target": name}))
        return plan

    async def _texts(self, keys: set[tuple[str, str]] | list[tuple[str, str]],
                     childless_only: bool = False) -> dict[tuple[str, str], str]:
        """The embedding text of each live entity among `keys`."""
        out: dict[tuple[str, str], str] = {}
        by_scope: dict[str, list[str]] = {}
        for scope, name in keys:
            by_scope.setdefault(scope, []).append(name)
        for scope, names in by_scope.items():
            ents = await self._p.get(Kind.ENTITY, [point_id(semantics.entity_key(scope, n)) for n in names])
            obs: dict[str, list[tuple[int, str]]] = {}
            for pl in await self._p.find(Kind.OBSERVATION, where(scope=scope, entity=list(names), deleted=False)):
                obs.setdefault(pl["entity"], []).append((pl["created"], pl["text"]))
            for pl in ents:
                if pl["deleted"] or (childless_only and obs.get(pl["name"])):
                    continue
                texts = tuple(t for _, t in sorted(obs.get(pl["name"], [])))
                out[(scope, pl["name"])] = embedding_text(pl["name"], pl["entity_type"], texts)
        return out

    async def _store_vectors(self, ready: dict[tuple[str, str], tuple[str, Vector]]) -> None:
        async with self._lock:
            current = await self._texts(list(ready))
            keep = {k: v for k, v in ready.items() if current.get(k) == v[0]}  # a newer write embeds its own text
            if keep:
                await self._p.set_vectors([(point_id(semantics.entity_key(*k)), text, vector)
                                           for k, (text, vector) in keep.items()])

    async def _write_locked(self, records: Sequence[Record]) -> tuple[semantics.ApplyPlan, dict[tuple[str, str], str]]:
        """Apply and mark for re-embedding; the caller holds the write lock."""
        applied = await self._apply_records(records)
        texts = await self._texts(applied.touched)
        # Vectors of entities whose text changed are dropped until recomputed: never a stale hit. An entity point
        # just written has none already (`Points.put`).
        written = {point_id(r.key) for r in applied.writes if isinstance(r, EntityRecord)}
        stale = [i for k in texts if (i := point_id(semantics.entity_key(*k))) not in written]  # live ones: they exist
        if stale:
            await self._p.drop_vectors(stale)
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
        found = await self._p.get(Kind.ENTITY, [point_id(semantics.entity_key(scope, n)) for n in names])
        live = {pl["name"]: pl for pl in found if not pl["deleted"]}
        obs: dict[str, list[tuple[int, str]]] = {}
        if live:
            for pl in await self._p.find(Kind.OBSERVATION, where(scope=scope, entity=list(live), deleted=False)):
                obs.setdefault(pl["entity"], []).append((pl["created"], pl["text"]))
        return [Entity(n, live[n]["entity_type"], tuple(t for _, t in sorted(obs.get(n, []))),
                       dict(live[n]["metadata"])) for n in sorted(live)]

    async def _relations(self, scope: str) -> list[Relation]:
        rels = [Relation(pl["source"], pl["target"], pl["relation_type"], dict(pl["metadata"]))
                for pl in await self._p.find(Kind.RELATION, where(scope=scope, deleted=False))]
        return sorted(rels, key=lambda r: r.key)

    async def _graph(self, scope: str, names: Sequence[str]) -> Graph:
        entities = await self._entities(scope, names)
        found = {e.name for e in entities}
        rels = [r for r in await self._relations(scope) if r.source in found or r.target in found] if found else []
        return Graph(tuple(entities), tuple(rels))

    async def _live_names(self, scope: str) -> list[str]:
        return sorted(pl["name"] for pl in await self._p.find(Kind.ENTITY, where(scope=scope, deleted=False)))

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
        ents = await self._p.find(Kind.ENTITY, where(scope=scope, deleted=False))
        hits = {e["name"] for e in ents if semantics.search_hit(needle, e["name"], e["entity_type"])}
        live = {e["name"] for e in ents}
        for pl in await self._p.find(Kind.OBSERVATION, where(scope=scope, deleted=False)):
            if pl["entity"] in live and semantics.search_hit(needle, pl["text"]):
                hits.add(pl["entity"])
        return await self._graph(scope, sorted(hits))

    async def open_nodes(self, scope: str, names: Sequence[str]) -> Graph:
        return await self._graph(scope, list(dict.fromkeys(names)))

    async def semantic_search(self, scope: str, vector: Vector, limit: int, min_score: float | None,
                              entity_types: Sequence[str]) -> SearchResult:
        await self._embeddings.settled(scope)
        flt = where(scope=scope, deleted=False, **({"entity_type": list(entity_types)} if entity_types else {}))
        hits = sorted((pl["name"], score) for pl, score in await self._p.nearest(vector, flt, limit, min_score))
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
                await self._p.remove(key[0], ids=[point_id(key)])
                if key[0] != Kind.RELATION:
                    touched.add((key[1], key[2][0]))
                if record is not None:
                    touched |= (await self._apply_records([record])).touched
            texts = await self._texts(touched)
            stale = [point_id(semantics.entity_key(*k)) for k in texts]
            if stale:
                await self._p.drop_vectors(stale)
        await self._embeddings.after_write(texts)
        return moved

    async def child_keys(self, scope: str, name: str) -> list[RecordKey]:
        obs: list[RecordKey] = [(Kind.OBSERVATION, scope, (name, pl["text"]))
                                for pl in await self._p.find(Kind.OBSERVATION, where(scope=scope, entity=name))]
        rels: list[RecordKey] = []
        for side in ("source", "target"):
            for pl in await self._p.find(Kind.RELATION, where(scope=scope, **{side: name})):
                key = record_of(Kind.RELATION, pl).key
                if key not in rels:
                    rels.append(key)
        return obs + rels

    async def embed_stale(self) -> int:
        await self._embeddings.settled()
        async with self._lock:
            live = await self._p.with_vectors(None, where(deleted=False))
            keys = [(pl["scope"], pl["name"]) for pl, _ in live]
            texts = await self._texts(keys)
            have = {(pl["scope"], pl["name"]): pl.get("vector_text") for pl, vector in live if vector is not None}
            stale = {k: t for k, t in texts.items() if have.get(k) != t}
        await self._embeddings.embed(stale)
        return len(stale)

    async def get_records(self, keys: Sequence[RecordKey]) -> list[Record]:
        found = await self._fetch(keys)
        return [found[k] for k in keys if k in found]

    async def list_records(self, after: RecordKey | None, limit: int, tombstones: bool = False,
                           until: int = 0) -> RecordPage:
        """Key order, one scope at a time: a scope's records of one kind are read and sorted together (a scope is
        one agent's or team's memory, so this stays small while the walk over every scope streams)."""
        out: list[Record] = []
        scopes = await self._p.scopes()
        for kind in Kind:
            if after and kind < after[0]:
                continue
            for scope in scopes:
                if len(out) >= limit:
                    break
                if after and kind == after[0] and scope < after[1]:
                    continue
                flt = Where({"scope": scope} if tombstones else {"scope": scope, "deleted": False},
                            version_below=until + 1 if until else None)  # the backfill's watermark
                recs = [record_of(kind, pl) for pl in await self._p.find(kind, flt)]
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
        await self._embeddings.settled(keys=set(keys))
        texts = await self._texts(list(dict.fromkeys(keys)), childless_only)
        if not texts:
            return {}
        found = await self._p.with_vectors([point_id(semantics.entity_key(*k)) for k in texts], None)
        out: dict[tuple[str, str], tuple[str, Vector]] = {}
        for pl, vector in found:
            key = (pl["scope"], pl["name"])
            if vector is not None and pl.get("vector_text") == texts.get(key):
                out[key] = (text_hash(texts[key]), np.asarray(vector, dtype=np.float32))
        return out

    async def count(self, scope: str | None = None) -> Counts:
        at = {"scope": scope} if scope is not None else {}
        ents = await self._p.find(Kind.ENTITY, where(deleted=False, **at))
        live = {(pl["scope"], pl["name"]) for pl in ents}
        obs = sum(1 for pl in await self._p.find(Kind.OBSERVATION, where(deleted=False, **at))
                  if (pl["scope"], pl["entity"]) in live)
        rels = await self._p.count(Kind.RELATION, where(deleted=False, **at))
        return Counts(len(live), obs, rels)

    async def max_version(self) -> int:
        # A point database keeps no index to ask for a maximum: every payload is read, once per migration (the
        # copy that follows reads them all again anyway).
        highest = 0
        for kind in Kind:
            for pl in await self._p.find(kind, Where()):
                if pl.get("version") is not None:
                    highest = max(highest, int(pl["version"]))
        return highest

    async def purge_tombstones(self, before_version: int) -> int:
        n = 0
        async with self._lock:
            flt = Where({"deleted": True}, version_below=before_version)
            for kind in (Kind.OBSERVATION, Kind.RELATION, Kind.ENTITY):
                n += await self._p.count(kind, flt)
                await self._p.remove(kind, flt)
        return n
