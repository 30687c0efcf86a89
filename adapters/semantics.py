"""MCP memory-server semantics as pure functions over stored records, shared by every store.

Each API write is planned here from the records it may touch (`*_keys` says which): the answer the caller gets and
the records to write (its effects). The store fetches those records, calls the plan and writes the effects with its
apply-if-newer path, all inside one transaction that keeps other writers of the scope out. Keeping the rules in one
place is what makes every store answer the same call the same way — the conformance suite checks it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from adapters.errors import EntityNotFound
from adapters.model import Entity, Graph, ObservationAddition, ObservationDeletion, Relation
from adapters.records import EntityRecord, Kind, ObservationRecord, Record, RecordKey, RelationRecord, newest_per_key

Stored = Mapping[RecordKey, Record]
Effects = tuple[Record, ...]


# Case as `SearchNodes` ignores it, the MCP memory server's way: Unicode's default lower-case mapping (JavaScript's
# toLowerCase, Python's str.lower), not case folding, so "STRASSE" does not find "Straße". Every store matches with
# this one function, never with its own database's lower(), whose result depends on its locale. (The C method
# itself: the embedded store calls it once per row scanned.)
lowered: Callable[[str], str] = str.lower


def search_hit(needle: str, *texts: str) -> bool:
    """Does any of `texts` contain `needle` (already `lowered`), ignoring case?"""
    return any(needle in lowered(t) for t in texts)


# A substring index (SQLite's trigram FTS5, PostgreSQL's pg_trgm) holds one document per live entity: its name, type
# and observations, each `lowered` on its own (lowering is not context-free: a final Σ lowers to ς) and joined by a
# line feed. A needle found in one field is found in the document, so the index's candidates are always a superset of
# the hits; `search_hit` on the candidates gives exactly the documented matching. Needles shorter than three
# characters have no trigram: stores scan for those.
SEARCH_FIELD_SEPARATOR = "\n"
INDEXED_NEEDLE_CHARS = 3


def search_document(name: str, entity_type: str, observations: Sequence[str]) -> str:
    return SEARCH_FIELD_SEPARATOR.join(lowered(t) for t in (name, entity_type, *observations))


def entity_hit(needle: str, entity: Entity) -> bool:
    """The documented `SearchNodes` match of one entity: name, type or any observation contains the needle."""
    return search_hit(needle, entity.name, entity.entity_type, *entity.observations)


def search_answer(candidates: Graph, needle: str) -> Graph:
    """`SearchNodes`' answer from an index's candidates (with the relations touching them): the entities the
    documented matching keeps, and the relations touching those."""
    entities = tuple(e for e in candidates.entities if entity_hit(needle, e))
    names = {e.name for e in entities}
    return Graph(entities, tuple(r for r in candidates.relations if r.source in names or r.target in names))


def entity_key(scope: str, name: str) -> RecordKey:
    return (Kind.ENTITY, scope, (name,))


def purged(stored: Stored, scope: str, name: str) -> int:
    rec = stored.get(entity_key(scope, name))
    return rec.purged if isinstance(rec, EntityRecord) else 0


def applies(rec: Record, stored: Stored) -> bool:
    """Would apply-if-newer write `rec` over `stored`? (An entity tombstone also raises `purged`; the API plans
    only ever need whether the record itself replaces what is stored.)"""
    current = stored.get(rec.key)
    newer = current is None or rec.version > current.version
    if isinstance(rec, ObservationRecord):
        return newer and rec.version >= purged(stored, rec.scope, rec.entity)
    if isinstance(rec, RelationRecord):
        return newer and rec.version >= max(purged(stored, rec.scope, rec.source),
                                            purged(stored, rec.scope, rec.target))
    return newer


def first_per_key(relations: Sequence[Relation]) -> list[Relation]:
    """A call naming the same triple twice acts on the first, as the MCP server does."""
    seen: dict[tuple[str, str, str], Relation] = {}
    for rel in relations:
        seen.setdefault(rel.key, rel)
    return list(seen.values())


def _superseded(current: Record | None, version: int) -> bool:
    """Creating over `current` is skipped: it exists (MCP), or a newer tombstone already supersedes this call."""
    return current is not None and (not current.deleted or current.version >= version)


# --- create ---------------------------------------------------------------------------------------------------------
def create_entities_keys(scope: str, entities: Sequence[Entity]) -> list[RecordKey]:
    return [k for e in entities for k in
            [entity_key(scope, e.name), *((Kind.OBSERVATION, scope, (e.name, o)) for o in e.observations)]]


def create_entities(scope: str, entities: Sequence[Entity], version: int,
                    stored: Stored) -> tuple[tuple[Entity, ...], Effects]:
    created: list[Entity] = []
    effects: list[Record] = []
    seen: set[str] = set()
    for ent in entities:
        if ent.name in seen:
            continue
        seen.add(ent.name)
        current = stored.get(entity_key(scope, ent.name))
        if _superseded(current, version):
            continue
        effects.append(EntityRecord(scope, ent.name, ent.entity_type, version, version,
                                    purged(stored, scope, ent.name), False, dict(ent.metadata)))
        added: list[str] = []
        for text in dict.fromkeys(ent.observations):
            obs = ObservationRecord(scope, ent.name, text, version, version)
            if applies(obs, stored):
                effects.append(obs)
                added.append(text)
        created.append(replace(ent, observations=tuple(added)))
    return tuple(created), tuple(effects)


def create_relations_keys(scope: str, relations: Sequence[Relation]) -> list[RecordKey]:
    out: list[RecordKey] = []
    for r in relations:
        out += [(Kind.RELATION, scope, r.key), entity_key(scope, r.source), entity_key(scope, r.target)]
    return out


def create_relations(scope: str, relations: Sequence[Relation], version: int,
                     stored: Stored) -> tuple[tuple[Relation, ...], Effects]:
    created: list[Relation] = []
    effects: list[Record] = []
    for rel in first_per_key(relations):
        if _superseded(stored.get((Kind.RELATION, scope, rel.key)), version):
            continue
        rec = RelationRecord(scope, rel.source, rel.relation_type, rel.target, version, False, dict(rel.metadata))
        if applies(rec, stored):
            effects.append(rec)
            created.append(rel)
    return tuple(created), tuple(effects)


def add_observations_keys(scope: str, additions: Sequence[ObservationAddition]) -> list[RecordKey]:
    return [k for a in additions for k in
            [entity_key(scope, a.entity_name), *((Kind.OBSERVATION, scope, (a.entity_name, t)) for t in a.contents)]]


def add_observations(scope: str, additions: Sequence[ObservationAddition], version: int,
                     stored: Stored) -> tuple[tuple[ObservationAddition, ...], Effects]:
    """Raises EntityNotFound (nothing to write) if any entity is missing."""
    missing = [a.entity_name for a in additions
               if (e := stored.get(entity_key(scope, a.entity_name))) is None or e.deleted]
    if missing:
        raise EntityNotFound(list(dict.fromkeys(missing)))
    results: list[ObservationAddition] = []
    effects: list[Record] = []
    for add in additions:
        added: list[str] = []
        for text in dict.fromkeys(add.contents):
            key: RecordKey = (Kind.OBSERVATION, scope, (add.entity_name, text))
            if _superseded(stored.get(key), version) or key in {r.key for r in effects}:
                continue
            rec = ObservationRecord(scope, add.entity_name, text, version, version)
            if applies(rec, stored):
                effects.append(rec)
                added.append(text)
        results.append(ObservationAddition(add.entity_name, tuple(added)))
    return tuple(results), tuple(effects)


# --- delete: tombstones ---------------------------------------------------------------------------------------------
def delete_entities(scope: str, names: Sequence[str], version: int) -> list[Record]:
    """A tombstone even for a name the store lacks: the same call has the same effects on every store, and a copy
    of the entity arriving late (backfill) is hidden."""
    return [EntityRecord(scope, n, "", version, 0, version, True) for n in dict.fromkeys(names)]


def delete_observations(scope: str, deletions: Sequence[ObservationDeletion], version: int) -> list[Record]:
    return [ObservationRecord(scope, d.entity_name, text, version, 0, True)
            for d in deletions for text in dict.fromkeys(d.observations)]


def delete_relations(scope: str, relations: Sequence[Relation], version: int) -> list[Record]:
    return [RelationRecord(scope, r.source, r.relation_type, r.target, version, True)
            for r in first_per_key(relations)]


def tombstone_keys(records: Sequence[Record]) -> list[RecordKey]:
    """The tombstones' own keys and the entities whose purge point decides whether they apply."""
    out: list[RecordKey] = []
    for r in records:
        out.append(r.key)
        if isinstance(r, ObservationRecord):
            out.append(entity_key(r.scope, r.entity))
        elif isinstance(r, RelationRecord):
            out += [entity_key(r.scope, r.source), entity_key(r.scope, r.target)]
    return out


def tombstone_effects(records: Sequence[Record], stored: Stored) -> Effects:
    return tuple(r for r in records if applies(r, stored))


# --- apply-if-newer for stores without conditional writes -----------------------------------------------------------
@dataclass
class ApplyPlan:
    """What apply-if-newer writes for a batch, decided from the stored records the batch touches."""

    writes: list[Record] = field(default_factory=list)  # whole records to store (entities with merged purge points)
    purges: list[tuple[str, str, int]] = field(default_factory=list)  # (scope, entity, purge point) that rose
    count: int = 0  # records that replaced stored state
    touched: set[tuple[str, str]] = field(default_factory=set)  # live entities whose embedding text may change


def apply_keys(records: Sequence[Record]) -> list[RecordKey]:
    """The records' own keys and the entities whose purge points decide whether their children apply."""
    return tombstone_keys(newest_per_key(records))


def plan_apply(records: Sequence[Record], stored: Stored) -> ApplyPlan:
    """The record rules (docs/design.md, Versions) for stores that must read, decide and write themselves (Qdrant,
    Neo4j): the newer version wins, purge points merge by max, children older than a purge point are deleted
    (`purges`) or never written. `stored` must hold `apply_keys(records)`."""
    out = ApplyPlan()
    now = dict(stored)
    recs = newest_per_key(records)
    for e in (r for r in recs if isinstance(r, EntityRecord)):
        cur = now.get(e.key)
        old = cur.purged if isinstance(cur, EntityRecord) else 0
        merged = max(old, e.purged)
        if cur is None or e.version > cur.version:
            new: Record = e._replace(purged=merged)
            out.count += 1
        elif merged > old and isinstance(cur, EntityRecord):
            new = cur._replace(purged=merged)
        else:
            continue
        now[e.key] = new
        out.writes.append(new)
        if merged > old:
            out.purges.append((e.scope, e.name, merged))
        if not new.deleted:
            out.touched.add((e.scope, e.name))
    for r in recs:
        if isinstance(r, EntityRecord) or not applies(r, now):
            continue
        now[r.key] = r
        out.writes.append(r)
        out.count += 1
        if isinstance(r, ObservationRecord):
            out.touched.add((r.scope, r.entity))
    return out
