"""`SearchNodes` through a substring index (SQLite's trigram FTS5, PostgreSQL's pg_trgm) answers exactly what a
scan with the documented matching answers: the index only proposes candidates, the shared rule decides. The oracle
is that scan, in Python, over everything the store holds (`read_graph`), after any history of writes the index had to
follow: entities created, observations added and deleted, entities deleted and created again."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Mapping

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adapters import semantics
from adapters.base import Backend
from adapters.embedder import BatchingEmbedder, Vector
from adapters.errors import EntityNotFound
from adapters.model import Entity, Graph, ObservationAddition, ObservationDeletion, Relation
from adapters.postgres import PostgresBackend
from tests.stores import make_store

INDEXED_STORES = ["embedded", "postgres"]
_scopes = itertools.count()

# Characters that mean something to an index's pattern language (GLOB's * ? [, LIKE's % _ \), and characters whose
# lower case is not what a byte-wise or locale-bound lower() gives (final sigma, dotted I, sharp s).
_special = ["*", "?", "[", "]", "%", "_", "\\", "Σ", "ς", "İ", "ß", "ẞ", "\n", " "]
_chars = st.one_of(st.sampled_from("abcABC"), st.sampled_from(_special), st.characters(codec="utf-8",
                   exclude_categories=("Cc", "Cs")))
_text = st.lists(_chars, min_size=1, max_size=10).map("".join).filter(lambda t: t.strip() != "")
_names = st.sampled_from(["alpha", "ALPHA*", "be_ta", "gam%ma", "ΣΟΦΙΑ", "straße", "[x]"])


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    """(operation, entity name, text) steps."""
    steps = draw(st.lists(st.tuples(st.sampled_from(["create", "add", "forget", "delete"]), _names, _text),
                          min_size=1, max_size=12))
    return steps


def _needles(draw: st.DrawFn, held: list[str]) -> list[str]:
    """Needles that hit (slices of what is stored, in other cases too), miss, and stress the pattern syntax."""
    out = [draw(_text), "*", "%", "_", "[x", "\\", "Σ", "ab", "A", "straSSE"]
    for text in held[:6]:
        i = draw(st.integers(0, max(0, len(text) - 1)))
        j = draw(st.integers(i + 1, len(text)))
        out += [text[i:j], text[i:j].upper()]
    return out


@pytest.fixture(params=INDEXED_STORES)
async def store(request: pytest.FixtureRequest, embedder: BatchingEmbedder, servers: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Backend]:
    backend = make_store(str(request.param), embedder, tmp_path_factory.mktemp(str(request.param)), servers)
    await backend.open()
    yield backend
    await backend.close()


async def _apply(store: Backend, scope: str, steps: list[tuple[str, str, str]]) -> None:
    version = itertools.count(1)
    for op, name, text in steps:
        try:
            if op == "create":
                await store.create_entities(scope, [Entity(name, text, (text + " note",))], next(version))
                await store.create_relations(scope, [Relation(name, "alpha", "knows")], next(version))
            elif op == "add":
                await store.add_observations(scope, [ObservationAddition(name, (text,))], next(version))
            elif op == "forget":
                await store.delete_observations(scope, [ObservationDeletion(name, (text, text + " note"))],
                                                next(version))
            else:
                await store.delete_entities(scope, [name], next(version))
        except EntityNotFound:
            pass  # adding to an entity that does not exist: refused, as the MCP server does


def _scan(graph: Graph, needle: str) -> tuple[list[str], set[tuple[str, str, str]]]:
    """The documented matching, as a scan: every live entity whose name, type or an observation contains the
    lowered needle; the relations touching them."""
    hits = sorted(e.name for e in graph.entities if semantics.entity_hit(needle, e))
    return hits, {(r.source, r.relation_type, r.target) for r in graph.relations
                  if r.source in hits or r.target in hits}


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=histories(), data=st.data())
async def test_indexed_search_answers_what_a_scan_answers(store: Backend, steps: list[tuple[str, str, str]],
                                                          data: st.DataObject) -> None:
    scope = f"search-{next(_scopes)}"
    await _apply(store, scope, steps)
    page = await store.read_graph(scope, None, 1000)
    assert page.next_cursor is None
    everything = Graph(page.entities, page.relations)
    held = [t for e in page.entities for t in (e.name, e.entity_type, *e.observations)]
    assume(held)
    for query in _needles(data.draw, held):
        got = await store.search_nodes(scope, query)
        names, relations = _scan(everything, semantics.lowered(query))
        assert [e.name for e in got.entities] == names, query
        assert {(r.source, r.relation_type, r.target) for r in got.relations} == relations, query


async def test_a_needle_with_pattern_syntax_is_matched_literally(store: Backend) -> None:
    scope = f"search-{next(_scopes)}"
    await store.create_entities(scope, [Entity("a%b", "t", ("100% sure",)), Entity("axxb", "t", ("under_score",)),
                                        Entity("glob*star", "t", ("[bracket]",))], 1)
    assert [e.name for e in (await store.search_nodes(scope, "a%b")).entities] == ["a%b"]
    assert [e.name for e in (await store.search_nodes(scope, "0% S")).entities] == ["a%b"]
    assert [e.name for e in (await store.search_nodes(scope, "r_s")).entities] == ["axxb"]
    assert [e.name for e in (await store.search_nodes(scope, "b*s")).entities] == ["glob*star"]
    assert [e.name for e in (await store.search_nodes(scope, "[BRA")).entities] == ["glob*star"]
    assert (await store.search_nodes(scope, "a_b")).entities == ()


async def test_a_store_written_before_the_index_is_indexed_when_opened(
        embedder: BatchingEmbedder, servers: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """PostgreSQL: a store from before the search column and its index gets both, and a document for every live
    entity, the first time it is opened; the embedded store's older files are covered in tests/test_units.py."""
    workdir = tmp_path_factory.mktemp("pg-upgrade")
    store = make_store("postgres", embedder, workdir, servers)
    await store.open()
    spec = store._dsn, store._schema  # type: ignore[attr-defined]
    await store.create_entities("old", [Entity("Ada", "person", ("wrote the first program",)),
                                        Entity("Bob", "person", ("likes tea",))], 1)
    await store._read(lambda conn: conn.execute(  # type: ignore[attr-defined]
        "DROP INDEX entities_search_trgm; ALTER TABLE entities DROP COLUMN search_doc;"
        " DELETE FROM meta WHERE key = 'search_docs'"))
    await store.close()
    again = PostgresBackend(f"{spec[0]}?schema={spec[1]}", embedder)
    await again.open()
    try:
        assert [e.name for e in (await again.search_nodes("old", "FIRST PROG")).entities] == ["Ada"]
        assert [e.name for e in (await again.search_nodes("old", "tea")).entities] == ["Bob"]
    finally:
        await again.close()


async def test_a_search_reads_a_bounded_queue_of_unmerged_index_entries(
        embedder: BatchingEmbedder, servers: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """PostgreSQL: GIN's pending list, which every search reads in full, is bounded on a new store and on one whose
    index was built before the bound (its queue merged when it is opened): at the default 4 MB it was most of a
    search's time at 100,000 entities."""
    async def pending_bound(store: Backend) -> list[str]:
        return list(await store._read(lambda conn: conn.fetchval(  # type: ignore[attr-defined]
            "SELECT reloptions FROM pg_class WHERE oid = 'entities_search_trgm'::regclass")) or [])

    store = make_store("postgres", embedder, tmp_path_factory.mktemp("pg-pending"), servers)
    await store.open()
    spec = store._dsn, store._schema  # type: ignore[attr-defined]
    assert "gin_pending_list_limit=256" in await pending_bound(store)
    await store._read(lambda conn: conn.execute(  # type: ignore[attr-defined]
        "ALTER INDEX entities_search_trgm RESET (gin_pending_list_limit)"))
    await store.create_entities("s", [Entity(f"n{i}", "t", (f"fact number {i}",)) for i in range(50)], 1)
    await store.close()
    again = PostgresBackend(f"{spec[0]}?schema={spec[1]}", embedder)
    await again.open()
    try:
        assert "gin_pending_list_limit=256" in await pending_bound(again)
        assert [e.name for e in (await again.search_nodes("s", "NUMBER 42")).entities] == ["n42"]
    finally:
        await again.close()


async def test_a_bulk_copy_rebuilds_the_search_index_once_at_its_end(
        embedder: BatchingEmbedder, servers: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """PostgreSQL: a copy loaded in pages (as the backfill loads it) leaves texts to the end; settling them drops
    the trigram index (searches still answer, from the table) and writes every document; `build_indexes` builds it
    again, valid and bounded as before; every vector the
    copy carried is taken, none embedded again. A copy stopped between the drop and the build (the index gone)
    gets it back when the store is next opened."""
    source = make_store("embedded", embedder, tmp_path_factory.mktemp("bulk-src"), servers)
    target = make_store("postgres", embedder, tmp_path_factory.mktemp("bulk-dst"), servers)
    await source.open()
    await target.open()
    spec = target._dsn, target._schema  # type: ignore[attr-defined]

    async def index_state(store: Backend) -> tuple[object, ...] | None:
        row = await store._read(lambda conn: conn.fetchrow(  # type: ignore[attr-defined]
            "SELECT i.indisvalid, c.reloptions FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.oid = to_regclass('entities_search_trgm')"))
        return None if row is None else (row[0], tuple(row[1] or ()))

    try:
        await source.create_entities("bulk", [Entity(f"n{i:04d}", "thing", (f"fact number {i}",))
                                              for i in range(1500)], 1)
        after = None
        while True:
            page = await source.export_page(after, 400, vectors=True)
            await target.load(page.records, page.vectors)
            if page.next_after is None:
                break
            after = page.next_after
        assert (await target.search_nodes("bulk", "number 42")).entities == ()  # not settled yet
        assert await target.embed_stale() == 0  # every vector came with the copy
        assert await index_state(target) is None  # most of the table rewritten: dropped, to be built once
        assert [e.name for e in (await target.search_nodes("bulk", "NUMBER 1042")).entities] == ["n1042"]
        await target.build_indexes()
        assert await index_state(target) == (True, ("gin_pending_list_limit=256",))
        assert [e.name for e in (await target.search_nodes("bulk", "NUMBER 1042")).entities] == ["n1042"]
        assert await target._read(lambda conn: conn.fetchval(  # type: ignore[attr-defined]
            "SELECT count(*) FROM loaded_vectors")) == 0
        some = [("bulk", f"n{i:04d}") for i in range(0, 1500, 97)]
        assert _same_vectors(await target.get_vectors(some), await source.get_vectors(some))
        await target._read(lambda conn: conn.execute(  # type: ignore[attr-defined]
            "DROP INDEX entities_search_trgm"))
        await target.close()
        again = PostgresBackend(f"{spec[0]}?schema={spec[1]}", embedder)
        await again.open()
        try:
            assert await index_state(again) == (True, ("gin_pending_list_limit=256",))
        finally:
            await again.close()
    finally:
        await source.close()


def _same_vectors(a: Mapping[tuple[str, str], tuple[str, Vector]], b: Mapping[tuple[str, str], tuple[str, Vector]]
                  ) -> bool:
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and np.array_equal(a[k][1], b[k][1]) for k in a)
