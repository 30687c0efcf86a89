"""The embedded default store: one SQLite file (WAL), exact cosine search with numpy.

Every write, from the API or from replication, goes through `_Txn.apply_record`, the single place where
apply-if-newer, tombstones and entity purges are decided. The API operations only add MCP semantics on top.

SQLite is synchronous, so a worker thread owns the connection and the in-memory vector index; coroutines hand it
work through `_call`. All embedded stores of a process share that one thread: their calls are sub-millisecond, and
two threads handing results back to the event loop under the GIL cost more than running one after the other (a
dual-write to two embedded stores measured 2.5x a single write on separate threads, 1.6x on a shared one).

Embeddings are computed after the write commits (the model must not run inside a transaction), in the background:
a write is acknowledged once committed, so the model is never idle waiting for clients to come back, and concurrent
writers fill whole batches. Three rules keep that safe:
- a semantic search in a scope first waits for that scope's pending embeddings (read-your-writes);
- when more than `max_pending_texts` wait for the model, writers wait for their own (backpressure, bounded memory);
- a vector is stored only if the entity's text has not changed since (`embed_hash` guard), and a crash before it is
  stored is healed at start-up, where every entity whose vector is stale is embedded again.

Vectors are kept in their own table, apart from the entity rows: a 1.5 KB blob inside a WITHOUT ROWID row spills to
overflow pages and made every entity lookup and update several times slower (SQLite advises WITHOUT ROWID for small
rows only). `SearchNodes` finds its candidates in a trigram index (FTS5 over `search_docs`, one document per live
entity, see `semantics.search_document`), kept in the same transaction as the rows by the same bookkeeping that
marks an entity's vector stale, and checks each candidate with the shared matching rule. The in-memory index holds
a scope's vectors from its first semantic search on, not from `open`: a store that is only written to (a migration's
target during the backfill, the old primary in the mirror window) or a scope nobody searches costs no memory for
vectors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from adapters import semantics
from adapters.base import BACKGROUND, ExportPage, NoBulkPath, VectorMap, WriteResult
from adapters.embedder import Embedder, EmbeddingInfo, Vector
from adapters.embedding_queue import PendingEmbeddings
from adapters.errors import EmbeddingMismatch, StoreUnavailable
from adapters.export import vector_keys
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
    load_metadata,
    text_hash,
)
from adapters.vector_index import VectorIndex

T = TypeVar("T")
SCHEMA_VERSION = 3  # 2: vectors moved out of `entities` into `vectors`; 3: the search index (both built on open)
SMALL_JOB = 16  # records (or names) a job may touch and still run inline on the event loop
log = logging.getLogger("memshift.store.embedded")

_ENTITIES = """
CREATE TABLE IF NOT EXISTS entities (
    scope TEXT NOT NULL, name TEXT NOT NULL, entity_type TEXT NOT NULL, metadata TEXT NOT NULL,
    version INTEGER NOT NULL, created INTEGER NOT NULL, purged INTEGER NOT NULL, deleted INTEGER NOT NULL,
    embed_hash TEXT,
    PRIMARY KEY (scope, name)) WITHOUT ROWID;
"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
""" + _ENTITIES + """
CREATE TABLE IF NOT EXISTS vectors (
    scope TEXT NOT NULL, name TEXT NOT NULL, hash TEXT NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (scope, name));
CREATE TABLE IF NOT EXISTS observations (
    scope TEXT NOT NULL, entity TEXT NOT NULL, text TEXT NOT NULL,
    version INTEGER NOT NULL, created INTEGER NOT NULL, deleted INTEGER NOT NULL,
    PRIMARY KEY (scope, entity, text)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS relations (
    scope TEXT NOT NULL, source TEXT NOT NULL, relation_type TEXT NOT NULL, target TEXT NOT NULL,
    metadata TEXT NOT NULL, version INTEGER NOT NULL, deleted INTEGER NOT NULL,
    PRIMARY KEY (scope, source, relation_type, target)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS relations_by_target ON relations (scope, target);
CREATE TABLE IF NOT EXISTS search_docs (
    id INTEGER PRIMARY KEY, scope TEXT NOT NULL, name TEXT NOT NULL, text TEXT NOT NULL, UNIQUE (scope, name));
CREATE VIRTUAL TABLE IF NOT EXISTS search_index USING fts5(
    text, content='search_docs', content_rowid='id', tokenize='trigram case_sensitive 1', detail=none);
"""


@dataclass
class _Txn:
    """The record rules, inside one open SQLite transaction. Collects which entities need re-embedding."""

    conn: sqlite3.Connection
    touched: set[tuple[str, str]] = field(default_factory=set)
    removed: set[tuple[str, str]] = field(default_factory=set)

    def entity(self, scope: str, name: str) -> EntityRecord | None:
        row = self.conn.execute(
            "SELECT entity_type, metadata, version, created, purged, deleted FROM entities"
            " WHERE scope=? AND name=?", (scope, name)).fetchone()
        if row is None:
            return None
        return EntityRecord(scope, name, row[0], row[2], row[3], row[4], bool(row[5]), load_metadata(row[1]))

    def _purged(self, scope: str, name: str) -> int:
        row = self.conn.execute("SELECT purged FROM entities WHERE scope=? AND name=?", (scope, name)).fetchone()
        return int(row[0]) if row else 0

    def observation(self, scope: str, entity: str, text: str) -> ObservationRecord | None:
        row = self.conn.execute(
            "SELECT version, created, deleted FROM observations WHERE scope=? AND entity=? AND text=?",
            (scope, entity, text)).fetchone()
        return None if row is None else ObservationRecord(scope, entity, text, row[0], row[1], bool(row[2]))

    def relation(self, scope: str, source: str, rtype: str, target: str) -> RelationRecord | None:
        row = self.conn.execute(
            "SELECT metadata, version, deleted FROM relations"
            " WHERE scope=? AND source=? AND relation_type=? AND target=?", (scope, source, rtype, target)).fetchone()
        if row is None:
            return None
        return RelationRecord(scope, source, rtype, target, row[1], bool(row[2]), load_metadata(row[0]))

    def get(self, key: RecordKey) -> Record | None:
        kind, scope, parts = key
        if kind == Kind.ENTITY:
            return self.entity(scope, parts[0])
        if kind == Kind.OBSERVATION:
            return self.observation(scope, parts[0], parts[1])
        return self.relation(scope, parts[0], parts[1], parts[2])

    def remove(self, key: RecordKey) -> None:
        """Drop a key's row outright, `purged` mark included (reconciliation only)."""
        kind, scope, parts = key
        if kind == Kind.ENTITY:
            self.conn.execute("DELETE FROM entities WHERE scope=? AND name=?", (scope, parts[0]))
            self.conn.execute("DELETE FROM vectors WHERE scope=? AND name=?", (scope, parts[0]))
            self.removed.add((scope, parts[0]))
            self.touched.discard((scope, parts[0]))
        elif kind == Kind.OBSERVATION:
            self.conn.execute("DELETE FROM observations WHERE scope=? AND entity=? AND text=?", (scope, *parts))
            self.touched.add((scope, parts[0]))
        else:
            self.conn.execute(
                "DELETE FROM relations WHERE scope=? AND source=? AND relation_type=? AND target=?", (scope, *parts))

    def apply_record(self, rec: Record) -> bool:
        """Apply-if-newer. Returns True when the record replaced (or created) the stored one."""
        if isinstance(rec, EntityRecord):
            return self._apply_entity(rec)
        if isinstance(rec, ObservationRecord):
            if rec.version < self._purged(rec.scope, rec.entity):
                return False  # an entity tombstone newer than this observation hides it
            stored = self.observation(rec.scope, rec.entity, rec.text)
            if stored is not None and stored.version >= rec.version:
                return False
            self.conn.execute(
                "INSERT INTO observations VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET version=excluded.version,"
                " created=excluded.created, deleted=excluded.deleted",
                (rec.scope, rec.entity, rec.text, rec.version, rec.created, int(rec.deleted)))
            self.touched.add((rec.scope, rec.entity))
            return True
        if rec.version < max(self._purged(rec.scope, rec.source), self._purged(rec.scope, rec.target)):
            return False
        stored_rel = self.relation(rec.scope, rec.source, rec.relation_type, rec.target)
        if stored_rel is not None and stored_rel.version >= rec.version:
            return False
        self.conn.execute(
            "INSERT INTO relations VALUES (?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET metadata=excluded.metadata,"
            " version=excluded.version, deleted=excluded.deleted",
            (rec.scope, rec.source, rec.relation_type, rec.target, dump_metadata(rec.metadata), rec.version,
             int(rec.deleted)))
        return True

    def _apply_entity(self, rec: EntityRecord) -> bool:
        stored = self.entity(rec.scope, rec.name)
        old_purged = stored.purged if stored else 0
        purged = max(old_purged, rec.purged)
        replaced = stored is None or rec.version > stored.version
        if replaced:
            self.conn.execute(
                "INSERT INTO entities (scope, name, entity_type, metadata, version, created, purged, deleted)"
                " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET entity_type=excluded.entity_type,"
                " metadata=excluded.metadata, version=excluded.version, created=excluded.created,"
                " purged=excluded.purged, deleted=excluded.deleted",
                (rec.scope, rec.name, rec.entity_type, dump_metadata(rec.metadata), rec.version, rec.created, purged,
                 int(rec.deleted)))
        elif purged > old_purged:
            # A late tombstone loses to a newer incarnation but still purges the children older than it.
            self.conn.execute("UPDATE entities SET purged=? WHERE scope=? AND name=?", (purged, rec.scope, rec.name))
        if purged > old_purged:
            self.conn.execute(
                "DELETE FROM observations WHERE scope=? AND entity=? AND version<?", (rec.scope, rec.name, purged))
            # One index each: `source=? OR target=?` scanned the scope, and so did a DELETE by target until told
            # which index to use.
            self.conn.execute("DELETE FROM relations WHERE scope=? AND source=? AND version<?",
                              (rec.scope, rec.name, purged))
            self.conn.execute("DELETE FROM relations INDEXED BY relations_by_target WHERE scope=? AND target=?"
                              " AND version<?", (rec.scope, rec.name, purged))
        key = (rec.scope, rec.name)
        if replaced and rec.deleted:
            self.conn.execute("UPDATE entities SET embed_hash=NULL WHERE scope=? AND name=?", key)
            self.conn.execute("DELETE FROM vectors WHERE scope=? AND name=?", key)
            self.removed.add(key)
            self.touched.discard(key)
        elif replaced or purged > old_purged:
            self.touched.add(key)
        return replaced

    def current_parts(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, tuple[str, ...]]]:
        """Type and observations (in order) of each live entity among `keys`: two queries per scope, whatever the
        number of entities."""
        out: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
        for scope, names in _by_scope(keys).items():
            arg = json.dumps(names)
            obs: dict[str, list[str]] = {}
            for entity, text in self.conn.execute(
                    "SELECT entity, text FROM observations WHERE scope=? AND deleted=0 AND entity IN"
                    " (SELECT value FROM json_each(?)) ORDER BY entity, created, text", (scope, arg)).fetchall():
                obs.setdefault(entity, []).append(text)
            for name, etype in self.conn.execute(
                    "SELECT name, entity_type FROM entities WHERE scope=? AND deleted=0"
                    " AND name IN (SELECT value FROM json_each(?))", (scope, arg)).fetchall():
                out[(scope, name)] = (etype, tuple(obs.get(name, ())))
        return out

    def embedding_texts(self) -> dict[tuple[str, str], str]:
        """The texts of every touched live entity, each marked as wanting the vector of exactly that text; the
        search index follows the same entities (what changes an entity's text changes its search document)."""
        parts = self.current_parts(self.touched)
        for key in self.touched | self.removed:
            index_document(self.conn, key, parts.get(key))
        out: dict[tuple[str, str], str] = {}
        for (scope, name), (etype, obs) in parts.items():
            text = out[(scope, name)] = embedding_text(name, etype, obs)
            self.conn.execute(
                "UPDATE entities SET embed_hash=? WHERE scope=? AND name=?", (text_hash(text), scope, name))
        return out


def index_document(conn: sqlite3.Connection, key: tuple[str, str], parts: tuple[str, tuple[str, ...]] | None) -> None:
    """Make the search index hold the document of `key`'s entity (type and observations in `parts`), or none for an
    entity that is not live. The FTS5 table indexes `search_docs`' text: its old text is handed back to delete."""
    row = conn.execute("SELECT id, text FROM search_docs WHERE scope=? AND name=?", key).fetchone()
    doc = None if parts is None else semantics.search_document(key[1], parts[0], parts[1])
    if row is not None:
        if row[1] == doc:
            return
        conn.execute("INSERT INTO search_index(search_index, rowid, text) VALUES ('delete', ?, ?)", row)
    if doc is None:
        if row is not None:
            conn.execute("DELETE FROM search_docs WHERE id=?", (row[0],))
        return
    if row is None:
        doc_id = conn.execute("INSERT INTO search_docs (scope, name, text) VALUES (?,?,?)", (*key, doc)).lastrowid
    else:
        doc_id = row[0]
        conn.execute("UPDATE search_docs SET text=? WHERE id=?", (doc, doc_id))
    conn.execute("INSERT INTO search_index(rowid, text) VALUES (?, ?)", (doc_id, doc))


def _build_search_index(conn: sqlite3.Connection) -> None:
    """A file written before the search index existed: index every live entity once, in one transaction."""
    if conn.execute("SELECT 1 FROM meta WHERE key='search_index'").fetchone() is not None:
        return
    with _immediate(conn):
        conn.execute("DELETE FROM search_docs")
        conn.execute(
            "INSERT INTO search_docs (scope, name, text) SELECT e.scope, e.name, search_document(e.name, e.entity_type,"
            " (SELECT json_group_array(o.text) FROM observations o WHERE o.scope=e.scope AND o.entity=e.name"
            " AND o.deleted=0)) FROM entities e WHERE e.deleted=0")
        conn.execute("INSERT INTO search_index(search_index) VALUES ('rebuild')")
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('search_index', '1')")
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed when the block ends, rolled back when it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _by_scope(keys: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(scope, name) keys grouped per scope: one query per scope answers for all its names."""
    out: dict[str, list[str]] = {}
    for scope, name in keys:
        out.setdefault(scope, []).append(name)
    return out


# Live entities without a vector of their current text (a crash between commit and embedding, or data copied
# without vectors).
_STALE = ("SELECT e.scope, e.name FROM entities e LEFT JOIN vectors v ON v.scope=e.scope AND v.name=e.name"
          " WHERE e.deleted=0 AND (e.embed_hash IS NULL OR v.hash IS NULL OR v.hash<>e.embed_hash)")


def _upgrade(conn: sqlite3.Connection) -> None:
    """Schema 1 kept each vector inside its entity row: move them to `vectors` and rebuild `entities` without
    them, in one transaction (an interrupted upgrade leaves the file as it was)."""
    if "vector" not in {row[1] for row in conn.execute("PRAGMA table_info(entities)")}:
        return
    with _immediate(conn):
        conn.execute("INSERT OR REPLACE INTO vectors SELECT scope, name, vector_hash, vector FROM entities"
                     " WHERE vector IS NOT NULL AND vector_hash IS NOT NULL AND deleted=0")
        conn.execute("ALTER TABLE entities RENAME TO entities_v1")
        conn.execute(_ENTITIES)
        conn.execute("INSERT INTO entities SELECT scope, name, entity_type, metadata, version, created, purged,"
                     " deleted, embed_hash FROM entities_v1")
        conn.execute("DROP TABLE entities_v1")
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
    log.info("upgraded the embedded store's schema", extra={"schema_version": SCHEMA_VERSION})


_SQLITE_THREAD: ThreadPoolExecutor | None = None


# The vectors of the current text of the live entities from (scope, name) ?1,?2 to ?3,?4.
_VECTORS_IN_RANGE = ("SELECT e.scope, e.name, v.hash, v.vector FROM entities e JOIN vectors v ON v.scope=e.scope"
                     " AND v.name=e.name AND v.hash=e.embed_hash WHERE (e.scope, e.name) >= (?1, ?2)"
                     " AND (e.scope, e.name) <= (?3, ?4) AND e.deleted=0")
_CHILDLESS = (" AND NOT EXISTS (SELECT 1 FROM observations o WHERE o.scope=e.scope AND o.entity=e.name"
              " AND o.deleted=0)")


def _page_vectors(conn: sqlite3.Connection, records: Sequence[Record]) -> dict[tuple[str, str], tuple[str, Vector]]:
    """`get_vectors` of a page's `vector_keys`. A page is one stretch of record order, so the entities it names lie
    between the first and the last of them: one range scan, filtered to exactly those named (an entity in the range
    may be named by none, e.g. a childless one inside a page of observations)."""
    out: dict[tuple[str, str], tuple[str, Vector]] = {}
    for keys, where in zip(vector_keys(records), (_CHILDLESS, ""), strict=True):
        if not keys:
            continue
        named = set(keys)
        for scope, name, h, vector in conn.execute(_VECTORS_IN_RANGE + where, (*min(keys), *max(keys))):
            if (scope, name) in named:
                out[(scope, name)] = (h, np.frombuffer(vector, dtype=np.float32))  # no copy
    return out


def _sqlite_thread() -> ThreadPoolExecutor:
    global _SQLITE_THREAD
    if _SQLITE_THREAD is None:
        _SQLITE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
    return _SQLITE_THREAD


_SQLITE_READER: ThreadPoolExecutor | None = None


def _reader_thread() -> ThreadPoolExecutor:
    global _SQLITE_READER
    if _SQLITE_READER is None:
        _SQLITE_READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-read")
    return _SQLITE_READER


INLINE_SEARCH_ROWS = 4096
CHECKPOINT_EVERY = 200  # writes between WAL checkpoints (on the worker thread)
# Writes between refreshes of the query planner's statistics (on the worker thread, with a checkpoint). Without
# statistics SQLite judged a scope's whole key range as cheap as an index lookup by target (the key covers every
# column): 129 ms instead of 0.06 at 125,000 relations a scope. Sampled, so a refresh costs milliseconds at any size.
ANALYZE_EVERY = 10_000


# The live records of each kind, as `count` and `scope_counts` count them (`x` the counted row): an observation counts
# only while its entity is live, as `list_records` shows it.
_LIVE_RECORDS = ("entities x WHERE x.deleted=0",
                 "observations x JOIN entities e ON e.scope=x.scope AND e.name=x.entity AND e.deleted=0"
                 " WHERE x.deleted=0",
                 "relations x WHERE x.deleted=0")


class EmbeddedBackend(PlannedWrites, NoBulkPath):
    """SQLite + numpy. `path=":memory:"` keeps everything in memory (tests, benchmarks)."""

    def __init__(self, path: str | Path, embedder: Embedder, max_pending_texts: int = 128) -> None:
        self._path = str(path)
        self._embedder = embedder
        self._embeddings = PendingEmbeddings(embedder, self._store_ready, max_pending_texts)
        self._executor = _sqlite_thread()
        self._conn_lock = threading.Lock()  # the connection is used by the worker thread and, for small jobs, inline
        self._conn: sqlite3.Connection | None = None
        # Long reads (a backfill's or Verify's pages, counting the store) on a connection and thread of their own:
        # with WAL they read while the writer writes, so an agent's write never queues behind one (counting a
        # million entities held every write for 1.6 s when StartMigration ran it on the writer's thread).
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._index = VectorIndex(embedder.info.dimension)
        self._loaded: set[str] = set()  # scopes whose vectors the index holds (from their first search on)
        self._commits = 0
        self._checkpoint: asyncio.Future[None] | None = None

    @property
    def name(self) -> str:
        return f"sqlite:{Path(self._path).name}"

    @property
    def embedding(self) -> EmbeddingInfo:
        return self._embedder.info

    # --- plumbing --------------------------------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any, small: bool = False) -> T:
        """Run `fn` against the connection. A small job (a few rows: an agent's typical write) runs right here on
        the event loop when the connection is free — a thread hand-off costs more than the job; anything else, or
        a small job that finds the connection busy, goes to the worker thread, so the loop never waits for a bulk
        job's lock."""
        if self._conn is None:
            raise StoreUnavailable(f"{self.name} is not open")
        if small and not BACKGROUND.get() and self._conn_lock.acquire(blocking=False):
            try:
                return fn(*args)
            finally:
                self._conn_lock.release()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._locked, fn, *args)

    def _connection(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    async def _bulk_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a long read `fn` in one read transaction (one snapshot) on the reader connection. An in-memory
        store has no second connection to the same data: it reads on the writer's."""
        if self._conn is None:
            raise StoreUnavailable(f"{self.name} is not open")
        if self._path == ":memory:":
            return await self._call(lambda: fn(self._connection()))
        return await asyncio.get_running_loop().run_in_executor(_reader_thread(), self._read_snapshot, fn)

    def _read_snapshot(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._reader_lock:
            if self._conn is None:
                raise StoreUnavailable(f"{self.name} is not open")
            if self._reader is None:
                reader = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
                reader.execute("PRAGMA busy_timeout=5000")
                reader.execute("PRAGMA query_only=1")
                self._reader = reader
            self._reader.execute("BEGIN")
            try:
                return fn(self._reader)
            finally:
                self._reader.execute("COMMIT")

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._conn_lock:
            return fn(*args)

    def _write(self, body: Callable[[_Txn], T]) -> tuple[T, dict[tuple[str, str], str], set[tuple[str, str]]]:
        assert self._conn is not None
        txn = _Txn(self._conn)
        with _immediate(self._conn):
            result = body(txn)
            texts = txn.embedding_texts()
        for scope, name in txn.removed:
            self._index.remove(scope, name)
        return result, texts, txn.removed

    async def _write_and_embed(self, body: Callable[[_Txn], T], vectors: VectorMap | None = None,
                               size: int = SMALL_JOB + 1) -> T:
        written: tuple[T, dict[tuple[str, str], str], set[tuple[str, str]]] = await self._call(
            self._write, body, small=size <= SMALL_JOB)
        self._commits += 1
        if self._commits % CHECKPOINT_EVERY == 0 and self._checkpoint is None:
            self._checkpoint = asyncio.ensure_future(self._call(
                self._wal_checkpoint, self._commits % ANALYZE_EVERY == 0))
            self._checkpoint.add_done_callback(self._checkpointed)
        await self._embeddings.after_write(written[1], vectors)
        return written[0]

    def _wal_checkpoint(self, analyze: bool = False) -> None:
        assert self._conn is not None
        if analyze:
            self._conn.execute("ANALYZE")
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _checkpointed(self, task: asyncio.Future[None]) -> None:
        self._checkpoint = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("WAL checkpoint failed; the next one retries", exc_info=task.exception())

    async def _store_ready(self, ready: dict[tuple[str, str], tuple[str, Vector]]) -> None:
        await self._call(self._store_vectors, ready, small=len(ready) <= SMALL_JOB)

    def _store_vectors(self, ready: dict[tuple[str, str], tuple[str, Vector]]) -> None:
        assert self._conn is not None
        with _immediate(self._conn):
            for (scope, name), (text, vec) in ready.items():
                h = text_hash(text)
                row = self._conn.execute("SELECT entity_type FROM entities WHERE scope=? AND name=? AND embed_hash=?"
                                         " AND deleted=0", (scope, name, h)).fetchone()
                if row is None:
                    continue  # the text changed meanwhile; that write embeds its own text
                self._conn.execute(
                    "INSERT INTO vectors VALUES (?,?,?,?) ON CONFLICT DO UPDATE SET hash=excluded.hash,"
                    " vector=excluded.vector", (scope, name, h, vec.astype(np.float32).tobytes()))
                if scope in self._loaded:
                    self._index.upsert(scope, name, row[0], vec)

    # --- lifecycle -------------------------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        stale = await loop.run_in_executor(self._executor, self._open_sync)
        await self._embeddings.embed(stale)

    def _open_sync(self) -> dict[tuple[str, str], str]:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            # SQLite checkpoints the WAL inside whichever COMMIT crosses 1000 pages, and an agent's small write
            # commits on the event loop: under a backfill's reads that checkpoint stalled every call in flight for up
            # to half a second. Checkpoints run on the worker thread instead, every CHECKPOINT_EVERY writes.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute("PRAGMA analysis_limit=400")  # ANALYZE samples: milliseconds at any size
            conn.executescript(_SCHEMA)
            _upgrade(conn)
            conn.create_function("contains_ci", 2, lambda hay, needle: needle in semantics.lowered(hay),
                                 deterministic=True)
            conn.create_function("search_document", 3, lambda name, etype, obs: semantics.search_document(
                name, etype, json.loads(obs)), deterministic=True)
            self._check_embedding(conn)
            _build_search_index(conn)
            conn.execute("ANALYZE")
        except Exception:
            conn.close()
            raise
        self._conn = conn
        self._index, self._loaded = VectorIndex(self.embedding.dimension), set()
        stale: dict[tuple[str, str], str] = {(s, n): "" for s, n in conn.execute(_STALE)}
        if stale:  # a crash between commit and embedding, or data written by a replication without vectors
            txn = _Txn(conn, touched=set(stale))
            with _immediate(conn):
                stale = txn.embedding_texts()
        return stale

    def _check_embedding(self, conn: sqlite3.Connection) -> None:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        want = {"embedding_model": self.embedding.model, "embedding_dim": str(self.embedding.dimension)}
        if "embedding_model" in meta:
            if meta["embedding_model"] != want["embedding_model"] or meta["embedding_dim"] != want["embedding_dim"]:
                raise EmbeddingMismatch(
                    f"{self._path} was written with embedding model {meta['embedding_model']!r} "
                    f"(dimension {meta['embedding_dim']}), but the configured model is {want['embedding_model']!r} "
                    f"(dimension {want['embedding_dim']}); migrate with re-embedding instead of reusing this file")
            return
        want["schema_version"] = str(SCHEMA_VERSION)
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(want.items()))

    async def close(self) -> None:
        await self._embeddings.settled()
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, self._locked, conn.close)
        await asyncio.get_running_loop().run_in_executor(_reader_thread(), self._close_reader)

    def _close_reader(self) -> None:
        with self._reader_lock:
            if self._reader is not None:
                reader, self._reader = self._reader, None
                reader.close()


    # --- the memory API --------------------------------------------------------------------------------------------
    async def _planned(self, scope: str, keys: list[RecordKey], plan: Plan[T], size: int) -> WriteResult[T]:
        """Fetch what the call may touch, plan it (`adapters.semantics`), write the effects: one transaction."""
        def body(txn: _Txn) -> WriteResult[T]:
            stored = {k: r for k in dict.fromkeys(keys) if (r := txn.get(k)) is not None}
            answer, effects = plan(stored)
            for rec in effects:
                txn.apply_record(rec)
            return WriteResult(answer, effects)

        return await self._write_and_embed(body, size=size)

    # --- reads -----------------------------------------------------------------------------------------------------
    def _entities(self, scope: str, names: Sequence[str]) -> list[Entity]:
        """Live entities among `names`, with their observations, in name order."""
        assert self._conn is not None
        if not names:
            return []
        return self._entities_where(scope, "IN (SELECT value FROM json_each(?))", (json.dumps(list(names)),))

    def _entities_where(self, scope: str, names: str, args: tuple[str, ...]) -> list[Entity]:
        """Live entities whose name meets the condition `names` (SQL after the column, `args` its parameters), with
        their observations, in name order. A page of the graph names a range: walking it is a third faster than
        looking its names up one by one."""
        assert self._conn is not None
        rows = self._conn.execute(
            f"SELECT name, entity_type, metadata FROM entities WHERE scope=? AND deleted=0 AND name {names}"
            " ORDER BY name", (scope, *args)).fetchall()
        obs: dict[str, list[str]] = {}
        for entity, text in self._conn.execute(
                f"SELECT entity, text FROM observations WHERE scope=? AND deleted=0 AND entity {names}"
                " ORDER BY created, text", (scope, *args)):
            obs.setdefault(entity, []).append(text)
        return [Entity(n, t, tuple(obs.get(n, ())), load_metadata(m)) for n, t, m in rows]

    def _relations_touching(self, scope: str, names: Sequence[str]) -> list[Relation]:
        assert self._conn is not None
        if not names:
            return []
        # One index lookup per name and side (the key for sources, relations_by_target for targets), the names
        # walked first (CROSS JOIN fixes the order). Both halves must be told: with `source IN (..) OR target IN
        # (..)` SQLite scanned every relation of the scope, and without INDEXED BY it still walks the scope's key
        # range for the targets (the key covers every column, the index does not): 129 ms instead of 0.06 for each
        # OpenNodes, and for the size check of every AddObservations, at 125,000 relations a scope.
        rows = self._conn.execute(
            "SELECT r.source, r.relation_type, r.target, r.metadata FROM json_each(:names) j CROSS JOIN relations r"
            " ON r.scope=:scope AND r.source=j.value WHERE r.deleted=0 UNION"
            " SELECT r.source, r.relation_type, r.target, r.metadata FROM json_each(:names) j"
            " CROSS JOIN relations r INDEXED BY relations_by_target"
            " ON r.scope=:scope AND r.target=j.value WHERE r.deleted=0 ORDER BY 1, 2, 3",
            {"scope": scope, "names": json.dumps(list(names))}).fetchall()
        return [Relation(s, t, r, load_metadata(m)) for s, r, t, m in rows]

    def _graph(self, scope: str, names: Sequence[str]) -> Graph:
        entities = self._entities(scope, names)
        return Graph(tuple(entities), tuple(self._relations_touching(scope, [e.name for e in entities])))

    async def read_graph(self, scope: str, cursor: str | None, limit: int) -> GraphPage:
        """Entities in name order, then relations in key order; a page may hold the end of one and the start of
        the other. Names are never empty, so `name > ''` starts at the first."""
        kind, after = decode_cursor(cursor) if cursor else (Kind.ENTITY, ("",))

        def run() -> GraphPage:
            assert self._conn is not None
            entities: list[Entity] = []
            if kind == Kind.ENTITY:
                names = [r[0] for r in self._conn.execute(
                    "SELECT name FROM entities WHERE scope=? AND deleted=0 AND name>? ORDER BY name LIMIT ?",
                    (scope, after[0], limit + 1))]
                page = names[:limit]
                if page:  # the page's names are a range of the live ones: walked, not looked up
                    entities = self._entities_where(scope, "BETWEEN ? AND ?", (page[0], page[-1]))
                if len(names) > limit:
                    return GraphPage(tuple(entities), (), encode_cursor(Kind.ENTITY, [names[limit - 1]]))
            room = limit - len(entities)
            rel_after = after if kind == Kind.RELATION else ("", "", "")
            rows = self._conn.execute(
                "SELECT source, relation_type, target, metadata FROM relations WHERE scope=? AND deleted=0"
                " AND (source, relation_type, target) > (?,?,?) ORDER BY source, relation_type, target LIMIT ?",
                (scope, *rel_after, room + 1)).fetchall()
            rels = [Relation(s, t, r, load_metadata(m)) for s, r, t, m in rows[:room]]
            nxt = None
            if len(rows) > room:
                # A page filled by entities alone resumes relations from where they would have started.
                resume = (rels[-1].source, rels[-1].relation_type, rels[-1].target) if rels else rel_after
                nxt = encode_cursor(Kind.RELATION, resume)
            return GraphPage(tuple(entities), tuple(rels), nxt)

        return await self._call(run)

    async def search_nodes(self, scope: str, query: str) -> Graph:
        needle = semantics.lowered(query)
        # The index is asked for the needle's longest stretch free of GLOB syntax: SQLite's trigram GLOB missed
        # matches of a bracket-escaped `*` followed by a Greek letter and a space; the stretch's matches include
        # the needle's.
        stretch = max(re.split(r"[*?\[\]]", needle), key=len)
        if len(stretch) >= semantics.INDEXED_NEEDLE_CHARS:
            return await self._call(self._search_indexed, scope, needle, stretch)

        def run() -> Graph:
            assert self._conn is not None
            names = [r[0] for r in self._conn.execute(
                "SELECT name FROM entities e WHERE scope=?1 AND deleted=0 AND (contains_ci(name, ?2)"
                " OR contains_ci(entity_type, ?2) OR EXISTS (SELECT 1 FROM observations o WHERE o.scope=?1"
                " AND o.entity=e.name AND o.deleted=0 AND contains_ci(o.text, ?2))) ORDER BY name",
                (scope, needle))]
            return self._graph(scope, names)

        return await self._call(run)

    def _search_indexed(self, scope: str, needle: str, stretch: str) -> Graph:
        """Candidates from the trigram index (GLOB: case-sensitive, matching the lowered documents; the index is
        walked first, hence the CROSS JOIN), then the shared rule on each."""
        assert self._conn is not None
        names = [r[0] for r in self._conn.execute(
            "SELECT d.name FROM search_index s CROSS JOIN search_docs d ON d.id = s.rowid"
            " WHERE s.text GLOB ? AND d.scope = ? ORDER BY d.name", (f"*{stretch}*", scope))]
        return semantics.search_answer(self._graph(scope, names), needle)

    async def open_nodes(self, scope: str, names: Sequence[str]) -> Graph:
        return await self._call(self._graph, scope, list(dict.fromkeys(names)), small=len(names) <= SMALL_JOB)

    async def semantic_search(
        self, scope: str, vector: Vector, limit: int, min_score: float | None, entity_types: Sequence[str]
    ) -> SearchResult:
        await self._embeddings.settled(scope)

        def run() -> SearchResult:
            if scope not in self._loaded:
                self._load_scope(scope)
            hits = self._index.search(scope, vector, limit, min_score, entity_types)
            by_name = {e.name: e for e in self._entities(scope, [n for n, _ in hits])}
            results = tuple(ScoredEntity(by_name[n], s) for n, s in hits if n in by_name)
            return SearchResult(results, tuple(self._relations_touching(scope, [r.entity.name for r in results])))

        # One agent's memory (a few thousand vectors) is scored in well under a millisecond: cheaper on the loop than
        # a hop to the worker thread. Larger scopes go to the thread so the loop keeps serving.
        small = scope in self._loaded and self._index.scope_size(scope) <= INLINE_SEARCH_ROWS
        return await self._call(run, small=small)

    def _load_scope(self, scope: str) -> None:
        """Bring a scope's current vectors (those of each live entity's current text) into the index."""
        assert self._conn is not None
        dim = self.embedding.dimension
        for name, etype, vector in self._conn.execute(
                "SELECT v.name, e.entity_type, v.vector FROM vectors v JOIN entities e ON e.scope=v.scope"
                " AND e.name=v.name AND e.embed_hash=v.hash AND e.deleted=0 WHERE v.scope=?", (scope,)):
            self._index.upsert(scope, name, etype, np.frombuffer(vector, dtype=np.float32, count=dim))
        self._loaded.add(scope)

    # --- replication -----------------------------------------------------------------------------------------------
    async def apply(self, records: Sequence[Record], vectors: VectorMap | None = None) -> int:
        def body(txn: _Txn) -> int:
            return sum(txn.apply_record(r) for r in records)

        return await self._write_and_embed(body, vectors)

    async def replace_if(self, items: Sequence[tuple[RecordKey, Record | None, int | None]]) -> list[RecordKey]:
        def body(txn: _Txn) -> list[RecordKey]:
            moved: list[RecordKey] = []
            for key, record, expected in items:
                stored = txn.get(key)
                if (stored.version if stored else None) != expected:
                    moved.append(key)
                    continue
                txn.remove(key)
                if record is not None:
                    txn.apply_record(record)
            return moved

        return await self._write_and_embed(body)

    async def child_keys(self, scope: str, name: str) -> list[RecordKey]:
        def run() -> list[RecordKey]:
            assert self._conn is not None
            obs: list[RecordKey] = [(Kind.OBSERVATION, scope, (name, t)) for (t,) in self._conn.execute(
                "SELECT text FROM observations WHERE scope=? AND entity=?", (scope, name)).fetchall()]
            rels: list[RecordKey] = [(Kind.RELATION, scope, (a, r, b)) for a, r, b in self._conn.execute(
                "SELECT source, relation_type, target FROM relations WHERE scope=?1 AND source=?2 UNION"
                " SELECT source, relation_type, target FROM relations WHERE scope=?1 AND target=?2",
                (scope, name)).fetchall()]
            return obs + rels

        return await self._call(run)

    async def embed_stale(self) -> int:
        await self._embeddings.settled()

        def run() -> dict[tuple[str, str], str]:
            assert self._conn is not None
            stale = {(s, n) for s, n in self._conn.execute(_STALE).fetchall()}
            return self._write(lambda txn: txn.touched.update(stale))[1]

        texts = await self._call(run)
        await self._embeddings.embed(texts)
        return len(texts)

    async def get_records(self, keys: Sequence[RecordKey]) -> list[Record]:
        def run() -> list[Record]:
            assert self._conn is not None
            txn = _Txn(self._conn)
            return [rec for key in keys if (rec := txn.get(key)) is not None]

        return await self._call(run)

    async def list_records(self, after: RecordKey | None, limit: int, tombstones: bool = False,
                           until: int = 0) -> RecordPage:
        return await self._bulk_read(lambda conn: self._list_page(conn, after, limit, tombstones, until))

    async def export_page(self, after: RecordKey | None, limit: int, vectors: bool, until: int = 0) -> ExportPage:
        # One thread hand-off per page instead of three, and the vectors by key range rather than by a list of
        # names: reading 40k records took 286 ms instead of 327 (docs/benchmarks.md).
        def run(conn: sqlite3.Connection) -> ExportPage:
            page = self._list_page(conn, after, limit, True, until)
            return ExportPage(page.records, page.next_after, _page_vectors(conn, page.records) if vectors else None)

        page = await self._bulk_read(run)
        if vectors:
            # Only embeddings of this page's entities are waited for, and then the page is read again (rare: the
            # entities of a page are below the copy's watermark, and agents mostly write elsewhere).
            wanted = {k for keys in vector_keys(page.records) for k in keys}
            if self._embeddings.pending(wanted):
                await self._embeddings.settled(keys=wanted)
                page = await self._bulk_read(run)
        return page

    def _list_page(self, conn: sqlite3.Connection, after: RecordKey | None, limit: int,
                   tombstones: bool, until: int = 0) -> RecordPage:
        out: list[Record] = []
        for kind, pos in kinds_after(after):
            if len(out) >= limit:
                break
            out.extend(self._list_kind(conn, kind, pos, limit - len(out), tombstones, until))
        nxt = out[-1].key if len(out) >= limit else None
        return RecordPage(tuple(out), nxt)

    @staticmethod
    def _list_kind(conn: sqlite3.Connection, kind: Kind, pos: tuple[str, ...], limit: int,
                   tombstones: bool, until: int = 0) -> list[Record]:
        live = "" if tombstones else "AND deleted=0"
        upto, bound = ("AND {}version <= ?", (until,)) if until else ("", ())
        if kind == Kind.ENTITY:
            where, args = ("AND (scope, name) > (?,?)", pos) if pos else ("", ())
            return [EntityRecord(s, n, t, v, c, p, bool(d), load_metadata(m))
                    for s, n, t, m, v, c, p, d in conn.execute(
                        "SELECT scope, name, entity_type, metadata, version, created, purged, deleted FROM entities"
                        f" WHERE 1=1 {live} {where} {upto.format('')} ORDER BY scope, name LIMIT ?",
                        (*args, *bound, limit))]
        if kind == Kind.OBSERVATION:
            where, args = ("AND (o.scope, o.entity, o.text) > (?,?,?)", pos) if pos else ("", ())
            join = "" if tombstones else (" JOIN entities e ON e.scope=o.scope AND e.name=o.entity AND e.deleted=0"
                                          " WHERE o.deleted=0")
            return [ObservationRecord(s, e, t, v, c, bool(d)) for s, e, t, v, c, d in conn.execute(
                f"SELECT o.scope, o.entity, o.text, o.version, o.created, o.deleted FROM observations o{join} "
                f"{'WHERE 1=1' if tombstones else ''} {where} {upto.format('o.')}"
                " ORDER BY o.scope, o.entity, o.text LIMIT ?", (*args, *bound, limit))]
        where, args = ("AND (scope, source, relation_type, target) > (?,?,?,?)", pos) if pos else ("", ())
        return [RelationRecord(s, a, r, b, v, bool(d), load_metadata(m))
                for s, a, r, b, m, v, d in conn.execute(
                    "SELECT scope, source, relation_type, target, metadata, version, deleted FROM relations"
                    f" WHERE 1=1 {live} {where} {upto.format('')}"
                    " ORDER BY scope, source, relation_type, target LIMIT ?", (*args, *bound, limit))]

    async def get_vectors(self, keys: Sequence[tuple[str, str]],
                          childless_only: bool = False) -> dict[tuple[str, str], tuple[str, Vector]]:
        await self._embeddings.settled(keys=set(keys))

        def run(conn: sqlite3.Connection) -> dict[tuple[str, str], tuple[str, Vector]]:
            # hash = embed_hash: the vector is of the entity's current text (embed_hash is set in the
            # transaction that changes the text), so one query answers without rebuilding any text.
            childless = (" AND NOT EXISTS (SELECT 1 FROM observations o WHERE o.scope=entities.scope"
                         " AND o.entity=entities.name AND o.deleted=0)") if childless_only else ""
            out: dict[tuple[str, str], tuple[str, Vector]] = {}
            for scope, names in _by_scope(keys).items():
                for name, h, vector in conn.execute(
                        "SELECT v.name, v.hash, v.vector FROM entities JOIN vectors v ON v.scope=entities.scope AND"
                        " v.name=entities.name AND v.hash=entities.embed_hash WHERE entities.scope=? AND deleted=0"
                        f" AND entities.name IN (SELECT value FROM json_each(?)){childless}",
                        (scope, json.dumps(names))):
                    out[(scope, name)] = (h, np.frombuffer(vector, dtype=np.float32))  # no copy
            return out

        return await self._call(lambda: run(self._connection()))

    async def count(self, scope: str | None = None) -> Counts:
        def run(conn: sqlite3.Connection) -> Counts:
            cond, args = ("AND x.scope=?", (scope,)) if scope is not None else ("", ())
            return Counts(*(conn.execute(f"SELECT count(*) FROM {live} {cond}", args).fetchone()[0]
                            for live in _LIVE_RECORDS))

        return await self._bulk_read(run)

    async def max_version(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return max(int(conn.execute(f"SELECT coalesce(max(version), 0) FROM {table}").fetchone()[0])
                       for table in ("entities", "observations", "relations"))

        return await self._bulk_read(run)

    async def scope_counts(self) -> dict[str, int]:
        """Live records per scope, as `count` counts them."""
        def run(conn: sqlite3.Connection) -> dict[str, int]:
            out: dict[str, int] = {}
            for live in _LIVE_RECORDS:
                for scope, n in conn.execute(f"SELECT x.scope, count(*) FROM {live} GROUP BY x.scope"):
                    out[scope] = out.get(scope, 0) + n
            return out

        return await self._bulk_read(run)

    async def purge_tombstones(self, before_version: int) -> int:
        def run() -> int:
            assert self._conn is not None
            n = 0
            for table in ("observations", "relations", "entities"):
                n += self._conn.execute(
                    f"DELETE FROM {table} WHERE deleted=1 AND version<?", (before_version,)).rowcount
            return n

        return await self._call(run)
