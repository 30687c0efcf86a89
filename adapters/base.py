"""The one protocol every store implements: the memory API plus what migration needs.

Implemented by `adapters.embedded` (SQLite, the default), `adapters.postgres` (PostgreSQL with pgvector),
`adapters.neo4j` (Neo4j or any Bolt server speaking Cypher), `adapters.hybrid` (graph in Neo4j, vectors in Qdrant),
and, through `adapters.points`, `adapters.qdrant` (Qdrant's local mode or a server), `adapters.qdrant_edge` (Qdrant
Edge, in-process) and `adapters.chroma` (ChromaDB, in-process or a server).

Two layers, one rule. The API operations carry MCP memory-server semantics (skip existing, NOT_FOUND, idempotent
deletes); the replication operations move whole versioned records. Both obey apply-if-newer on every store, the
primary included: a record is written only when its version is higher than the stored one, and a tombstone hides
every older record of its key (an entity tombstone every older child). The same operations in any order therefore
end in the same state (docs/design.md, Versions).

Every mutating API operation returns its `effects`: the whole records it actually wrote. The migration engine
compares the effects of the primary and the secondary to find keys that need reconciling from the primary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

from adapters.embedder import EmbeddingInfo, Vector
from adapters.model import (
    Entity,
    Graph,
    GraphPage,
    ObservationAddition,
    ObservationDeletion,
    Relation,
    SearchResult,
)
from adapters.records import Counts, Record, RecordKey, RecordPage

# Set while a call serves nobody who waits (a shadow read): a store then keeps the work off the event loop, on its
# worker thread, even when it is small enough to run inline, so the next caller's request is not held behind it.
BACKGROUND: ContextVar[bool] = ContextVar("memshift_background", default=False)

T = TypeVar("T")

# (scope, entity) -> (text_hash of the embedding text the vector was computed from, vector): a store receiving it
# keeps the vector only if the hash matches its own text for that entity, so a copied vector is never stale.
VectorMap = Mapping[tuple[str, str], tuple[str, Vector]]


@dataclass(frozen=True, slots=True)
class WriteResult(Generic[T]):
    answer: T
    effects: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class ExportPage:
    """One page of a copy: `list_records(after, limit, tombstones=True)`, and, when asked, the vectors a target may
    keep for those records (`vectors` is None when not asked)."""

    records: tuple[Record, ...]
    next_after: RecordKey | None
    vectors: VectorMap | None


@runtime_checkable
class Backend(Protocol):
    """A memory store. Implementations: embedded (SQLite), postgres, neo4j, qdrant, hybrid."""

    @property
    def name(self) -> str:
        """A short label for logs and metrics, never containing credentials."""
        ...

    @property
    def embedding(self) -> EmbeddingInfo: ...

    async def open(self) -> None:
        """Connect, create or upgrade the schema; raise EmbeddingMismatch if the data was written with another
        model or dimension."""
        ...

    async def close(self) -> None: ...

    # --- the memory API (MCP memory-server semantics), each mutation stamped with one version -----------------
    async def create_entities(
        self, scope: str, entities: Sequence[Entity], version: int
    ) -> WriteResult[tuple[Entity, ...]]: ...

    async def create_relations(
        self, scope: str, relations: Sequence[Relation], version: int
    ) -> WriteResult[tuple[Relation, ...]]: ...

    async def add_observations(
        self, scope: str, additions: Sequence[ObservationAddition], version: int
    ) -> WriteResult[tuple[ObservationAddition, ...]]:
        """Raises EntityNotFound (and writes nothing) if any entity is missing."""
        ...

    async def delete_entities(self, scope: str, names: Sequence[str], version: int) -> WriteResult[None]: ...

    async def delete_observations(
        self, scope: str, deletions: Sequence[ObservationDeletion], version: int
    ) -> WriteResult[None]: ...

    async def delete_relations(
        self, scope: str, relations: Sequence[Relation], version: int
    ) -> WriteResult[None]: ...

    async def read_graph(self, scope: str, cursor: str | None, limit: int) -> GraphPage: ...

    async def search_nodes(self, scope: str, query: str) -> Graph: ...

    async def open_nodes(self, scope: str, names: Sequence[str]) -> Graph: ...

    async def semantic_search(
        self, scope: str, vector: Vector, limit: int, min_score: float | None, entity_types: Sequence[str]
    ) -> SearchResult: ...

    # --- replication: whole versioned records ------------------------------------------------------------------
    async def apply(self, records: Sequence[Record], vectors: VectorMap | None = None) -> int:
        """Apply-if-newer, in one transaction; returns how many records replaced stored state. A vector given for
        an entity is used when its text matches the entity's embedding text, instead of re-embedding. An apply that
        carries vectors (a backfill) embeds nothing itself: an entity whose vector has not matched yet (its
        observations are still to come) waits, and `embed_stale` settles what never matches."""
        ...

    async def load(self, records: Sequence[Record], vectors: VectorMap | None = None) -> int:
        """`apply` as one page of a bulk copy (the backfill): the same apply-if-newer, but a store may leave what
        follows from the records (embedding texts, search documents, vectors) to `embed_stale`, which the copy
        calls once when it ends; until then the loaded entities may be missing from searches. Stores without a
        cheaper path apply (`NoBulkPath`)."""
        ...

    async def build_indexes(self) -> None:
        """Build what a store leaves out during a bulk copy, once `embed_stale` has settled it (PostgreSQL: its
        search and vector indexes, as pg_restore builds them after the data). Idempotent; the store serves
        meanwhile."""
        ...

    async def embed_stale(self) -> int:
        """Settle what loads deferred and embed every live entity whose vector does not match its current text;
        returns how many the model embedded (a vector copied with the records is not counted)."""
        ...

    async def replace_if(self, items: Sequence[tuple[RecordKey, Record | None, int | None]]) -> list[RecordKey]:
        """Reconciliation, not replication: make each key hold exactly `record` (None: nothing at all), but only
        where the stored version is still `expected` (None: nothing stored). Returns the keys whose stored version
        had moved on meanwhile; the caller reads again and retries them. An entity's `purged` becomes exactly the
        given record's (it may go down: a purge the primary never made is undone by reconciling the children).
        Items are applied one after another in the order given, in one transaction where the store has them: a
        child is judged against the purge points its entities hold at that moment, so callers put entities first."""
        ...

    async def child_keys(self, scope: str, name: str) -> list[RecordKey]:
        """Every stored observation of entity `name` and relation touching it, tombstones included."""
        ...

    async def get_records(self, keys: Sequence[RecordKey]) -> list[Record]:
        """The stored records (tombstones included) for these keys; a key never written is left out."""
        ...

    async def list_records(self, after: RecordKey | None, limit: int, tombstones: bool = False,
                           until: int = 0) -> RecordPage:
        """Live records in stable `RecordKey` order (entities, then observations of live entities, then
        relations), across every scope; resume with `after=page.next_after`. With `tombstones`, every stored record
        (backfill sends them, so a target holding older data learns of deletions it missed). With `until`, only
        records whose version is at most `until` (the backfill's watermark), filtered by the store itself."""
        ...

    async def get_vectors(self, keys: Sequence[tuple[str, str]],
                          childless_only: bool = False) -> dict[tuple[str, str], tuple[str, Vector]]:
        """The stored vectors of these (scope, entity) keys, each with the `text_hash` of the text it was computed
        from (only vectors of the entity's current text: a `VectorMap`). With
        `childless_only`, only entities without live observations: in record order an entity comes before its
        observations, so only theirs can already match when the entity record alone is copied."""
        ...

    async def export_page(self, after: RecordKey | None, limit: int, vectors: bool, until: int = 0) -> ExportPage:
        """What a backfill reads per batch: every stored record after `after` (tombstones included; with `until`,
        those of a version up to it), and with
        `vectors` those of `adapters.export.vector_keys(records)`. It equals `list_records` plus `get_vectors`
        (`adapters.export.ExportInParts` does exactly that); a store that can answer in one round trip does."""
        ...

    async def count(self, scope: str | None = None) -> Counts:
        """Live records, in one scope or in all."""
        ...

    async def max_version(self) -> int:
        """The highest version stored, tombstones included (0 when empty): once no write is in flight, every write
        this store has acknowledged is at or below it (the backfill's watermark starts here)."""
        ...

    async def purge_tombstones(self, before_version: int) -> int:
        """Drop tombstones older than this version (once no migration needs them); returns how many."""
        ...


class NoBulkPath:
    """`load` and `build_indexes` for a store whose `apply` is already its bulk path and whose indexes are kept
    current by every write (every store but PostgreSQL)."""

    async def load(self: Backend, records: Sequence[Record], vectors: VectorMap | None = None) -> int:
        return await self.apply(records, vectors)

    async def build_indexes(self) -> None:
        return None


def fleet_problem(store: Backend) -> str | None:
    """Why a fleet of proxies may not share `store`, or None. Stores that cannot say `fleet_problem()` themselves;
    the others (transactions or conditional writes in the database) can be shared."""
    check = getattr(store, "fleet_problem", None)
    return check() if callable(check) else None
