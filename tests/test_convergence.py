"""Property: the same versioned writes, applied in any order and any batching, end in the same state, and that
state is the one a plain reference model of the record rules predicts (docs/design.md, Versions)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.records import EntityRecord, ObservationRecord, Record, RelationRecord
from tests.conftest import StoreFactory

SCOPES = ["s1", "s2"]
NAMES = ["a", "b", "c"]
TEXTS = ["likes tea", "plays chess", "owns a cat"]


@st.composite
def writes(draw: st.DrawFn) -> list[Record]:
    """Records as the API would produce them: one version per operation, unique across operations."""
    n = draw(st.integers(1, 14))
    versions = sorted(draw(st.sets(st.integers(1, 10_000), min_size=n, max_size=n)))
    out: list[Record] = []
    for ver in versions:
        scope, name = draw(st.sampled_from(SCOPES)), draw(st.sampled_from(NAMES))
        op = draw(st.sampled_from(["create", "delete", "observe", "unobserve", "relate", "unrelate"]))
        if op == "create":
            out.append(EntityRecord(scope, name, draw(st.sampled_from(["person", "robot"])), ver, ver))
            out += [ObservationRecord(scope, name, t, ver, ver) for t in draw(st.sets(st.sampled_from(TEXTS)))]
        elif op == "delete":
            out.append(EntityRecord(scope, name, "", ver, 0, purged=ver, deleted=True))
        elif op == "observe":
            out.append(ObservationRecord(scope, name, draw(st.sampled_from(TEXTS)), ver, ver))
        elif op == "unobserve":
            out.append(ObservationRecord(scope, name, draw(st.sampled_from(TEXTS)), ver, 0, deleted=True))
        else:
            other = draw(st.sampled_from(NAMES))
            out.append(RelationRecord(scope, name, "knows", other, ver, deleted=op == "unrelate"))
    return out


@dataclass
class Expected:
    entities: dict[tuple[str, str], str]
    observations: set[tuple[str, str, str]]
    relations: set[tuple[str, str, str, str]]


def reference(records: list[Record]) -> Expected:
    """The record rules, stated as plainly as possible: highest version wins per key; an entity key's purge point
    is its highest tombstone; a child older than the purge point of an entity it belongs to is gone."""
    latest: dict[object, Record] = {}
    purged: dict[tuple[str, str], int] = {}
    for r in records:
        if r.key not in latest or r.version > latest[r.key].version:
            latest[r.key] = r
        if isinstance(r, EntityRecord) and r.deleted:
            purged[(r.scope, r.name)] = max(purged.get((r.scope, r.name), 0), r.version)
    ents = {(r.scope, r.name): r.entity_type for r in latest.values()
            if isinstance(r, EntityRecord) and not r.deleted}
    obs = {(r.scope, r.entity, r.text) for r in latest.values()
           if isinstance(r, ObservationRecord) and not r.deleted and (r.scope, r.entity) in ents
           and r.version > purged.get((r.scope, r.entity), 0)}
    rels = {(r.scope, r.source, r.relation_type, r.target) for r in latest.values()
            if isinstance(r, RelationRecord) and not r.deleted
            and r.version > max(purged.get((r.scope, r.source), 0), purged.get((r.scope, r.target), 0))}
    return Expected(ents, obs, rels)


def state(records: tuple[Record, ...]) -> Expected:
    return Expected(
        {(r.scope, r.name): r.entity_type for r in records if isinstance(r, EntityRecord)},
        {(r.scope, r.entity, r.text) for r in records if isinstance(r, ObservationRecord)},
        {(r.scope, r.source, r.relation_type, r.target) for r in records if isinstance(r, RelationRecord)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), recs=writes())
async def test_any_order_any_batching_converges_to_the_reference(store_factory: StoreFactory, data: st.DataObject,
                                                                 recs: list[Record]) -> None:
    first = await store_factory()
    second = await store_factory()
    order_a = data.draw(st.permutations(recs))
    order_b = data.draw(st.permutations(recs))
    cut = data.draw(st.integers(1, max(1, len(recs))))
    for i in range(0, len(order_a), cut):  # batches, as backfill sends them
        await first.apply(order_a[i:i + cut])
    for rec in order_b:  # one at a time, as live dual-writes arrive
        await second.apply([rec])
    listed_a = (await first.list_records(None, 10_000)).records
    listed_b = (await second.list_records(None, 10_000)).records
    assert listed_a == listed_b
    assert state(listed_a) == reference(recs)
    # Re-applying everything (a retried batch) changes nothing.
    assert await first.apply(recs) == 0
    await first.close()
    await second.close()
