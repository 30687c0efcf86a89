"""Input validation, on domain objects, before any version is stamped or any store is touched.

Each check raises InvalidInput (or OverLimit) naming the exact field, so a caller can fix the request. Because
validation runs on the whole request first, a rejected call stores nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence, Sized

from adapters.errors import InvalidInput, OverLimit
from adapters.model import Entity, ObservationAddition, ObservationDeletion, Relation
from policies.numbers import problem
from proxy.runtime.config import Limits

SCOPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")  # always fullmatch: `$` also matches before a "\n"
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# The one value domain every store round-trips: any Unicode text but NUL (PostgreSQL's text type cannot hold it)
# and unpaired surrogates (not encodable as UTF-8; JSON over MCP can carry them, protobuf cannot).
_UNSTORABLE_RE = re.compile(r"[\x00\ud800-\udfff]")


def scope(value: str) -> str:
    if not value:
        raise InvalidInput("scope", "is required (one agent's or team's memory, e.g. 'agent-42')")
    if not SCOPE_RE.fullmatch(value):
        raise InvalidInput("scope", f"{value[:40]!r} is malformed: 1-128 characters of [A-Za-z0-9._:/-],"
                                    " starting with a letter or digit")
    return value


def text(field: str, value: str, max_chars: int, *, required: bool = True, single_line: bool = True) -> None:
    if required and not value.strip():
        raise InvalidInput(field, "must not be empty")
    if len(value) > max_chars:
        raise InvalidInput(field, f"is {len(value)} characters long, at most {max_chars} allowed")
    if single_line and _CONTROL_RE.search(value):
        raise InvalidInput(field, "must not contain control characters (U+0000-U+001F, U+007F)")
    bad = _UNSTORABLE_RE.search(value)
    if bad:
        what = "NUL (U+0000)" if bad.group() == "\x00" else f"an unpaired surrogate (U+{ord(bad.group()):04X})"
        raise InvalidInput(field, f"must not contain {what}; no store can keep it (at character {bad.start()})")


def count(field: str, items: Sized, limit: int) -> None:
    """An empty list is a no-op, as in the MCP memory server (LLM agents do send them); too many is refused before
    any item is converted or checked, so the work an oversized request costs is bounded."""
    if len(items) > limit:
        raise OverLimit(field, f"has {len(items)} items, at most {limit} per call")


def metadata_entries(field: str, value: Sized, limits: Limits) -> None:
    if len(value) > limits.max_metadata_entries:
        raise OverLimit(field, f"has {len(value)} entries, at most {limits.max_metadata_entries}")


def metadata(field: str, value: Mapping[str, str], limits: Limits) -> None:
    metadata_entries(field, value, limits)
    for key, val in value.items():
        text(f"{field}[{key[:20]!r}]", key, limits.max_name_chars)
        text(f"{field}[{key[:20]!r}]", val, limits.max_metadata_chars, required=False, single_line=False)


def entities(items: Sequence[Entity], limits: Limits) -> None:
    count("entities", items, limits.max_items_per_call)
    for i, ent in enumerate(items):
        text(f"entities[{i}].name", ent.name, limits.max_name_chars)
        text(f"entities[{i}].entity_type", ent.entity_type, limits.max_type_chars)
        observations(f"entities[{i}].observations", ent.observations, limits)
        metadata(f"entities[{i}].metadata", ent.metadata, limits)
        size = entity_bytes(ent)
        if size > limits.max_entity_bytes:
            raise OverLimit(f"entities[{i}]", f"holds {size} bytes of text, at most {limits.max_entity_bytes} per "
                                            "entity (name, type, observations and metadata together)")


def entity_bytes(ent: Entity) -> int:
    """What one entity holds, in UTF-8 bytes: the figure `max_entity_bytes` bounds."""
    return (len(ent.name.encode()) + len(ent.entity_type.encode()) + sum(len(o.encode()) for o in ent.observations)
            + sum(len(k.encode()) + len(v.encode()) for k, v in ent.metadata.items()))


def observations(field: str, items: Sequence[str], limits: Limits) -> None:
    count(field, items, limits.max_observations_per_entity)
    for j, obs in enumerate(items):
        text(f"{field}[{j}]", obs, limits.max_observation_chars, single_line=False)


def relations(items: Sequence[Relation], limits: Limits, *, with_metadata: bool = True) -> None:
    count("relations", items, limits.max_items_per_call)
    for i, rel in enumerate(items):
        text(f"relations[{i}].from", rel.source, limits.max_name_chars)
        text(f"relations[{i}].to", rel.target, limits.max_name_chars)
        text(f"relations[{i}].relation_type", rel.relation_type, limits.max_type_chars)
        if with_metadata:
            metadata(f"relations[{i}].metadata", rel.metadata, limits)


def additions(items: Sequence[ObservationAddition], limits: Limits) -> None:
    count("observations", items, limits.max_items_per_call)
    for i, add in enumerate(items):
        text(f"observations[{i}].entity_name", add.entity_name, limits.max_name_chars)
        observations(f"observations[{i}].contents", add.contents, limits)


def deletions(items: Sequence[ObservationDeletion], limits: Limits) -> None:
    count("deletions", items, limits.max_items_per_call)
    for i, dele in enumerate(items):
        text(f"deletions[{i}].entity_name", dele.entity_name, limits.max_name_chars)
        observations(f"deletions[{i}].observations", dele.observations, limits)


def names(field: str, items: Sequence[str], limits: Limits) -> None:
    count(field, items, limits.max_items_per_call)
    for i, name in enumerate(items):
        text(f"{field}[{i}]", name, limits.max_name_chars)


def query(value: str, limits: Limits) -> None:
    text("query", value, limits.max_query_chars, single_line=False)


def page_size(value: int, limits: Limits) -> int:
    if value < 0:
        raise InvalidInput("page_size", "must not be negative")
    if value > limits.max_page_size:
        raise InvalidInput("page_size", f"is {value}, at most {limits.max_page_size}")
    return value or limits.default_page_size


def search_limit(value: int, limits: Limits) -> int:
    if value < 0:
        raise InvalidInput("limit", "must not be negative")
    if value > limits.max_search_limit:
        raise InvalidInput("limit", f"is {value}, at most {limits.max_search_limit}")
    return value or 10


def within(field: str, value: float, low: float, high: float) -> None:
    """Every number an operator supplies passes here (or policies.numbers directly): finite and in range."""
    if (why := problem(value, low, high)) is not None:
        raise InvalidInput(field, why)


def min_score(value: float | None) -> float | None:
    if value is not None and problem(value, -1.0, 1.0) is not None:
        raise InvalidInput("min_score", f"is {value}, must be a cosine similarity in [-1, 1]")
    return value


def entity_types(items: Sequence[str], limits: Limits) -> None:
    count("entity_types", items, limits.max_items_per_call)
    for i, t in enumerate(items):
        text(f"entity_types[{i}]", t, limits.max_type_chars)
