"""One value domain: whatever the API accepts, every store keeps and returns exactly, and a migration between two
different stores (the engine's own backfill, then Verify) keeps it too. What no store can keep (NUL, unpaired
surrogates) the API refuses, naming the field."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adapters.base import Backend
from adapters.embedder import BatchingEmbedder
from adapters.errors import InvalidInput
from adapters.model import Entity, Relation
from proxy.engine.clock import HybridClock
from proxy.engine.control import MigrationOptions, SqliteControlStore
from proxy.engine.migration import MigrationEngine
from proxy.engine.verify import verify
from proxy.routing import validation
from proxy.runtime.config import Limits
from tests.stores import STORE_KINDS, make_store

LIMITS = Limits()
_scopes = itertools.count()

# Any Unicode scalar value, weighted towards the awkward: quotes, backslashes, JSON and Cypher syntax, whitespace
# at the ends, combining marks, astral-plane characters, line and paragraph separators, BOM, non-characters.
_awkward = ["'", '"', "\\", "`", "{", "}", "$", "%", "_", " ", "\u2028", "\ufeff", "\uffff", "\U0001f600",
            "e\u0301", "ß", "İ", "Σ", "\u00a0"]
_line_chars = st.one_of(st.characters(codec="utf-8", exclude_categories=("Cc",)), st.sampled_from(_awkward))
_free_chars = st.one_of(st.characters(codec="utf-8", exclude_characters="\x00"),
                        st.sampled_from([*_awkward, "\t", "\n", "\r", "\x7f", "\x1b"]))
free_text = st.lists(_free_chars, min_size=1, max_size=24).map("".join).filter(lambda t: t.strip() != "")
line_text = st.lists(_line_chars, min_size=1, max_size=24).map("".join).filter(lambda t: t.strip() != "")
any_text = st.lists(st.one_of(st.characters(), st.sampled_from(["\x00", "\ud800"])), max_size=12).map("".join)


@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[Entity], Relation]:
    names = draw(st.lists(line_text, min_size=2, max_size=3, unique=True))
    meta = draw(st.dictionaries(line_text, free_text, max_size=2))
    ents = [Entity(n, draw(line_text), tuple(draw(st.lists(free_text, max_size=3, unique=True))), meta)
            for n in names]
    return ents, Relation(names[0], names[1], draw(line_text), draw(st.dictionaries(line_text, free_text, max_size=2)))


def accepted(ents: list[Entity], rel: Relation) -> bool:
    try:
        validation.entities(ents, LIMITS)
        validation.relations([rel], LIMITS)
    except InvalidInput:
        return False
    return True


@pytest.fixture(params=STORE_KINDS)
async def pair(request: pytest.FixtureRequest, embedder: BatchingEmbedder, servers: dict[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Backend, Backend]]:
    """A store of each kind, and a store of another kind to copy it to."""
    kind = str(request.param)
    other = "postgres" if kind != "postgres" else "embedded"
    stores = [make_store(k, embedder, tmp_path_factory.mktemp(k), servers) for k in (kind, other)]
    for s in stores:
        await s.open()
    yield stores[0], stores[1]
    for s in stores:
        await s.close()


def _same_entities(got: tuple[Entity, ...], sent: list[Entity]) -> None:
    assert {e.name: (e.entity_type, sorted(e.observations), dict(e.metadata)) for e in got} == \
        {e.name: (e.entity_type, sorted(e.observations), dict(e.metadata)) for e in sent}


async def _migrate(source: Backend, target: Backend) -> None:
    """A migration between the two stores as production runs one: the engine's start (dual writes from then on),
    its pipelined backfill (read-ahead, two workers), and Verify at zero differences."""
    control = SqliteControlStore(Path(tempfile.mkdtemp(prefix="memshift-domain-")) / "control.db", "source")
    stores = {"source": source, "target": target}

    async def opener(spec: str) -> Backend:
        return stores[spec]

    engine = MigrationEngine(control, opener, HybridClock(3), background=False)
    try:
        await engine.start()
        await engine.start_migration("target", MigrationOptions(batch_size=7, workers=2), "test")
        await engine.backfill.run()
        assert engine.state.backfill_complete
        reports = [r async for r in verify(source, target)]
        assert reports[-1].done and reports[-1].differences == 0, reports[-1].samples
    finally:
        await control.close()  # not engine.stop(): the stores belong to the fixture


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(graph=graphs())
async def test_every_value_the_api_accepts_round_trips_through_every_store_and_a_migration(
        pair: tuple[Backend, Backend], graph: tuple[list[Entity], Relation]) -> None:
    ents, rel = graph
    assume(accepted(ents, rel))
    store, other = pair
    scope = f"domain-{next(_scopes)}"
    version = itertools.count(1000)
    await store.create_entities(scope, ents, next(version))
    await store.create_relations(scope, [rel], next(version))
    for backend in (store, other):
        if backend is other:
            await _migrate(store, other)
        opened = await backend.open_nodes(scope, [e.name for e in ents])
        _same_entities(opened.entities, ents)
        assert [(r.source, r.target, r.relation_type, dict(r.metadata)) for r in opened.relations] == \
            [(rel.source, rel.target, rel.relation_type, dict(rel.metadata))]
        page = await backend.read_graph(scope, None, 100)
        _same_entities(page.entities, ents)
        found = await backend.search_nodes(scope, ents[0].name)
        assert ents[0].name in {e.name for e in found.entities}


@given(text=any_text)
@settings(max_examples=300)
def test_the_api_refuses_exactly_what_no_store_can_keep(text: str) -> None:
    unstorable = "\x00" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    assume(text.strip())
    try:
        validation.observations("observations", [text], LIMITS)
    except InvalidInput as exc:
        assert unstorable, exc
        assert exc.field == "observations[0]" and ("NUL" in exc.problem or "surrogate" in exc.problem)
    else:
        assert not unstorable


def test_a_lone_surrogate_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidInput, match=r"entities\[0\]\.observations\[1\]: must not contain an unpaired surrogate"):
        validation.entities([Entity("a", "t", ("fine", "bad \ud800 half"))], LIMITS)


