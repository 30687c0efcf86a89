"""PostgreSQL + pgvector: the memory store in three tables, vectors searched by an HNSW index.

- One asyncpg pool; pgvector's codec registered on every connection, so numpy arrays go in and out as `vector`.
- Schema created and upgraded on open, in its own schema (`?schema=` in the spec, default `memshift`); keys are
  `COLLATE "C"`, so rows sort by code point exactly as every other store and Python do (Verify walks two stores in
  step, and page tokens move between stores).
- Every write transaction first takes an advisory lock per scope it touches (in hash order, so two writers never
  deadlock): API writes are planned from the rows they read (`adapters.semantics`) and nothing of the scope changes
  in between.
- Apply-if-newer is the SQL itself: `INSERT ... ON CONFLICT ... DO UPDATE ... WHERE stored.version < new.version`,
  an entity's `purged` merged by `GREATEST`, children older than a raised purge point deleted, and an observation or
  relation older than its entity's purge point never inserted. Large batches (a backfill page) go through binary
  COPY into temporary staging tables followed by one upsert per table.
- Vectors follow writes in the background (`adapters.embedding_queue`), as in the embedded store; `embed_hash` is
  the text an entity should be embedded from, `vector_hash` the text its stored vector was computed from.
- The HNSW index is built once vectors exist (`CREATE INDEX CONCURRENTLY`, so the store keeps serving): on open, and
  at the end of a bulk load (`embed_stale`, which the backfill calls when it finishes). Maintaining HNSW row by row
  during a load is about 17 times slower on these machines (1.3k against 22k records/s), which is why pgvector
  recommends building it after loading; until it exists, a search is an exact scan.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import asyncpg
import numpy as np
from pgvector import Vector as PgVector
from pgvector.asyncpg import register_vector

from adapters import semantics
from adapters.base import VectorMap, WriteResult
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
    newest_per_key,
    text_hash,
)
from adapters.specs import StoreSpec, parse

T = TypeVar("T")
log = logging.getLogger("memshift.store.postgres")
SCHEMA_VERSION = 2  # 2: entities.search_doc and its trigram index (filled on open for older stores)
COPY_THRESHOLD = 256  # records per table above which a batch is staged with binary COPY
# Entities settled per transaction by `embed_stale`: the scopes' write locks are held for one chunk (about 30 ms here),
# so an agent's write waiting behind it still lands within the dual write's grace.
_SETTLE_CHUNK = 1000
_UNSETTLED = "(embedding IS NULL OR embed_hash IS NULL OR vector_hash IS DISTINCT FROM embed_hash)"

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS entities (
    scope text COLLATE "C" NOT NULL, name text COLLATE "C" NOT NULL, entity_type text NOT NULL,
    metadata jsonb NOT NULL, version bigint NOT NULL, created bigint NOT NULL, purged bigint NOT NULL,
    deleted boolean NOT NULL, embed_hash text, vector_hash text, embedding vector({dim}),
    PRIMARY KEY (scope, name));
CREATE TABLE IF NOT EXISTS observations (
    scope text COLLATE "C" NOT NULL, entity text COLLATE "C" NOT NULL, text text COLLATE "C" NOT NULL,
    version bigint NOT NULL, created bigint NOT NULL, deleted boolean NOT NULL,
    PRIMARY KEY (scope, entity, text));
CREATE TABLE IF NOT EXISTS relations (
    scope text COLLATE "C" NOT NULL, source text COLLATE "C" NOT NULL, relation_type text COLLATE "C" NOT NULL,
    target text COLLATE "C" NOT NULL, metadata jsonb NOT NULL, version bigint NOT NULL, deleted boolean NOT NULL,
    PRIMARY KEY (scope, source, relation_type, target));
CREATE INDEX IF NOT EXISTS relations_by_target ON relations (scope, target);
CREATE UNLOGGED TABLE IF NOT EXISTS loaded_vectors (
    scope text COLLATE "C" NOT NULL, name text COLLATE "C" NOT NULL, hash text NOT NULL,
    embedding vector({dim}) NOT NULL);
CREATE INDEX IF NOT EXISTS loaded_vectors_key ON loaded_vectors (scope, name);
"""
# `loaded_vectors`: the vectors a bulk copy brought, each with the hash of the text it was computed from, until
# `embed_stale` gives every loaded entity its text and takes the vector that matches it. Unlogged: a server crash
# empties it, and the entities it held are embedded by the model instead.
# Run only when the index is missing: ALTER TABLE takes an exclusive lock even when the column exists, and a proxy
# opening the store while its fleet wrote deadlocked with those writes.
_SEARCH_COLUMN = "ALTER TABLE entities ADD COLUMN IF NOT EXISTS search_doc text"
_SEARCH_INDEX = ("CREATE INDEX {how} IF NOT EXISTS entities_search_trgm ON entities USING gin (search_doc gin_trgm_ops)"
                 " WITH ({pending})")
# GIN queues new entries in a pending list that every search reads in full until it is merged into the index: at
# PostgreSQL's default of 4 MB that list was 6 of a SearchNodes' 8 ms at 100,000 entities. 256 kB keeps inserts
# batched (a backfill's pages) and bounds what a search reads beyond the index to 32 pages.
_SEARCH_PENDING = "gin_pending_list_limit=256"

_E_COLS = "scope, name, entity_type, metadata, version, created, purged, deleted"
_O_COLS = "scope, entity, text, version, created, deleted"
_R_COLS = "scope, source, relation_type, target, metadata, version, deleted"
_E_TYPES = "text[], text[], text[], jsonb[], int8[], int8[], int8[], bool[]"
_O_TYPES = "text[], text[], text[], int8[], int8[], bool[]"
_R_TYPES = "text[], text[], text[], text[], jsonb[], int8[], bool[]"

# {src} is either unnest($1..$n) of the batch or a COPY-filled staging table.
_UPSERT_ENTITIES = f"""
INSERT INTO entities AS t ({_E_COLS}) SELECT {_E_COLS} FROM {{src}}
ON CONFLICT (scope, name) DO UPDATE SET
    entity_type = CASE WHEN t.version < excluded.version THEN excluded.entity_type ELSE t.entity_type END,
    metadata = CASE WHEN t.version < excluded.version THEN excluded.metadata ELSE t.metadata END,
    created = CASE WHEN t.version < excluded.version THEN excluded.created ELSE t.created END,
    deleted = CASE WHEN t.version < excluded.version THEN excluded.deleted ELSE t.deleted END,
    embedding = CASE WHEN t.version < excluded.version AND excluded.deleted THEN NULL ELSE t.embedding END,
    search_doc = CASE WHEN t.version < excluded.version AND excluded.deleted THEN NULL ELSE t.search_doc END,
    version = GREATEST(t.version, excluded.version),
    purged = GREATEST(t.purged, excluded.purged)
WHERE t.version < excluded.version OR t.purged < excluded.purged
RETURNING scope, name, version, purged, deleted"""

_UPSERT_OBSERVATIONS = f"""
INSERT INTO observations AS t ({_O_COLS}) SELECT {_O_COLS} FROM {{src}}
WHERE u.version >= COALESCE((SELECT e.purged FROM entities e WHERE e.scope = u.scope AND e.name = u.entity), 0)
ON CONFLICT (scope, entity, text) DO UPDATE SET
    version = excluded.version, created = excluded.created, deleted = excluded.deleted
WHERE t.version < excluded.version
RETURNING scope, entity"""

_UPSERT_RELATIONS = f"""
INSERT INTO relations AS t ({_R_COLS}) SELECT {_R_COLS} FROM {{src}}
WHERE u.version >= GREATEST(
    COALESCE((SELECT e.purged FROM entities e WHERE e.scope = u.scope AND e.name = u.source), 0),
    COALESCE((SELECT e.purged FROM entities e WHERE e.scope = u.scope AND e.name = u.target), 0))
ON CONFLICT (scope, source, relation_type, target) DO UPDATE SET
    metadata = excluded.metadata, version = excluded.version, deleted = excluded.deleted
WHERE t.version < excluded.version
RETURNING scope"""


def _unnest(types: str, cols: str) -> str:
    n = types.count("[]")
    args = ", ".join(f"${i + 1}::{t.strip()}" for i, t in enumerate(types.split(",")))
    assert n == len(cols.split(","))
    return f"unnest({args}) AS u({cols})"


def _meta(raw: Any) -> dict[str, str]:
    return dict(json.loads(raw)) if isinstance(raw, str) else dict(raw or {})


# Live entities with their live observations in order; `cond` picks which (by name, or the substring index).
_ENTITIES_WHERE = (
    "SELECT e.name, e.entity_type, e.metadata, COALESCE(array_agg(o.text ORDER BY o.created, o.text)"
    " FILTER (WHERE o.text IS NOT NULL), '{{}}') AS obs FROM entities e"
    " LEFT JOIN observations o ON o.scope = e.scope AND o.entity = e.name AND NOT o.deleted"
    " WHERE e.scope = $1 AND NOT e.deleted AND {cond} GROUP BY e.name, e.entity_type, e.metadata ORDER BY e.name")


def _entity(row: asyncpg.Record) -> Entity:
    return Entity(row["name"], row["entity_type"], tuple(row["obs"]), _meta(row["metadata"]))


def _array(value: Any) -> Vector:
    """A `vector` column as float32 numpy (pgvector's codec hands out its own Vector type)."""
    raw = value.to_numpy() if hasattr(value, "to_numpy") else value
    return np.asarray(raw, dtype=np.float32)


def _given(vectors: VectorMap | None, key: tuple[str, str], text_hash_: str, dim: int) -> PgVector | None:
    """The vector handed in for `key` if it was computed from exactly the text of hash `text_hash_` (as pgvector's
    own type: in a `vector[]` parameter the driver would take a numpy array for a nested array)."""
    got = vectors.get(key) if vectors is not None else None
    if got is None or got[0] != text_hash_ or len(got[1]) != dim:
        return None
    return PgVector(np.asarray(got[1], dtype=np.float32))


def _entity_row(r: EntityRecord) -> tuple[Any, ...]:
    return (r.scope, r.name, r.entity_type, dump_metadata(r.metadata), r.version, r.created, r.purged, r.deleted)


def _observation_row(r: ObservationRecord) -> tuple[Any, ...]:
    return (r.scope, r.entity, r.text, r.version, r.created, r.deleted)


def _relation_row(r: RelationRecord) -> tuple[Any, ...]:
    return (r.scope, r.source, r.relation_type, r.target, dump_metadata(r.metadata), r.version, r.deleted)


@dataclass
class _Applied:
    count: int = 0
    touched: set[tuple[str, str]] = field(default_factory=set)  # live entities whose embedding text may have changed


def connection(spec: StoreSpec | str, default_schema: str = "memshift") -> tuple[str, str]:
    """(asyncpg DSN, schema) from `postgresql://user@host:port/db?schema=NAME&password_file=PATH`. A password
    comes from the spec, `password_file` or $PGPASSWORD (adapters.specs); it never reaches logs."""
    spec = parse(spec) if isinstance(spec, str) else spec
    options = dict(spec.options)
    schema = options.pop("schema", default_schema)
    if not schema.replace("_", "").isalnum():
        raise spec.problem(f"schema {schema!r}: letters, digits and _ only")
    options.pop("index_workers", None)  # the store's own option (index_workers_of), not a server setting
    password = replace(spec.secret, env="").read()  # without one, asyncpg reads $PGPASSWORD itself
    userinfo = ""
    if spec.user or password:
        userinfo = quote(spec.user or "postgres", safe="") + (f":{quote(password, safe='')}" if password else "") + "@"
    host = f"[{spec.host}]" if ":" in spec.host else spec.host
    netloc = userinfo + host + (f":{spec.port}" if spec.port else "")
    dsn = f"postgresql://{netloc}/{quote(spec.path)}" + (f"?{urlencode(options)}" if options else "")
    return dsn, schema


MAX_INDEX_WORKERS = 64


def index_workers_of(spec: StoreSpec) -> int:
    """`?index_workers=N`: the parallel workers PostgreSQL may use to build the indexes after a bulk load, besides
    the building process. Unset: 0, the default that leaves the agents their latency: on a machine that also serves
    them, a build with every core starves their writes (at a million entities on 2 cores, writes waited up to
    5.5 s while three processes built the vector index with the server's default of 2; docs/benchmarks.md). An
    operator with cores to spare raises it."""
    raw = spec.options.get("index_workers")
    if raw is None:
        return 0
    if not raw.isdigit() or int(raw) > MAX_INDEX_WORKERS:
        raise spec.problem(f"index_workers {raw!r}: a whole number from 0 to {MAX_INDEX_WORKERS}")
    return int(raw)


# The live records of each kind, as `count` and `scope_counts` count them (`x` the counted row): an observation counts
# only while its entity is live, as `list_records` shows it.
_LIVE_RECORDS = ("entities x WHERE NOT x.deleted",
                 "observations x JOIN entities e ON e.scope = x.scope AND e.name = x.entity AND NOT e.deleted"
                 " WHERE NOT x.deleted",
                 "relations x WHERE NOT x.deleted")


class PostgresBackend(PlannedWrites, ExportInParts):
    def __init__(self, spec: StoreSpec | str, embedder: Embedder, *, pool_size: int = 10,
                 max_pending_texts: int = 128) -> None:
        spec = parse(spec) if isinstance(spec, str) else spec
        self._dsn, self._schema = connection(spec)
        self._index_workers = index_workers_of(spec)
        self._label = f"postgresql:{spec.host}/{spec.path}/{self._schema}"
        self._embedder = embedder
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._embeddings = PendingEmbeddings(embedder, self._store_vectors, max_pending_texts)

    @property
    def name(self) -> str:
        return self._label

    @property
    def embedding(self) -> EmbeddingInfo:
        return self._embedder.info

    # --- lifecycle -------------------------------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            conn = await asyncpg.connect(self._dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"{self.name}: cannot connect: {exc}") from exc
        try:
            async with conn.transaction():
                # Sidecars starting together race on `IF NOT EXISTS` (PostgreSQL answers a unique violation on
                # pg_namespace), so the whole setup runs under one lock.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('memshift-schema'))")
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
                await conn.execute(f'SET search_path TO "{self._schema}", public')
                await conn.execute(_DDL.format(dim=self.embedding.dimension))
                if await conn.fetchval("SELECT to_regclass('entities_search_trgm') IS NULL"):
                    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE"
                                               " table_schema = $1 AND table_name = 'entities'"
                                               " AND column_name = 'search_doc')", self._schema):
                        await conn.execute(_SEARCH_COLUMN)
                    # (Also after a bulk copy stopped between dropping the index and building it again.)
                    await conn.execute(_SEARCH_INDEX.format(how="", pending=_SEARCH_PENDING))
                elif not await conn.fetchval("SELECT coalesce($1 = ANY(reloptions), false) FROM pg_class"
                                             " WHERE oid = 'entities_search_trgm'::regclass", _SEARCH_PENDING):
                    # An index built before the bound (a lock that lets writes through; taken once per store).
                    await conn.execute(f"ALTER INDEX entities_search_trgm SET ({_SEARCH_PENDING})")
                    await conn.execute("SELECT gin_clean_pending_list('entities_search_trgm')")
                indexed = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM meta WHERE key = 'search_docs')")
                await self._check_embedding(conn)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=1, max_size=self._pool_size, init=register_vector,
            server_settings={"search_path": f'"{self._schema}", public'})
        if not indexed:  # once per store: from then on every write keeps its entities' documents current
            await self._index_unsearchable()
        await self.embed_stale()
        await self.build_indexes()

    async def _index_unsearchable(self) -> None:
        """Live entities without a search document (a store written before the index existed): give them one, a
        page at a time, each page under its scopes' write locks."""
        while True:
            keys: list[tuple[str, str]] = [(r["scope"], r["name"]) for r in await self._read(lambda conn: conn.fetch(
                "SELECT scope, name FROM entities WHERE NOT deleted AND search_doc IS NULL LIMIT 2000"))]
            if not keys:
                await self._read(lambda conn: conn.execute(
                    "INSERT INTO meta VALUES ('search_docs', 'filled') ON CONFLICT (key) DO NOTHING"))
                return

            async def run(conn: asyncpg.Connection, page: list[tuple[str, str]] = keys) -> None:
                await self._texts(conn, page, mark=True)

            await self._write({s for s, _ in keys}, run)

    async def _ensure_index(self, name: str, ddl: str, wanted: str = "true") -> None:
        """Build index `name` (CONCURRENTLY: the store keeps serving) if it is missing or invalid and `wanted` (a
        SQL condition) holds, with the parallel workers the spec allows."""
        async def run(conn: asyncpg.Connection) -> None:
            valid = await conn.fetchval(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = $1 AND n.nspname = $2",
                name, self._schema)
            if valid:
                return
            if valid is False:  # an interrupted concurrent build leaves an invalid index behind
                await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            if await conn.fetchval(f"SELECT {wanted}"):
                # For this session only: the pool resets it on release.
                await conn.execute(f"SET max_parallel_maintenance_workers = {int(self._index_workers)}")
                await conn.execute(ddl)

        await self._read(run)

    async def _ensure_vector_index(self) -> None:
        await self._ensure_index("entities_embedding_hnsw", "CREATE INDEX CONCURRENTLY IF NOT EXISTS"
                                 " entities_embedding_hnsw ON entities USING hnsw (embedding vector_cosine_ops)",
                                 "EXISTS (SELECT 1 FROM entities WHERE embedding IS NOT NULL)")

    async def _check_embedding(self, conn: asyncpg.Connection) -> None:
        meta = {r["key"]: r["value"] for r in await conn.fetch("SELECT key, value FROM meta")}
        want = {"embedding_model": self.embedding.model, "embedding_dim": str(self.embedding.dimension)}
        if "embedding_model" in meta:
            if (meta["embedding_model"], meta["embedding_dim"]) != (want["embedding_model"], want["embedding_dim"]):
                raise EmbeddingMismatch(
                    f"{self.name} was written with embedding model {meta['embedding_model']!r} (dimension "
                    f"{meta['embedding_dim']}), but the configured model is {want['embedding_model']!r} (dimension "
                    f"{want['embedding_dim']}); migrate with re-embedding instead of reusing this store")
            return
        want["schema_version"] = str(SCHEMA_VERSION)
        await conn.executemany("INSERT INTO meta VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2",
                               list(want.items()))

    async def close(self) -> None:
        await self._embeddings.settled()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable(f"{self.name} is not open")
        return self._pool

    async def _read(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        try:
            async with self._p().acquire() as conn:
                return await fn(conn)
        except (OSError, asyncpg.exceptions.ConnectionDoesNotExistError,
                asyncpg.exceptions.CannotConnectNowError) as exc:
            raise StoreUnavailable(f"{self.name}: {exc}") from exc

    async def _write(self, scopes: set[str], fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """One transaction holding the advisory lock of every scope it touches (taken in hash order)."""
        async def run(conn: asyncpg.Connection) -> T:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(s, 7) AS h"
                    " FROM unnest($1::text[]) AS s ORDER BY 1) AS x", sorted(scopes))
                return await fn(conn)

        return await self._read(run)

    # --- apply-if-newer --------------------------------------------------------------------------------------------
    async def _upsert(self, conn: asyncpg.Connection, sql: str, table: str, types: str, cols: str,
                      rows: list[tuple[Any, ...]]) -> list[asyncpg.Record]:
        if len(rows) < COPY_THRESHOLD:
            columns = list(zip(*rows, strict=True))
            return list(await conn.fetch(sql.format(src=_unnest(types, cols)), *[list(c) for c in columns]))
        stage = f"stage_{table}"
        names = [c.strip() for c in cols.split(",")]
        pg_types = [t.strip().removesuffix("[]") for t in types.split(",")]
        ddl = ", ".join(f"{n} {t}" for n, t in zip(names, pg_types, strict=True))
        # Per connection, emptied at every commit; binary COPY is the fastest way in for a backfill page.
        await conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} ({ddl}) ON COMMIT DELETE ROWS")
        await conn.copy_records_to_table(stage, records=rows, columns=names)
        return list(await conn.fetch(sql.format(src=f"{stage} AS u")))

    async def _apply_records(self, conn: asyncpg.Connection, records: Sequence[Record]) -> _Applied:
        out = _Applied()
        recs = newest_per_key(records)
        ents = [r for r in recs if isinstance(r, EntityRecord)]
        obs = [r for r in recs if isinstance(r, ObservationRecord)]
        rels = [r for r in recs if isinstance(r, RelationRecord)]
        if ents:
            incoming = {(r.scope, r.name): r for r in ents}
            rows = await self._upsert(conn, _UPSERT_ENTITIES, "entities", _E_TYPES, _E_COLS,
                                      [_entity_row(r) for r in ents])
            purges = []
            for row in rows:
                key = (row["scope"], row["name"])
                rec = incoming[key]
                if row["version"] == rec.version:
                    out.count += 1
                    if not row["deleted"]:
                        out.touched.add(key)
                if row["purged"] == rec.purged > 0:  # only this batch can have raised it (GREATEST)
                    purges.append((row["scope"], row["name"], row["purged"]))
            if purges:
                cols = [list(c) for c in zip(*purges, strict=True)]
                await conn.execute(
                    "DELETE FROM observations o USING unnest($1::text[], $2::text[], $3::int8[]) AS p(scope, name, pv)"
                    " WHERE o.scope = p.scope AND o.entity = p.name AND o.version < p.pv", *cols)
                await conn.execute(
                    "DELETE FROM relations r USING unnest($1::text[], $2::text[], $3::int8[]) AS p(scope, name, pv)"
                    " WHERE r.scope = p.scope AND (r.source = p.name OR r.target = p.name) AND r.version < p.pv",
                    *cols)
                out.touched |= {(s, n) for s, n, _ in purges}
        if obs:
            rows = await self._upsert(conn, _UPSERT_OBSERVATIONS, "observations", _O_TYPES, _O_COLS,
                                      [_observation_row(r) for r in obs])
            out.count += len(rows)
            out.touched |= {(row["scope"], row["entity"]) for row in rows}
        if rels:
            rows = await self._upsert(conn, _UPSERT_RELATIONS, "relations", _R_TYPES, _R_COLS,
                                      [_relation_row(r) for r in rels])
            out.count += len(rows)
        return out

    async def _texts(self, conn: asyncpg.Connection, keys: set[tuple[str, str]] | list[tuple[str, str]],
                     mark: bool, childless_only: bool = False, vectors: VectorMap | None = None,
                     loaded: bool = False) -> dict[tuple[str, str], str]:
        """The embedding text of each live entity among `keys`; with `mark`, recorded as the text wanted, and the
        entity's search document rewritten (what changes the one changes the other). A vector handed in (a
        backfill's) for exactly that text is stored by the same statement, and its entity left out of the answer:
        one UPDATE per page instead of a second transaction of one UPDATE per entity. With `loaded`, the vector is
        taken from those a bulk copy brought (`loaded_vectors`) for exactly that text, and the answer holds the
        entities whose stored vector still does not match."""
        if not keys:
            return {}
        scopes, names = [list(c) for c in zip(*keys, strict=True)]
        childless = (" AND NOT EXISTS (SELECT 1 FROM observations x WHERE x.scope = e.scope AND x.entity = e.name"
                     " AND NOT x.deleted)") if childless_only else ""
        rows = await conn.fetch(
            "SELECT e.scope, e.name, e.entity_type, COALESCE(array_agg(o.text ORDER BY o.created, o.text)"
            " FILTER (WHERE o.text IS NOT NULL), '{}') AS obs FROM entities e"
            " JOIN unnest($1::text[], $2::text[]) AS k(scope, name) ON e.scope = k.scope AND e.name = k.name"
            " LEFT JOIN observations o ON o.scope = e.scope AND o.entity = e.name AND NOT o.deleted"
            f" WHERE NOT e.deleted{childless} GROUP BY e.scope, e.name, e.entity_type", scopes, names)
        out = {(r["scope"], r["name"]): embedding_text(r["name"], r["entity_type"], tuple(r["obs"])) for r in rows}
        if mark and out and loaded:
            hashes = [text_hash(t) for t in out.values()]
            matched = await conn.fetch(
                "UPDATE entities e SET embed_hash = u.h, search_doc = u.d,"
                " embedding = COALESCE(lv.embedding, e.embedding),"
                " vector_hash = CASE WHEN lv.embedding IS NULL THEN e.vector_hash ELSE u.h END"
                " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(scope, name, h, d)"
                " LEFT JOIN LATERAL (SELECT l.embedding FROM loaded_vectors l WHERE l.scope = u.scope"
                " AND l.name = u.name AND l.hash = u.h LIMIT 1) AS lv ON true"
                " WHERE e.scope = u.scope AND e.name = u.name"
                " RETURNING e.scope, e.name, e.embedding IS NOT NULL AND e.vector_hash = e.embed_hash AS ok",
                [k[0] for k in out], [k[1] for k in out], hashes,
                [semantics.search_document(r["name"], r["entity_type"], r["obs"]) for r in rows])
            done = {(r["scope"], r["name"]) for r in matched if r["ok"]}
            return {k: t for k, t in out.items() if k not in done}
        if mark and out:
            hashes = [text_hash(t) for t in out.values()]
            given = [_given(vectors, key, h, self.embedding.dimension) for key, h in zip(out, hashes, strict=True)]
            await conn.execute(
                "UPDATE entities e SET embed_hash = u.h, search_doc = u.d,"
                " embedding = COALESCE(u.v, e.embedding), vector_hash = CASE WHEN u.v IS NULL THEN e.vector_hash"
                " ELSE u.h END FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::vector[])"
                " AS u(scope, name, h, d, v) WHERE e.scope = u.scope AND e.name = u.name",
                [k[0] for k in out], [k[1] for k in out], hashes,
                [semantics.search_document(r["name"], r["entity_type"], r["obs"]) for r in rows], given)
            if vectors is not None:
                return {k: t for (k, t), v in zip(out.items(), given, strict=True) if v is None}
        return out

    async def _store_vectors(self, ready: dict[tuple[str, str], tuple[str, Vector]]) -> None:
        rows = [(s, n, np.asarray(v, dtype=np.float32), text_hash(t)) for (s, n), (t, v) in sorted(ready.items())]

        async def run(conn: asyncpg.Connection) -> None:
            # Kept only if the entity still wants exactly this text (a newer write embeds its own).
            await conn.executemany(
                "UPDATE entities SET embedding = $3, vector_hash = $4 WHERE scope = $1 AND name = $2"
                " AND embed_hash = $4 AND NOT deleted", rows)

        # Under the scopes' advisory locks, like every write: taken alone, this UPDATE and a repair's DELETE of the
        # same entities locked rows in opposite orders and PostgreSQL broke the deadlock by failing one of them.
        await self._write({s for s, _ in ready}, run)

    async def _committed(self, scopes: set[str], body: Callable[[asyncpg.Connection], Awaitable[tuple[T, _Applied]]],
                         vectors: VectorMap | None = None) -> T:
        async def run(conn: asyncpg.Connection) -> tuple[T, dict[tuple[str, str], str]]:
            result, applied = await body(conn)
            return result, await self._texts(conn, applied.touched, mark=True, vectors=vectors)

        result, texts = await self._write(scopes, run)
        await self._embeddings.after_write(texts, vectors)
        return result

    async def _fetch(self, conn: asyncpg.Connection, keys: Sequence[RecordKey]) -> dict[RecordKey, Record]:
        out: dict[RecordKey, Record] = {}
        by_kind: dict[Kind, list[tuple[str, ...]]] = {Kind.ENTITY: [], Kind.OBSERVATION: [], Kind.RELATION: []}
        for kind, scope, parts in dict.fromkeys(keys):
            by_kind[kind].append((scope, *parts))
        if by_kind[Kind.ENTITY]:
            cols = [list(c) for c in zip(*by_kind[Kind.ENTITY], strict=True)]
            for r in await conn.fetch(
                    f"SELECT {_E_COLS} FROM entities JOIN unnest($1::text[], $2::text[]) AS k(s, n)"
                    " ON scope = k.s AND name = k.n", *cols):
                rec: Record = EntityRecord(r["scope"], r["name"], r["entity_type"], r["version"], r["created"],
                                           r["purged"], r["deleted"], _meta(r["metadata"]))
                out[rec.key] = rec
        if by_kind[Kind.OBSERVATION]:
            cols = [list(c) for c in zip(*by_kind[Kind.OBSERVATION], strict=True)]
            for r in await conn.fetch(
                    f"SELECT {_O_COLS} FROM observations JOIN unnest($1::text[], $2::text[], $3::text[])"
                    " AS k(s, e, t) ON scope = k.s AND entity = k.e AND text = k.t", *cols):
                rec = ObservationRecord(r["scope"], r["entity"], r["text"], r["version"], r["created"], r["deleted"])
                out[rec.key] = rec
        if by_kind[Kind.RELATION]:
            cols = [list(c) for c in zip(*by_kind[Kind.RELATION], strict=True)]
            for r in await conn.fetch(
                    f"SELECT {_R_COLS} FROM relations JOIN unnest($1::text[], $2::text[], $3::text[], $4::text[])"
                    " AS k(s, a, r, b) ON scope = k.s AND source = k.a AND relation_type = k.r AND target = k.b",
                    *cols):
                rec = RelationRecord(r["scope"], r["source"], r["relation_type"], r["target"], r["version"],
                                     r["deleted"], _meta(r["metadata"]))
                out[rec.key] = rec
        return out

    # --- the memory API --------------------------------------------------------------------------------------------
    async def _planned(self, scope: str, keys: list[RecordKey], plan: Plan[T], size: int) -> WriteResult[T]:
        async def body(conn: asyncpg.Connection) -> tuple[WriteResult[T], _Applied]:
            answer, effects = plan(await self._fetch(conn, keys))
            applied = await self._apply_records(conn, effects)
            return WriteResult(answer, effects), applied

        return await self._committed({scope}, body)

    # --- reads -----------------------------------------------------------------------------------------------------
    @staticmethod
    async def _entities(conn: asyncpg.Connection, scope: str, names: Sequence[str]) -> list[Entity]:
        if not names:
            return []
        rows = await conn.fetch(_ENTITIES_WHERE.format(cond="e.name = ANY($2::text[])"), scope, list(names))
        return [_entity(r) for r in rows]

    @staticmethod
    async def _relations_touching(conn: asyncpg.Connection, scope: str, names: Sequence[str]) -> list[Relation]:
        if not names:
            return []
        rows = await conn.fetch(
            "SELECT source, relation_type, target, metadata FROM relations WHERE scope = $1 AND NOT deleted"
            " AND (source = ANY($2::text[]) OR target = ANY($2::text[])) ORDER BY source, relation_type, target",
            scope, list(names))
        return [Relation(r["source"], r["target"], r["relation_type"], _meta(r["metadata"])) for r in rows]

    async def _graph(self, conn: asyncpg.Connection, scope: str, names: Sequence[str]) -> Graph:
        entities = await self._entities(conn, scope, names)
        return Graph(tuple(entities), tuple(await self._relations_touching(conn, scope, [e.name for e in entities])))

    async def read_graph(self, scope: str, cursor: str | None, limit: int) -> GraphPage:
        kind, after = decode_cursor(cursor) if cursor else (Kind.ENTITY, ("",))

        async def run(conn: asyncpg.Connection) -> GraphPage:
            entities: list[Entity] = []
            if kind == Kind.ENTITY:
                names = [r["name"] for r in await conn.fetch(
                    "SELECT name FROM entities WHERE scope = $1 AND NOT deleted AND name > $2 ORDER BY name"
                    " LIMIT $3", scope, after[0], limit + 1)]
                entities = await self._entities(conn, scope, names[:limit])
                if len(names) > limit:
                    return GraphPage(tuple(entities), (), encode_cursor(Kind.ENTITY, [names[limit - 1]]))
            room = limit - len(entities)
            rel_after = after if kind == Kind.RELATION else ("", "", "")
            rows = await conn.fetch(
                "SELECT source, relation_type, target, metadata FROM relations WHERE scope = $1 AND NOT deleted"
                " AND (source, relation_type, target) > ($2, $3, $4) ORDER BY source, relation_type, target"
                " LIMIT $5", scope, *rel_after, room + 1)
            rels = [Relation(r["source"], r["target"], r["relation_type"], _meta(r["metadata"])) for r in rows[:room]]
            nxt = None
            if len(rows) > room:
                resume = (rels[-1].source, rels[-1].relation_type, rels[-1].target) if rels else rel_after
                nxt = encode_cursor(Kind.RELATION, resume)
            return GraphPage(tuple(entities), tuple(rels), nxt)

        return await self._read(run)

    async def search_nodes(self, scope: str, query: str) -> Graph:
        needle = semantics.lowered(query)

        if len(needle) >= semantics.INDEXED_NEEDLE_CHARS:
            return await self._read(lambda conn: self._search_indexed(conn, scope, needle))

        async def run(conn: asyncpg.Connection) -> Graph:
            # Matched here with the one shared rule: PostgreSQL's lower() follows the server's locale.
            hits = {r["name"] for r in await conn.fetch(
                "SELECT name, entity_type FROM entities WHERE scope = $1 AND NOT deleted", scope)
                if semantics.search_hit(needle, r["name"], r["entity_type"])}
            hits |= {r["entity"] for r in await conn.fetch(
                "SELECT o.entity, o.text FROM observations o JOIN entities e ON e.scope = o.scope AND e.name = o.entity"
                " WHERE o.scope = $1 AND NOT o.deleted AND NOT e.deleted", scope)
                if semantics.search_hit(needle, r["text"])}
            return await self._graph(conn, scope, sorted(hits))

        return await self._read(run)

    async def _search_indexed(self, conn: asyncpg.Connection, scope: str, needle: str) -> Graph:
        """Candidates from the trigram index over the lowered documents (a case-sensitive LIKE, which pg_trgm's GIN
        index answers), then the shared rule on each, so the server's locale never decides a match."""
        pattern = "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        # Candidates and their observations in one round trip; relations only for the entities the rule keeps.
        # OFFSET 0 keeps the candidates' subquery apart, so they come from the trigram index alone: offered the scope
        # too, the planner ANDed the index's few rows with a bitmap of the scope's whole key range (4.6 of a
        # search's 6.8 ms at 100,000 entities).
        rows = await conn.fetch(_ENTITIES_WHERE.format(
            cond="(e.scope, e.name) IN (SELECT scope, name FROM entities WHERE search_doc LIKE $2 OFFSET 0)"),
            scope, pattern)
        hits = [e for e in map(_entity, rows) if semantics.entity_hit(needle, e)]
        return Graph(tuple(hits), tuple(await self._relations_touching(conn, scope, [e.name for e in hits])))

    async def open_nodes(self, scope: str, names: Sequence[str]) -> Graph:
        return await self._read(lambda conn: self._graph(conn, scope, list(dict.fromkeys(names))))

    async def semantic_search(self, scope: str, vector: Vector, limit: int, min_score: float | None,
                              entity_types: Sequence[str]) -> SearchResult:
        await self._embeddings.settled(scope)
        query = np.asarray(vector, dtype=np.float32)

        async def run(conn: asyncpg.Connection) -> SearchResult:
            async with conn.transaction():
                # The HNSW index spans every scope: keep scanning until `limit` rows of this scope are found.
                await conn.execute("SET LOCAL hnsw.iterative_scan = strict_order")
                rows = await conn.fetch(
                    "SELECT name, 1 - (embedding <=> $2) AS score FROM entities WHERE scope = $1 AND NOT deleted"
                    " AND embedding IS NOT NULL AND vector_hash = embed_hash"
                    " AND (cardinality($4::text[]) = 0 OR entity_type = ANY($4::text[]))"
                    " ORDER BY embedding <=> $2, name LIMIT $3", scope, query, limit, list(entity_types))
            hits = [(r["name"], float(r["score"])) for r in rows
                    if min_score is None or float(r["score"]) >= min_score]
            by_name = {e.name: e for e in await self._entities(conn, scope, [n for n, _ in hits])}
            results = tuple(ScoredEntity(by_name[n], s) for n, s in hits if n in by_name)
            rels = await self._relations_touching(conn, scope, [r.entity.name for r in results])
            return SearchResult(results, tuple(rels))

        return await self._read(run)

    # --- replication -----------------------------------------------------------------------------------------------
    async def apply(self, records: Sequence[Record], vectors: VectorMap | None = None) -> int:
        if not records:
            return 0

        async def body(conn: asyncpg.Connection) -> tuple[int, _Applied]:
            applied = await self._apply_records(conn, records)
            return applied.count, applied

        return await self._committed({r.scope for r in records}, body, vectors)

    async def replace_if(self, items: Sequence[tuple[RecordKey, Record | None, int | None]]) -> list[RecordKey]:
        if not items:
            return []

        async def body(conn: asyncpg.Connection) -> tuple[list[RecordKey], _Applied]:
            stored = await self._fetch(conn, [k for k, _, _ in items])
            moved: list[RecordKey] = []
            applied = _Applied()
            for key, record, expected in items:
                current = stored.get(key)
                if (current.version if current else None) != expected:
                    moved.append(key)
                    continue
                await self._remove(conn, key)
                if key[0] != Kind.RELATION:
                    applied.touched.add((key[1], key[2][0]))
                if record is not None:
                    got = await self._apply_records(conn, [record])
                    applied.touched |= got.touched
            return moved, applied

        return await self._committed({k[1] for k, _, _ in items}, body)

    @staticmethod
    async def _remove(conn: asyncpg.Connection, key: RecordKey) -> None:
        kind, scope, parts = key
        if kind == Kind.ENTITY:
            await conn.execute("DELETE FROM entities WHERE scope = $1 AND name = $2", scope, parts[0])
        elif kind == Kind.OBSERVATION:
            await conn.execute("DELETE FROM observations WHERE scope = $1 AND entity = $2 AND text = $3",
                               scope, *parts)
        else:
            await conn.execute("DELETE FROM relations WHERE scope = $1 AND source = $2 AND relation_type = $3"
                               " AND target = $4", scope, *parts)

    async def child_keys(self, scope: str, name: str) -> list[RecordKey]:
        async def run(conn: asyncpg.Connection) -> list[RecordKey]:
            obs: list[RecordKey] = [(Kind.OBSERVATION, scope, (name, r["text"])) for r in await conn.fetch(
                "SELECT text FROM observations WHERE scope = $1 AND entity = $2", scope, name)]
            rels: list[RecordKey] = [(Kind.RELATION, scope, (r["source"], r["relation_type"], r["target"]))
                                     for r in await conn.fetch(
                "SELECT source, relation_type, target FROM relations WHERE scope = $1 AND (source = $2"
                " OR target = $2)", scope, name)]
            return obs + rels

        return await self._read(run)

    async def load(self, records: Sequence[Record], vectors: VectorMap | None = None) -> int:
        """`apply` as a bulk copy's page: the same rows in the same transaction, but no entity's text is read back
        and no vector passed through an UPDATE. The entities whose text the page may have changed are marked
        (`embed_hash` NULL) and the page's vectors COPYed into `loaded_vectors`; `embed_stale` settles both once,
        when the copy ends. Measured at 20,000 entities (pages of 2,000, no proxy): 22k records/s applying them,
        43k loading them, plus 1.3 s settling at the end (docs/benchmarks.md, 2026-12-08)."""
        if not records:
            return 0

        async def run(conn: asyncpg.Connection) -> int:
            applied = await self._apply_records(conn, records)
            if applied.touched:
                scopes, names = [list(c) for c in zip(*applied.touched, strict=True)]
                await conn.execute(
                    "UPDATE entities e SET embed_hash = NULL FROM unnest($1::text[], $2::text[]) AS k(scope, name)"
                    " WHERE e.scope = k.scope AND e.name = k.name AND e.embed_hash IS NOT NULL", scopes, names)
            if vectors:
                await conn.copy_records_to_table(
                    "loaded_vectors", columns=["scope", "name", "hash", "embedding"],
                    records=[(s, n, h, np.asarray(v, dtype=np.float32)) for (s, n), (h, v) in vectors.items()
                             if len(v) == self.embedding.dimension])
            return applied.count

        return await self._write({r.scope for r in records}, run)

    async def embed_stale(self) -> int:
        """Every live entity whose text or vector is unsettled (a bulk copy's, a write whose embedding failed, a
        store written before search documents), a chunk at a time under its scopes' write locks, so a write racing
        it never has its text overwritten by an older one: text and search document written, the copied vector
        that matches taken, the rest embedded."""
        await self._embeddings.settled()
        # One pass that stops at a chunk's worth: on a settled store (every open) that is all there is to do.
        some = await self._read(lambda conn: conn.fetchval(
            f"SELECT count(*) FROM (SELECT 1 FROM entities WHERE NOT deleted AND {_UNSETTLED} LIMIT $1) AS x",
            _SETTLE_CHUNK))
        if not some:
            return 0
        unsettled, live = (some, 0) if some < _SETTLE_CHUNK else await self._read(lambda conn: conn.fetchrow(
            f"SELECT count(*) FILTER (WHERE {_UNSETTLED}), count(*) FROM entities WHERE NOT deleted"))
        # When most of the table is to be rewritten (a bulk copy's end), maintaining the trigram index row by row
        # costs three times what building it afresh does (measured at 20,000 entities: the settling UPDATEs took
        # 1.6 s with it, 0.55 s without, and the build 0.3 s): it goes, as pg_restore does, and comes back once.
        # Meanwhile a SearchNodes here reads the table instead of the index: slower, not different.
        # `build_indexes` builds it again (and `open`, should this proxy stop first).
        if unsettled >= _SETTLE_CHUNK and 2 * unsettled >= live:
            await self._read(lambda conn: conn.execute("DROP INDEX CONCURRENTLY IF EXISTS entities_search_trgm"))
        return await self._settle()

    async def build_indexes(self) -> None:
        """The search index, if settling a bulk copy dropped it, and the vector index, once vectors exist: each
        built CONCURRENTLY (the store keeps serving) with the workers `index_workers` allows."""
        await self._ensure_index("entities_search_trgm", _SEARCH_INDEX.format(how="CONCURRENTLY",
                                                                              pending=_SEARCH_PENDING))
        await self._ensure_vector_index()

    async def _settle(self) -> int:
        embedded, after = 0, ("", "")
        while True:
            async def unsettled(conn: asyncpg.Connection, pos: tuple[str, str] = after) -> list[asyncpg.Record]:
                return list(await conn.fetch(
                    f"SELECT scope, name FROM entities WHERE NOT deleted AND {_UNSETTLED} AND (scope, name) > ($1, $2)"
                    " ORDER BY scope, name LIMIT $3", *pos, _SETTLE_CHUNK))

            keys = [(r["scope"], r["name"]) for r in await self._read(unsettled)]
            if not keys:
                break

            async def run(conn: asyncpg.Connection, chunk: list[tuple[str, str]] = keys) -> dict[tuple[str, str], str]:
                texts = await self._texts(conn, chunk, mark=True, loaded=True)
                scopes, names = [list(c) for c in zip(*chunk, strict=True)]
                await conn.execute(  # taken or not, a loaded vector of a settled entity is of no further use
                    "DELETE FROM loaded_vectors l USING unnest($1::text[], $2::text[]) AS k(scope, name)"
                    " WHERE l.scope = k.scope AND l.name = k.name", scopes, names)
                return texts

            texts = await self._write({s for s, _ in keys}, run)
            await self._embeddings.embed(texts)
            embedded += len(texts)
            after = keys[-1]
        return embedded

    async def get_records(self, keys: Sequence[RecordKey]) -> list[Record]:
        found = await self._read(lambda conn: self._fetch(conn, keys))
        return [found[k] for k in keys if k in found]

    async def list_records(self, after: RecordKey | None, limit: int, tombstones: bool = False,
                           until: int = 0) -> RecordPage:
        async def run(conn: asyncpg.Connection) -> RecordPage:
            out: list[Record] = []
            for kind, pos in kinds_after(after):
                if len(out) >= limit:
                    break
                out.extend(await self._list_kind(conn, kind, pos, limit - len(out), tombstones, until))
            return RecordPage(tuple(out), out[-1].key if len(out) >= limit else None)

        return await self._read(run)

    @staticmethod
    async def _list_kind(conn: asyncpg.Connection, kind: Kind, pos: tuple[str, ...], limit: int,
                         tombstones: bool, until: int = 0) -> list[Record]:
        live = "" if tombstones else "AND NOT deleted"
        # The watermark is the last parameter: $2.. are the cursor's parts.
        bound: tuple[int, ...] = (until,) if until else ()
        upto = f"AND {{}}version <= ${2 + len(pos)}" if until else ""
        if kind == Kind.ENTITY:
            where = "AND (scope, name) > ($2, $3)" if pos else ""
            return [EntityRecord(r["scope"], r["name"], r["entity_type"], r["version"], r["created"], r["purged"],
                                 r["deleted"], _meta(r["metadata"])) for r in await conn.fetch(
                f"SELECT {_E_COLS} FROM entities WHERE TRUE {live} {where} {upto.format('')}"
                " ORDER BY scope, name LIMIT $1", limit, *pos, *bound)]
        if kind == Kind.OBSERVATION:
            where = "AND (o.scope, o.entity, o.text) > ($2, $3, $4)" if pos else ""
            join = "" if tombstones else (" JOIN entities e ON e.scope = o.scope AND e.name = o.entity"
                                          " AND NOT e.deleted")
            if pos and not tombstones:
                # The entities' side starts at the cursor too: PostgreSQL merge-joins the two keys' orders, and
                # without this bound walked the entities from the first one for every page (1.3 s a page at a
                # million entities, so a Verify of them slowed to 1,700 records/s; 5 ms with it).
                where += " AND (e.scope, e.name) >= ($2, $3)"
            alive = "" if tombstones else "AND NOT o.deleted"
            return [ObservationRecord(r["scope"], r["entity"], r["text"], r["version"], r["created"], r["deleted"])
                    for r in await conn.fetch(
                f"SELECT o.scope, o.entity, o.text, o.version, o.created, o.deleted FROM observations o{join}"
                f" WHERE TRUE {alive} {where} {upto.format('o.')} ORDER BY o.scope, o.entity, o.text LIMIT $1",
                limit, *pos, *bound)]
        where = "AND (scope, source, relation_type, target) > ($2, $3, $4, $5)" if pos else ""
        return [RelationRecord(r["scope"], r["source"], r["relation_type"], r["target"], r["version"], r["deleted"],
                               _meta(r["metadata"])) for r in await conn.fetch(
            f"SELECT {_R_COLS} FROM relations WHERE TRUE {live} {where} {upto.format('')}"
            " ORDER BY scope, source, relation_type, target LIMIT $1", limit, *pos, *bound)]

    async def get_vectors(self, keys: Sequence[tuple[str, str]],
                          childless_only: bool = False) -> dict[tuple[str, str], tuple[str, Vector]]:
        await self._embeddings.settled(keys=set(keys))

        async def run(conn: asyncpg.Connection) -> dict[tuple[str, str], tuple[str, Vector]]:
            # vector_hash = embed_hash: the vector is of the entity's current text (embed_hash is set in the
            # transaction that changes the text), so the text itself need not be rebuilt.
            childless = (" AND NOT EXISTS (SELECT 1 FROM observations x WHERE x.scope = e.scope"
                         " AND x.entity = e.name AND NOT x.deleted)") if childless_only else ""
            unique = list(dict.fromkeys(keys))
            rows = await conn.fetch(
                "SELECT e.scope, e.name, e.vector_hash, e.embedding FROM entities e JOIN unnest($1::text[], $2::text[])"
                " AS k(scope, name) ON e.scope = k.scope AND e.name = k.name"
                f" WHERE NOT e.deleted AND e.embedding IS NOT NULL AND e.vector_hash = e.embed_hash{childless}",
                [k[0] for k in unique], [k[1] for k in unique])
            return {(r["scope"], r["name"]): (r["vector_hash"], _array(r["embedding"])) for r in rows}

        return await self._read(run)

    async def count(self, scope: str | None = None) -> Counts:
        async def run(conn: asyncpg.Connection) -> Counts:
            cond, args = ("AND x.scope = $1", (scope,)) if scope is not None else ("", ())
            return Counts(*[int(await conn.fetchval(f"SELECT count(*) FROM {live} {cond}", *args))
                            for live in _LIVE_RECORDS])

        return await self._read(run)

    async def max_version(self) -> int:
        async def run(conn: asyncpg.Connection) -> int:
            return max([int(await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}"))
                        for table in ("entities", "observations", "relations")])

        return await self._read(run)

    async def scope_counts(self) -> dict[str, int]:
        """Live records per scope, as `count` counts them."""
        async def run(conn: asyncpg.Connection) -> dict[str, int]:
            out: dict[str, int] = {}
            for live in _LIVE_RECORDS:
                for scope, n in await conn.fetch(f"SELECT x.scope, count(*) FROM {live} GROUP BY x.scope"):
                    out[scope] = out.get(scope, 0) + int(n)
            return out

        return await self._read(run)

    async def purge_tombstones(self, before_version: int) -> int:
        async def run(conn: asyncpg.Connection) -> int:
            n = 0
            for table in ("observations", "relations", "entities"):
                status = await conn.execute(f"DELETE FROM {table} WHERE deleted AND version < $1", before_version)
                n += int(status.split()[-1])
            return n

        return await self._read(run)
