"""Neo4j over Bolt: the memory store as a property graph, through the official async `neo4j` driver.

- Spec: `bolt://[user@]host:7687[/database]?prefix=Memshift&password_file=PATH` (also `neo4j://`, `bolt+s://`,
  `neo4j+s://`); user and password from the spec, $NEO4J_USERNAME / $NEO4J_PASSWORD or `password_file`.
- The graph: `(:{P}Entity {scope, name})` nodes carry the entity record (and its vector),
  `(:{P}Entity)-[:HAS_OBSERVATION]->(:{P}Observation)` the observations, `(:{P}Entity)-[:RELATES_TO
  {relation_type}]->(:{P}Entity)` the relations, `(:{P}Scope {name})` one node per scope. `{P}` is the spec's label
  prefix (letters, digits, `_`), so several stores can share one database. An entity node whose record was never
  written (a relation or observation arrived first, as replication allows) is an anchor with no `version`.
- Relation types are stored as a property and only ever passed as query parameters: no caller-supplied text
  reaches Cypher, so there is nothing to inject; `MATCH ()-[r:RELATES_TO {relation_type: 'works_at'}]->()` finds
  them. Labels come from the validated prefix only.
- Constraints and indexes are named and created `IF NOT EXISTS` on open (ArcadeDB insists on names).
- Every write is one idempotent unit of work (`execute_write`, which the driver retries on transient errors): it
  first bumps the `Scope` nodes it touches, which on Neo4j takes their write locks until commit, then reads what the
  batch touches, decides with the shared record rules (`adapters.semantics.plan_apply`) and writes in `UNWIND`
  batches. Re-running it after a retry reads again and decides again, so a retry never applies anything twice.
  Within one process a write lock also keeps the store's own writers from contending.
- Semantic search uses a vector index where the server has one (Neo4j 5.11+: `db.index.vector.queryNodes`,
  oversampled until the scope filter leaves enough hits) and exact `vector.similarity.cosine` scoring where it does
  not (ArcadeDB). Neo4j reports cosine normalised to [0, 1]; scores are mapped back to plain cosine, as every
  other store reports. Strings sort as the server sorts them (by UTF-16 code unit on the JVM), which matches the
  code point order of the other stores everywhere except between U+E000-U+FFFF and characters beyond U+FFFF.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import neo4j
import numpy as np
from neo4j import AsyncGraphDatabase, AsyncManagedTransaction

from adapters import semantics
from adapters.base import NoBulkPath, VectorMap, WriteResult
from adapters.embedder import Embedder, EmbeddingInfo, Vector
from adapters.embedding_queue import PendingEmbeddings
from adapters.errors import EmbeddingMismatch, StoreUnavailable
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
    dump_metadata,
    embedding_text,
    encode_cursor,
    kinds_after,
    text_hash,
)
from adapters.specs import StoreSpec, parse

T = TypeVar("T")
Key = tuple[str, str]
Rows = list[dict[str, Any]]
_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,40}")
_UNAVAILABLE = (neo4j.exceptions.ServiceUnavailable, neo4j.exceptions.SessionExpired, OSError)


def parse_spec(spec: StoreSpec | str) -> dict[str, Any]:
    """Driver URI, auth, database and label prefix from a `bolt://user@host:port/db?prefix=P` spec."""
    spec = parse(spec) if isinstance(spec, str) else spec
    prefix = spec.options.get("prefix", "Memshift")
    if not _PREFIX.fullmatch(prefix):
        raise spec.problem(f"prefix {prefix!r}: a letter, then letters, digits and _ (at most 41)")
    user = spec.user or os.environ.get("NEO4J_USERNAME", "neo4j")
    host = f"[{spec.host}]" if ":" in spec.host else spec.host or "localhost"
    return {"uri": f"{spec.scheme}://{host}:{spec.port or 7687}", "auth": (user, spec.secret.read()),
            "database": spec.path or None, "prefix": prefix}


def _entity(row: dict[str, Any]) -> EntityRecord:
    return EntityRecord(row["scope"], row["name"], row["entity_type"], row["version"], row["created"], row["purged"],
                        row["deleted"], json.loads(row["metadata"]))


def _observation(row: dict[str, Any]) -> ObservationRecord:
    return ObservationRecord(row["scope"], row["entity"], row["text"], row["version"], row["created"], row["deleted"])


def _relation(row: dict[str, Any]) -> RelationRecord:
    return RelationRecord(row["scope"], row["source"], row["relation_type"], row["target"], row["version"],
                          row["deleted"], json.loads(row["metadata"]))


_KEY_FIELDS = {Kind.ENTITY: ["e.scope", "e.name"], Kind.OBSERVATION: ["o.scope", "o.entity", "o.text"],
               Kind.RELATION: ["a.scope", "a.name", "r.relation_type", "b.name"]}
_VERSION_OF = {Kind.ENTITY: "e.version", Kind.OBSERVATION: "o.version", Kind.RELATION: "r.version"}


def _after(fields: list[str], n: int = 0) -> str:
    """`(fields) > ($p0, $p1, ...)` in lexicographic order; Cypher has no tuple comparison."""
    if n == len(fields) - 1:
        return f"{fields[n]} > $p{n}"
    return f"({fields[n]} > $p{n} OR ({fields[n]} = $p{n} AND {_after(fields, n + 1)}))"


class Neo4jBackend(PlannedWrites, ExportInParts, NoBulkPath):
    def __init__(self, spec: StoreSpec | str, embedder: Embedder, max_pending_texts: int = 128) -> None:
        parsed = parse_spec(spec)
        self._uri: str = parsed["uri"]
        self._auth: tuple[str, str] = parsed["auth"]
        self._db: str | None = parsed["database"]
        p = self._prefix = parsed["prefix"]
        self._label = f"neo4j:{self._uri.split('://', 1)[1]}/{self._db or 'default'}/{p}"
        self.E, self.O, self.S, self.M = f"{p}Entity", f"{p}Observation", f"{p}Scope", f"{p}Meta"
        self._embedder = embedder
        self._driver: neo4j.AsyncDriver | None = None
        self._lock = asyncio.Lock()
        self._vector_index: str | None = None  # the vector index's name, when the server has one
        self._normalised_cosine = False
        self._embeddings = PendingEmbeddings(embedder, self._store_vectors, max_pending_texts)
        self._q = self._queries()

    @property
    def name(self) -> str:
        return self._label

    @property
    def embedding(self) -> EmbeddingInfo:
        return self._embedder.info

    # --- Cypher, built once from the validated labels ------------------------------------------------------------
    def _queries(self) -> dict[str, str]:
        EL, OL, SL = self.E, self.O, self.S  # entity, observation and scope labels
        ent = ("e.scope AS scope, e.name AS name, e.entity_type AS entity_type, e.metadata AS metadata,"
               " e.version AS version, e.created AS created, e.purged AS purged, e.deleted AS deleted")
        obs = ("o.scope AS scope, o.entity AS entity, o.text AS text, o.version AS version, o.created AS created,"
               " o.deleted AS deleted")
        rel = ("a.scope AS scope, a.name AS source, r.relation_type AS relation_type, b.name AS target,"
               " r.metadata AS metadata, r.version AS version, r.deleted AS deleted")
        return {
            "lock": f"UNWIND $scopes AS s MERGE (x:{SL} {{name: s}}) SET x.writes = coalesce(x.writes, 0) + 1",
            "fetch_e": f"UNWIND $keys AS k MATCH (e:{EL} {{scope: k.s, name: k.n}}) WHERE e.version IS NOT NULL"
                       f" RETURN {ent}",
            "fetch_o": f"UNWIND $keys AS k MATCH (o:{OL} {{scope: k.s, entity: k.e, text: k.t}}) RETURN {obs}",
            "fetch_r": f"UNWIND $keys AS k MATCH (a:{EL} {{scope: k.s, name: k.a}})-[r:RELATES_TO]->"
                       f"(b:{EL} {{scope: k.s, name: k.b}}) WHERE r.relation_type = k.r RETURN {rel}",
            "anchors": f"UNWIND $keys AS k MERGE (e:{EL} {{scope: k.s, name: k.n}})",
            "write_e": f"UNWIND $rows AS row MATCH (e:{EL} {{scope: row.scope, name: row.name}})"
                       " SET e.entity_type = row.entity_type, e.metadata = row.metadata, e.version = row.version,"
                       " e.created = row.created, e.purged = row.purged, e.deleted = row.deleted"
                       " WITH e, row WHERE row.deleted SET e.embedding = null, e.vector_hash = null",
            "write_o": f"UNWIND $rows AS row MATCH (e:{EL} {{scope: row.scope, name: row.entity}})"
                       f" MERGE (o:{OL} {{scope: row.scope, entity: row.entity, text: row.text}})"
                       " SET o.version = row.version, o.created = row.created, o.deleted = row.deleted"
                       " MERGE (e)-[:HAS_OBSERVATION]->(o)",
            "write_r": f"UNWIND $rows AS row MATCH (a:{EL} {{scope: row.scope, name: row.source}})"
                       f" MATCH (b:{EL} {{scope: row.scope, name: row.target}})"
                       " MERGE (a)-[r:RELATES_TO {relation_type: row.relation_type}]->(b)"
                       " SET r.metadata = row.metadata, r.version = row.version, r.deleted = row.deleted",
            "purge_o": f"UNWIND $rows AS p MATCH (o:{OL} {{scope: p.s, entity: p.n}}) WHERE o.version < p.v"
                       " DETACH DELETE o",
            "purge_out": f"UNWIND $rows AS p MATCH (:{EL} {{scope: p.s, name: p.n}})-[r:RELATES_TO]->(:{EL})"
                         " WHERE r.version < p.v DELETE r",
            "purge_in": f"UNWIND $rows AS p MATCH (:{EL})-[r:RELATES_TO]->(:{EL} {{scope: p.s, name: p.n}})"
                        " WHERE r.version < p.v DELETE r",
            "live_e": f"UNWIND $keys AS k MATCH (e:{EL} {{scope: k.s, name: k.n}}) WHERE e.deleted = false"
                      " RETURN e.scope AS scope, e.name AS name, e.entity_type AS entity_type,"
                      " e.embed_hash AS embed_hash, e.vector_hash AS vector_hash",
            "live_o": f"UNWIND $keys AS k MATCH (o:{OL} {{scope: k.s, entity: k.n}}) WHERE o.deleted = false"
                      " RETURN o.scope AS scope, o.entity AS entity, o.created AS created, o.text AS text",
            "mark": f"UNWIND $rows AS r MATCH (e:{EL} {{scope: r.s, name: r.n}}) SET e.embed_hash = r.h",
            "store_vectors": f"UNWIND $rows AS r MATCH (e:{EL} {{scope: r.s, name: r.n}})"
                             " WHERE e.embed_hash = r.h AND e.deleted = false SET e.embedding = r.v,"
                             " e.vector_hash = r.h",
            "vectors": f"UNWIND $keys AS k MATCH (e:{EL} {{scope: k.s, name: k.n}}) WHERE e.embedding IS NOT NULL"
                       " AND e.vector_hash = e.embed_hash RETURN e.scope AS scope, e.name AS name,"
                       " e.embedding AS embedding",
            "stale": f"MATCH (e:{EL}) WHERE e.deleted = false AND (e.vector_hash IS NULL OR e.embed_hash IS NULL"
                     " OR e.vector_hash <> e.embed_hash) RETURN e.scope AS scope, e.name AS name",
            "entities": f"MATCH (e:{EL}) WHERE e.scope = $scope AND e.name IN $names AND e.deleted = false"
                        " RETURN e.name AS name, e.entity_type AS entity_type, e.metadata AS metadata",
            "entity_obs": f"MATCH (o:{OL}) WHERE o.scope = $scope AND o.entity IN $names AND o.deleted = false"
                          " RETURN o.entity AS entity, o.created AS created, o.text AS text",
            "touching": f"MATCH (a:{EL})-[r:RELATES_TO]->(b:{EL}) WHERE a.scope = $scope AND r.deleted = false"
                        " AND (a.name IN $names OR b.name IN $names)"
                        " RETURN a.name AS source, r.relation_type AS relation_type, b.name AS target,"
                        " r.metadata AS metadata",
            "page_e": f"MATCH (e:{EL}) WHERE e.scope = $scope AND e.deleted = false AND e.name > $after"
                      " RETURN e.name AS name ORDER BY name LIMIT $limit",
            "page_r": f"MATCH (a:{EL})-[r:RELATES_TO]->(b:{EL}) WHERE a.scope = $scope AND r.deleted = false"
                      f" AND {_after(['a.name', 'r.relation_type', 'b.name'])} RETURN a.name AS source,"
                      " r.relation_type AS relation_type, b.name AS target, r.metadata AS metadata"
                      " ORDER BY source, relation_type, target LIMIT $limit",
            "find_e": f"MATCH (e:{EL}) WHERE e.scope = $scope AND e.deleted = false"
                      " RETURN e.name AS name, e.entity_type AS entity_type",
            "find_o": f"MATCH (e:{EL})-[:HAS_OBSERVATION]->(o:{OL}) WHERE e.scope = $scope AND e.deleted = false"
                      " AND o.deleted = false RETURN e.name AS name, o.text AS text",
            "exact": f"MATCH (e:{EL}) WHERE e.scope = $scope AND e.deleted = false AND e.embedding IS NOT NULL"
                     " AND e.vector_hash = e.embed_hash AND (size($types) = 0 OR e.entity_type IN $types)"
                     " WITH e, vector.similarity.cosine(e.embedding, $q) AS score"
                     " WHERE $min IS NULL OR score >= $min RETURN e.name AS name, score"
                     " ORDER BY score DESC, name LIMIT $limit",
            "indexed": "CALL db.index.vector.queryNodes($index, $k, $q) YIELD node AS e, score"
                       " WHERE e.scope = $scope AND e.deleted = false AND e.vector_hash = e.embed_hash"
                       " AND (size($types) = 0 OR e.entity_type IN $types) AND ($min IS NULL OR score >= $min)"
                       " RETURN e.name AS name, score ORDER BY score DESC, name LIMIT $limit",
            # {live} and {after} are filled per call (`_list_kind`).
            "list_e": f"MATCH (e:{EL}) WHERE e.version IS NOT NULL {{live}} AND {{after}} RETURN {ent}"
                      " ORDER BY scope, name LIMIT $limit",
            "list_o_all": f"MATCH (o:{OL}) WHERE {{after}} RETURN {obs} ORDER BY scope, entity, text LIMIT $limit",
            "list_o_live": f"MATCH (e:{EL})-[:HAS_OBSERVATION]->(o:{OL}) WHERE e.deleted = false AND o.deleted = false"
                           f" AND {{after}} RETURN {obs} ORDER BY scope, entity, text LIMIT $limit",
            "list_r": f"MATCH (a:{EL})-[r:RELATES_TO]->(b:{EL}) WHERE TRUE {{live}} AND {{after}} RETURN {rel}"
                      " ORDER BY scope, source, relation_type, target LIMIT $limit",
            "children_o": f"MATCH (o:{OL}) WHERE o.scope = $scope AND o.entity = $name RETURN o.text AS text",
            "children_r": f"MATCH (a:{EL})-[r:RELATES_TO]->(b:{EL}) WHERE a.scope = $scope AND (a.name = $name OR"
                          " b.name = $name) RETURN a.name AS source, r.relation_type AS relation_type,"
                          " b.name AS target",
            "remove_e": f"MATCH (e:{EL} {{scope: $s, name: $n}}) SET e.version = null, e.entity_type = null,"
                        " e.metadata = null, e.created = null, e.purged = null, e.deleted = null,"
                        " e.embedding = null, e.vector_hash = null, e.embed_hash = null",
            "remove_o": f"MATCH (o:{OL} {{scope: $s, entity: $e, text: $t}}) DETACH DELETE o",
            "remove_r": f"MATCH (a:{EL} {{scope: $s, name: $a}})-[r:RELATES_TO]->(b:{EL} {{scope: $s, name: $b}})"
                        " WHERE r.relation_type = $r DELETE r",
            "count_e": f"MATCH (e:{EL}) WHERE e.deleted = false {{at}} RETURN count(e) AS n",
            "count_o": f"MATCH (e:{EL})-[:HAS_OBSERVATION]->(o:{OL}) WHERE e.deleted = false AND o.deleted = false"
                       " {at} RETURN count(o) AS n",
            "count_r": f"MATCH (a:{EL})-[r:RELATES_TO]->(:{EL}) WHERE r.deleted = false {{at}} RETURN count(r) AS n",
            "dead_o": f"MATCH (o:{OL}) WHERE o.deleted = true AND o.version < $v DETACH DELETE o RETURN count(*) AS n",
            "dead_r": f"MATCH (:{EL})-[r:RELATES_TO]->(:{EL}) WHERE r.deleted = true AND r.version < $v"
                      " DELETE r RETURN count(*) AS n",
            "dead_e": f"MATCH (e:{EL}) WHERE e.deleted = true AND e.version < $v SET e.version = null,"
                      " e.entity_type = null, e.metadata = null, e.created = null, e.purged = null,"
                      " e.deleted = null RETURN count(*) AS n",
            "orphans": f"MATCH (e:{EL}) WHERE e.version IS NULL OPTIONAL MATCH (e)-[x]-() WITH e, count(x) AS c"
                       " WHERE c = 0 DELETE e",
        }

    # --- lifecycle -------------------------------------------------------------------------------------------------
    async def open(self) -> None:
        self._driver = AsyncGraphDatabase.driver(self._uri, auth=self._auth)
        try:
            await self._driver.verify_connectivity()
        except (*_UNAVAILABLE, neo4j.exceptions.AuthError) as exc:
            await self._driver.close()
            self._driver = None
            raise StoreUnavailable(f"{self.name}: cannot connect: {exc}") from exc
        p = self._prefix.lower()
        for name, label, what in [(f"{p}_entity_key", self.E, "(n.scope, n.name) IS UNIQUE"),
                                  (f"{p}_scope_key", self.S, "n.name IS UNIQUE")]:
            await self._run(f"CREATE CONSTRAINT {name} IF NOT EXISTS FOR (n:{label}) REQUIRE {what}")
        await self._run(f"CREATE INDEX {p}_observation_owner IF NOT EXISTS FOR (n:{self.O}) ON (n.scope, n.entity)")
        await self._check_embedding()
        await self._detect_vector_support()
        await self.embed_stale()

    async def _check_embedding(self) -> None:
        rows = await self._run(f"MATCH (m:{self.M} {{key: 'embedding'}}) RETURN m.model AS model, m.dim AS dim")
        want = (self.embedding.model, self.embedding.dimension)
        if rows and (rows[0]["model"], rows[0]["dim"]) != want:
            raise EmbeddingMismatch(
                f"{self.name} was written with embedding model {rows[0]['model']!r} (dimension {rows[0]['dim']}),"
                f" but the configured model is {want[0]!r} (dimension {want[1]}); migrate with re-embedding")
        if not rows:
            await self._run(f"MERGE (m:{self.M} {{key: 'embedding'}}) SET m.model = $model, m.dim = $dim",
                            model=want[0], dim=want[1])

    async def _detect_vector_support(self) -> None:
        """A vector index where the server has one (Neo4j 5.11+); exact scoring otherwise (ArcadeDB)."""
        name = f"{self._prefix.lower()}_entity_embedding"
        try:
            await self._run(
                f"CREATE VECTOR INDEX {name} IF NOT EXISTS FOR (n:{self.E}) ON n.embedding OPTIONS {{indexConfig:"
                f" {{`vector.dimensions`: {int(self.embedding.dimension)}, `vector.similarity_function`: 'cosine'}}}}")
            self._vector_index = name
        except (neo4j.exceptions.ClientError, neo4j.exceptions.DatabaseError):
            self._vector_index = None
        rows = await self._run("RETURN vector.similarity.cosine([1.0, 0.0], [0.0, 1.0]) AS s")
        self._normalised_cosine = abs(float(rows[0]["s"]) - 0.5) < 1e-6  # Neo4j: (1 + cos) / 2

    async def close(self) -> None:
        await self._embeddings.settled()
        if self._driver is not None:
            driver, self._driver = self._driver, None
            await driver.close()

    # --- plumbing --------------------------------------------------------------------------------------------------
    def _d(self) -> neo4j.AsyncDriver:
        if self._driver is None:
            raise StoreUnavailable(f"{self.name} is not open")
        return self._driver

    async def _run(self, query: str, **params: Any) -> Rows:
        """One auto-retried statement (`execute_query`)."""
        try:
            result = await self._d().execute_query(query, params, database_=self._db)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"{self.name}: {exc}") from exc
        return [r.data() for r in result.records]

    async def _write_after(self, query: str, **params: Any) -> Rows:
        """A write outside the units of work (vectors landing after their text committed) waits its turn behind
        them: ArcadeDB refuses two concurrent writes to one page even for different nodes, and the driver then backs
        off for a second, which stalled the pipelined backfill."""
        async with self._lock:
            return await self._run(query, **params)

    async def _unit(self, work: Callable[[AsyncManagedTransaction], Awaitable[T]]) -> T:
        """One idempotent write transaction; the driver retries it whole on transient failures."""
        try:
            async with self._d().session(database=self._db) as session:
                return await session.execute_write(work)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"{self.name}: {exc}") from exc

    @staticmethod
    async def _tx(tx: AsyncManagedTransaction, query: str, **params: Any) -> Rows:
        result = await tx.run(query, params)
        return await result.data()

    async def _fetch(self, tx: AsyncManagedTransaction, keys: Sequence[RecordKey]) -> dict[RecordKey, Record]:
        keys = list(dict.fromkeys(keys))
        e = [{"s": s, "n": p[0]} for k, s, p in keys if k == Kind.ENTITY]
        o = [{"s": s, "e": p[0], "t": p[1]} for k, s, p in keys if k == Kind.OBSERVATION]
        r = [{"s": s, "a": p[0], "r": p[1], "b": p[2]} for k, s, p in keys if k == Kind.RELATION]
        found: list[Record] = []
        if e:
            found += [_entity(row) for row in await self._tx(tx, self._q["fetch_e"], keys=e)]
        if o:
            found += [_observation(row) for row in await self._tx(tx, self._q["fetch_o"], keys=o)]
        if r:
            found += [_relation(row) for row in await self._tx(tx, self._q["fetch_r"], keys=r)]
        return {rec.key: rec for rec in found}

    async def _lock_scopes(self, tx: AsyncManagedTransaction, scopes: set[str]) -> None:
        await self._tx(tx, self._q["lock"], scopes=sorted(scopes))

    async def _apply_records(self, tx: AsyncManagedTransaction, records: Sequence[Record]) -> semantics.ApplyPlan:
        plan = semantics.plan_apply(records, await self._fetch(tx, semantics.apply_keys(records)))
        ents = [r for r in plan.writes if isinstance(r, EntityRecord)]
        obs = [r for r in plan.writes if isinstance(r, ObservationRecord)]
        rels = [r for r in plan.writes if isinstance(r, RelationRecord)]
        anchors = dict.fromkeys([(r.scope, r.name) for r in ents] + [(r.scope, r.entity) for r in obs]
                                + [(r.scope, n) for r in rels for n in (r.source, r.target)])
        if anchors:
            await self._tx(tx, self._q["anchors"], keys=[{"s": s, "n": n} for s, n in anchors])
        if ents:
            await self._tx(tx, self._q["write_e"], rows=[
                {"scope": r.scope, "name": r.name, "entity_type": r.entity_type, "metadata": dump_metadata(r.metadata),
                 "version": r.version, "created": r.created, "purged": r.purged, "deleted": r.deleted} for r in ents])
        if obs:
            await self._tx(tx, self._q["write_o"], rows=[
                {"scope": r.scope, "entity": r.entity, "text": r.text, "version": r.version, "created": r.created,
                 "deleted": r.deleted} for r in obs])
        if rels:
            await self._tx(tx, self._q["write_r"], rows=[
                {"scope": r.scope, "source": r.source, "relation_type": r.relation_type, "target": r.target,
                 "metadata": dump_metadata(r.metadata), "version": r.version, "deleted": r.deleted} for r in rels])
        if plan.purges:
            rows = [{"s": s, "n": n, "v": v} for s, n, v in plan.purges]
            for q in ("purge_o", "purge_out", "purge_in"):
                await self._tx(tx, self._q[q], rows=rows)
        return plan

    async def _texts(self, tx: AsyncManagedTransaction | None, keys: set[Key] | list[Key], mark: bool,
                     childless_only: bool = False) -> dict[Key, str]:
        """The embedding text of each live entity among `keys`; with `mark`, recorded as the text wanted."""
        if not keys:
            return {}
        params = {"keys": [{"s": s, "n": n} for s, n in keys]}

        async def q(name: str) -> Rows:
            return await (self._tx(tx, self._q[name], **params) if tx is not None else self._run(self._q[name],
                                                                                                 **params))
        obs: dict[Key, list[tuple[int, str]]] = {}
        for row in await q("live_o"):
            obs.setdefault((row["scope"], row["entity"]), []).append((row["created"], row["text"]))
        out = {}
        for row in await q("live_e"):
            key = (row["scope"], row["name"])
            if childless_only and obs.get(key):
                continue
            out[key] = embedding_text(row["name"], row["entity_type"], tuple(t for _, t in sorted(obs.get(key, []))))
        if mark and out and tx is not None:
            await self._tx(tx, self._q["mark"], rows=[{"s": s, "n": n, "h": text_hash(t)} for (s, n), t in out.items()])
        return out

    async def _live(self, keys: Sequence[Key]) -> dict[Key, dict[str, Any]]:
        """Live entities among `keys`: entity type and the wanted (`embed_hash`) and stored (`vector_hash`) text."""
        if not keys:
            return {}
        rows = await self._run(self._q["live_e"], keys=[{"s": s, "n": n} for s, n in keys])
        return {(r["scope"], r["name"]): r for r in rows}

    async def _store_vectors(self, ready: dict[Key, tuple[str, Vector]]) -> None:
        """Kept only if the entity still wants exactly this text (a newer write embeds its own)."""
        await self._write_after(self._q["store_vectors"], rows=[
            {"s": s, "n": n, "h": text_hash(t), "v": np.asarray(v, dtype=np.float32).tolist()}
            for (s, n), (t, v) in ready.items()])

    async def _load_vectors(self, keys: list[Key]) -> dict[Key, Vector]:
        rows = await self._run(self._q["vectors"], keys=[{"s": s, "n": n} for s, n in keys])
        return {(r["scope"], r["name"]): np.asarray(r["embedding"], dtype=np.float32) for r in rows}

    async def _committed(self, scopes: set[str],
                         body: Callable[[AsyncManagedTransaction], Awaitable[tuple[T, set[Key]]]],
                         vectors: VectorMap | None = None) -> T:
        async def work(tx: AsyncManagedTransaction) -> tuple[T, dict[Key, str]]:
            await self._lock_scopes(tx, scopes)
            result, touched = await body(tx)
            return result, await self._texts(tx, touched, mark=True)

        async with self._lock:
            result, texts = await self._unit(work)
        await self._embeddings.after_write(texts, vectors)
        return result

    # --- the memory API --------------------------------------------------------------------------------------------
    async def _planned(self, scope: str, keys: list[RecordKey], plan: Plan[T], size: int) -> WriteResult[T]:
        async def body(tx: AsyncManagedTransaction) -> tuple[WriteResult[T], set[Key]]:
            answer, effects = plan(await self._fetch(tx, keys))
            applied = await self._apply_records(tx, effects)
            return WriteResult(answer, effects), applied.touched

        return await self._committed({scope}, body)

    # --- reads -----------------------------------------------------------------------------------------------------
    async def _entities(self, scope: str, names: Sequence[str]) -> list[Entity]:
        if not names:
            return []
        rows = await self._run(self._q["entities"], scope=scope, names=list(names))
        obs: dict[str, list[tuple[int, str]]] = {}
        if rows:
            for o in await self._run(self._q["entity_obs"], scope=scope, names=[r["name"] for r in rows]):
                obs.setdefault(o["entity"], []).append((o["created"], o["text"]))
        return sorted((Entity(r["name"], r["entity_type"], tuple(t for _, t in sorted(obs.get(r["name"], []))),
                              json.loads(r["metadata"])) for r in rows), key=lambda e: e.name)

    async def _relations_touching(self, scope: str, names: Sequence[str]) -> list[Relation]:
        if not names:
            return []
        rows = await self._run(self._q["touching"], scope=scope, names=list(names))
        return sorted((Relation(r["source"], r["target"], r["relation_type"], json.loads(r["metadata"]))
                       for r in rows), key=lambda r: r.key)

    async def _graph(self, scope: str, names: Sequence[str]) -> Graph:
        entities = await self._entities(scope, names)
        return Graph(tuple(entities), tuple(await self._relations_touching(scope, [e.name for e in entities])))

    async def read_graph(self, scope: str, cursor: str | None, limit: int) -> GraphPage:
        kind, after = decode_cursor(cursor) if cursor else (Kind.ENTITY, ("",))
        entities: list[Entity] = []
        if kind == Kind.ENTITY:
            names = [r["name"] for r in await self._run(self._q["page_e"], scope=scope, after=after[0],
                                                        limit=limit + 1)]
            entities = await self._entities(scope, names[:limit])
            if len(names) > limit:
                return GraphPage(tuple(entities), (), encode_cursor(Kind.ENTITY, [names[limit - 1]]))
        room = limit - len(entities)
        rel_after = after if kind == Kind.RELATION else ("", "", "")
        rows = await self._run(self._q["page_r"], scope=scope, p0=rel_after[0], p1=rel_after[1], p2=rel_after[2],
                               limit=room + 1)
        rels = [Relation(r["source"], r["target"], r["relation_type"], json.loads(r["metadata"])) for r in rows[:room]]
        nxt = None
        if len(rows) > room:
            nxt = encode_cursor(Kind.RELATION, rels[-1].key if rels else rel_after)
        return GraphPage(tuple(entities), tuple(rels), nxt)

    async def search_nodes(self, scope: str, query: str) -> Graph:
        # Matched here with the one shared rule: Cypher's toLower() is the server's (Java's, locale-dependent).
        needle = semantics.lowered(query)
        names = {r["name"] for r in await self._run(self._q["find_e"], scope=scope)
                 if semantics.search_hit(needle, r["name"], r["entity_type"])}
        names |= {r["name"] for r in await self._run(self._q["find_o"], scope=scope)
                  if semantics.search_hit(needle, r["text"])}
        return await self._graph(scope, sorted(names))

    async def open_nodes(self, scope: str, names: Sequence[str]) -> Graph:
        return await self._graph(scope, list(dict.fromkeys(names)))

    async def _nearest(self, scope: str, vector: Vector, limit: int, min_score: float | None,
                       entity_types: Sequence[str]) -> list[tuple[str, float]]:
        """(name, plain cosine) of the best live entities of the scope, best first, ties by name."""
        q = np.asarray(vector, dtype=np.float32).tolist()
        norm = self._normalised_cosine
        floor = None if min_score is None else ((1 + min_score) / 2 if norm else min_score)
        args: dict[str, Any] = {"scope": scope, "q": q, "limit": limit, "min": floor, "types": list(entity_types)}
        if self._vector_index is None:
            rows = await self._run(self._q["exact"], **args)
        else:
            # The index spans every scope: ask for more neighbours until the scope filter leaves `limit` of them.
            k = max(limit * 4, 16)
            while True:
                rows = await self._run(self._q["indexed"], index=self._vector_index, k=k, **args)
                if len(rows) >= limit or k >= 1 << 16:
                    break
                k *= 4
        return [(r["name"], 2 * float(r["score"]) - 1 if norm else float(r["score"])) for r in rows]

    async def semantic_search(self, scope: str, vector: Vector, limit: int, min_score: float | None,
                              entity_types: Sequence[str]) -> SearchResult:
        await self._embeddings.settled(scope)
        hits = await self._nearest(scope, vector, limit, min_score, entity_types)
        hits.sort(key=lambda h: (-h[1], h[0]))
        by_name = {e.name: e for e in await self._entities(scope, [n for n, _ in hits])}
        results = tuple(ScoredEntity(by_name[n], s) for n, s in hits if n in by_name)
        rels = await self._relations_touching(scope, [r.entity.name for r in results])
        return SearchResult(results, tuple(rels))

    # --- replication -----------------------------------------------------------------------------------------------
    async def apply(self, records: Sequence[Record], vectors: VectorMap | None = None) -> int:
        if not records:
            return 0

        async def body(tx: AsyncManagedTransaction) -> tuple[int, set[Key]]:
            plan = await self._apply_records(tx, records)
            return plan.count, plan.touched

        return await self._committed({r.scope for r in records}, body, vectors)

    async def replace_if(self, items: Sequence[tuple[RecordKey, Record | None, int | None]]) -> list[RecordKey]:
        if not items:
            return []

        async def body(tx: AsyncManagedTransaction) -> tuple[list[RecordKey], set[Key]]:
            stored = await self._fetch(tx, [k for k, _, _ in items])
            moved: list[RecordKey] = []
            touched: set[Key] = set()
            for key, record, expected in items:
                current = stored.get(key)
                if (current.version if current else None) != expected:
                    moved.append(key)
                    continue
                kind, scope, parts = key
                if kind == Kind.ENTITY:
                    await self._tx(tx, self._q["remove_e"], s=scope, n=parts[0])
                elif kind == Kind.OBSERVATION:
                    await self._tx(tx, self._q["remove_o"], s=scope, e=parts[0], t=parts[1])
                else:
                    await self._tx(tx, self._q["remove_r"], s=scope, a=parts[0], r=parts[1], b=parts[2])
                if kind != Kind.RELATION:
                    touched.add((scope, parts[0]))
                if record is not None:
                    touched |= (await self._apply_records(tx, [record])).touched
            return moved, touched

        return await self._committed({k[1] for k, _, _ in items}, body)

    async def child_keys(self, scope: str, name: str) -> list[RecordKey]:
        obs: list[RecordKey] = [(Kind.OBSERVATION, scope, (name, r["text"]))
                                for r in await self._run(self._q["children_o"], scope=scope, name=name)]
        rels: list[RecordKey] = [(Kind.RELATION, scope, (r["source"], r["relation_type"], r["target"]))
                                 for r in await self._run(self._q["children_r"], scope=scope, name=name)]
        return obs + list(dict.fromkeys(rels))

    async def embed_stale(self) -> int:
        await self._embeddings.settled()
        stale = [(r["scope"], r["name"]) for r in await self._run(self._q["stale"])]
        if not stale:
            return 0

        async def work(tx: AsyncManagedTransaction) -> dict[Key, str]:
            return await self._texts(tx, stale, mark=True)

        async with self._lock:
            texts = await self._unit(work)
        await self._embeddings.embed(texts)
        return len(texts)

    async def get_records(self, keys: Sequence[RecordKey]) -> list[Record]:
        async def work(tx: AsyncManagedTransaction) -> dict[RecordKey, Record]:
            return await self._fetch(tx, keys)

        try:
            async with self._d().session(database=self._db) as session:
                found = await session.execute_read(work)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"{self.name}: {exc}") from exc
        return [found[k] for k in keys if k in found]

    async def list_records(self, after: RecordKey | None, limit: int, tombstones: bool = False,
                           until: int = 0) -> RecordPage:
        out: list[Record] = []
        for kind, pos in kinds_after(after):
            if len(out) >= limit:
                break
            args = dict(zip(("p0", "p1", "p2", "p3"), (*pos, "", "", "", "")[:4], strict=True))
            out += await self._list_kind(kind, args, not pos, limit - len(out), tombstones, until)
        return RecordPage(tuple(out), out[-1].key if len(out) >= limit else None)

    async def _list_kind(self, kind: Kind, args: dict[str, str], first: bool, limit: int,
                         tombstones: bool, until: int = 0) -> list[Record]:
        # From the start (`first`) there is no position to pass: a key may begin with "".
        if kind == Kind.ENTITY:
            q = self._q["list_e"].replace("{live}", "" if tombstones else "AND e.deleted = false")
            read: Callable[[dict[str, Any]], Record] = _entity
        elif kind == Kind.OBSERVATION:
            q, read = self._q["list_o_all" if tombstones else "list_o_live"], _observation
        else:
            q, read = self._q["list_r"].replace("{live}", "" if tombstones else "AND r.deleted = false"), _relation
        after = "TRUE" if first else _after(_KEY_FIELDS[kind])
        if until:  # the backfill's watermark, on the record's own node or relationship
            after += f" AND {_VERSION_OF[kind]} <= $until"
        q = q.replace("{after}", after)
        return [read(r) for r in await self._run(q, limit=limit, until=until, **args)]

    async def get_vectors(self, keys: Sequence[Key], childless_only: bool = False) -> dict[Key, tuple[str, Vector]]:
        await self._embeddings.settled(keys=set(keys))
        texts = await self._texts(None, list(dict.fromkeys(keys)), mark=False, childless_only=childless_only)
        if not texts:
            return {}
        found = await self._load_vectors(list(texts))
        return {k: (text_hash(texts[k]), v) for k, v in found.items() if k in texts}

    async def count(self, scope: str | None = None) -> Counts:
        out = []
        for name, var in (("count_e", "e"), ("count_o", "o"), ("count_r", "a")):
            at = f"AND {var}.scope = $scope" if scope is not None else ""
            rows = await self._run(self._q[name].replace("{at}", at), scope=scope)
            out.append(int(rows[0]["n"]))
        return Counts(*out)

    async def max_version(self) -> int:
        found = [0]
        for q in (f"MATCH (e:{self.E}) RETURN max(e.version) AS v", f"MATCH (o:{self.O}) RETURN max(o.version) AS v",
                  f"MATCH (:{self.E})-[r:RELATES_TO]->(:{self.E}) RETURN max(r.version) AS v"):
            found += [int(r["v"]) for r in await self._run(q) if r["v"] is not None]
        return max(found)

    async def purge_tombstones(self, before_version: int) -> int:
        n = 0
        async with self._lock:
            for q in ("dead_o", "dead_r", "dead_e"):
                n += int((await self._run(self._q[q], v=before_version))[0]["n"])
            await self._run(self._q["orphans"])
        return n
