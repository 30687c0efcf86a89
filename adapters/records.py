"""Versioned records: the unit every replicated write, backfill batch and verify digest works on.

An entity, each of its observations and each relation is its own record, so replicating a change never needs a
read-back or a delta: every replicated write carries a whole record, applied only if newer (docs/design.md, Versions).

Entity records also carry `purged`, the highest version at which that entity key was ever deleted. It survives
re-creation, and a child (observation or relation touching the entity) older than it is hidden. Because `purged`
merges by max and everything else by highest version, applying the same records in any order converges.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import Any, NamedTuple, TypeAlias

from adapters.model import Metadata


class Kind(IntEnum):
    """Record kinds, in the order `list_records` walks them."""

    ENTITY = 0
    OBSERVATION = 1
    RELATION = 2


# Records are NamedTuples rather than frozen dataclasses: just as immutable, but built three times faster (a frozen
# dataclass sets each field through object.__setattr__), and building them is most of what reading a page costs a
# backfill. An empty read-only mapping stands in for "no metadata", shared safely because nobody can change it.
NO_METADATA: Metadata = MappingProxyType({})


class EntityRecord(NamedTuple):
    scope: str
    name: str
    entity_type: str
    version: int
    created: int  # version at which this incarnation was created; orders search results' ties, kept on restamp
    purged: int = 0
    deleted: bool = False
    metadata: Metadata = NO_METADATA

    @property
    def key(self) -> RecordKey:
        return (Kind.ENTITY, self.scope, (self.name,))


class ObservationRecord(NamedTuple):
    scope: str
    entity: str
    text: str
    version: int
    created: int  # first-added version: observations are listed in this order
    deleted: bool = False

    @property
    def key(self) -> RecordKey:
        return (Kind.OBSERVATION, self.scope, (self.entity, self.text))


class RelationRecord(NamedTuple):
    scope: str
    source: str
    relation_type: str
    target: str
    version: int
    deleted: bool = False
    metadata: Metadata = NO_METADATA

    @property
    def key(self) -> RecordKey:
        return (Kind.RELATION, self.scope, (self.source, self.relation_type, self.target))


Record: TypeAlias = EntityRecord | ObservationRecord | RelationRecord
# (kind, scope, natural key within the scope): the order of `list_records` and of verify's merge.
RecordKey: TypeAlias = tuple[Kind, str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class RecordPage:
    records: tuple[Record, ...]
    # Resume after this key; None when the walk is complete.
    next_after: RecordKey | None


@dataclass(frozen=True, slots=True)
class Counts:
    entities: int = 0
    observations: int = 0
    relations: int = 0

    @property
    def total(self) -> int:
        return self.entities + self.observations + self.relations


def record_digest(record: Record) -> str:
    """A digest of a record's replicated content, version included: equal digests mean equal records."""
    payload: list[object]
    if isinstance(record, EntityRecord):
        payload = [
            "e", record.scope, record.name, record.entity_type, record.version, record.created,
            record.purged, record.deleted, sorted(record.metadata.items()),
        ]
    elif isinstance(record, ObservationRecord):
        payload = ["o", record.scope, record.entity, record.text, record.version, record.created, record.deleted]
    else:
        payload = [
            "r", record.scope, record.source, record.relation_type, record.target, record.version,
            record.deleted, sorted(record.metadata.items()),
        ]
    raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def same_content(a: Record, b: Record) -> bool:
    """`record_digest(a) == record_digest(b)`, without the digests when plain equality decides: the same kind of
    record, equal field by field, and no metadata (JSON values, where Python's equality is looser than JSON's: True,
    1 and 1.0 are equal in Python, not in a digest). Verify compares every record of two stores this way; the digests
    cost 20 µs a pair, the tuple comparison well under one."""
    if type(a) is not type(b):
        return False
    if not getattr(a, "metadata", None) and not getattr(b, "metadata", None) and a == b \
            and type(a.deleted) is type(b.deleted):
        return True
    return record_digest(a) == record_digest(b)


def embedding_text(name: str, entity_type: str, observations: tuple[str, ...]) -> str:
    """What an entity's embedding is computed from (docs/design.md, Data model)."""
    return f"{name} {entity_type} {' '.join(observations)}".strip()


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def dump_metadata(metadata: Any) -> str:
    return json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False)


def load_metadata(text: str) -> dict[str, Any]:
    """`dump_metadata`'s inverse. Most records carry none; skipping the parser for them is a tenth of a page read."""
    return {} if text == "{}" else dict(json.loads(text))


def kinds_after(after: RecordKey | None) -> Iterator[tuple[Kind, tuple[str, ...]]]:
    """Where a walk in record order resumes after `after`: each kind still to visit, in order, with the key
    position to continue after within it (empty: from the kind's start)."""
    start = after[0] if after else Kind.ENTITY
    for kind in Kind:
        if kind >= start:
            yield kind, ((after[1], *after[2]) if after and kind == after[0] else ())


def parents_of(key: RecordKey) -> list[RecordKey]:
    """The entity keys a child record hangs from (its entity; a relation's two endpoints); none for an entity."""
    kind, scope, parts = key
    if kind == Kind.OBSERVATION:
        return [(Kind.ENTITY, scope, (parts[0],))]
    if kind == Kind.RELATION:
        return [(Kind.ENTITY, scope, (parts[0],)), (Kind.ENTITY, scope, (parts[2],))]
    return []


def key_text(key: RecordKey) -> str:
    """A record key as operators read it: `kind:scope:part/part` (control characters shown escaped)."""
    text = f"{key[0].name.lower()}:{key[1]}:{'/'.join(key[2])}"
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def encode_cursor(kind: Kind, after: Sequence[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps([int(kind), list(after)]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[Kind, tuple[str, ...]]:
    """Raises ValueError on anything that is not a cursor a store handed out. The format is the same on every
    store (the last key read), so a token from one store resumes on another."""
    try:
        kind, after = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        parsed = Kind(kind), tuple(str(a) for a in after)
        if parsed[0] == Kind.OBSERVATION or len(parsed[1]) != (1 if parsed[0] == Kind.ENTITY else 3):
            raise ValueError(cursor)
        return parsed
    except Exception as exc:
        raise ValueError("page_token is not a token returned by ReadGraph") from exc


def newest_per_key(records: Sequence[Record]) -> list[Record]:
    """One record per key (the newest; for an entity, with the highest purge point seen): one statement cannot
    update a row twice."""
    best: dict[RecordKey, Record] = {}
    top_purge: dict[RecordKey, int] = {}
    for r in records:
        cur = best.get(r.key)
        if cur is None or r.version > cur.version:
            best[r.key] = r
        if isinstance(r, EntityRecord):
            top_purge[r.key] = max(top_purge.get(r.key, 0), r.purged)
    return [EntityRecord(r.scope, r.name, r.entity_type, r.version, r.created, top_purge[r.key], r.deleted,
                         r.metadata) if isinstance(r, EntityRecord) else r for r in best.values()]
