"""Answers that fit the message limit: read answers are bounded by bytes as well as by count.

A store pages `ReadGraph` by count; a page of large entities could still exceed what gRPC (or MCP) may send, and
`SearchNodes`, `OpenNodes` and `SemanticSearch` are not paged at all. Each answer is measured here, before it is
converted to a wire message, and cut where the next item would no longer fit:
- a `ReadGraph` page ends early and its token resumes right after the last item sent, so paging goes on;
- the unpaged reads send what fits and say in `truncated` what was left out, and how to get it;
- a single entity larger than the whole budget (only data stored before `max_entity_bytes` existed can be) is sent
  with as many observations as fit, and `truncated` names it, so no record can make a scope unreadable.
The sizes are upper bounds of the protobuf encoding (each field's tag and length prefix counted at its widest).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import orjson

from adapters.model import Entity, Graph, GraphPage, Relation, ScoredEntity, SearchResult
from adapters.records import Kind, encode_cursor
from proxy.routing.validation import entity_bytes

# Room left for the message's own framing and the fields not counted item by item.
_MARGIN = 64 * 1024
_FIELD = 6  # a tag and a length prefix of up to five bytes: the most any length-delimited field costs


def _strings(values: Iterable[str]) -> int:
    return sum(len(v.encode()) + _FIELD for v in values)


def entity_size(ent: Entity) -> int:
    """Its text (`validation.entity_bytes`, what `max_entity_bytes` bounds) and a tag and length for every field:
    the entity, name, type, each observation, each metadata entry with its key and value."""
    return entity_bytes(ent) + _FIELD * (3 + len(ent.observations) + 3 * len(ent.metadata))


def relation_size(rel: Relation) -> int:
    return (_FIELD + _strings((rel.source, rel.target, rel.relation_type))
            + sum(_strings((k, v)) + _FIELD for k, v in rel.metadata.items()))


def budget(max_message_bytes: int) -> int:
    return max(4096, max_message_bytes - _MARGIN)


def _shrink(ent: Entity, room: int) -> Entity:
    """`ent` with as many of its observations as fit in `room` bytes (metadata dropped if even that does not)."""
    bare = replace(ent, observations=(), metadata={})
    if entity_size(replace(ent, observations=())) <= room:
        bare = replace(ent, observations=())
    used, kept = entity_size(bare), []
    for obs in ent.observations:
        cost = len(obs.encode()) + _FIELD
        if used + cost > room:
            break
        kept.append(obs)
        used += cost
    return replace(bare, observations=tuple(kept))


def _oversized(ent: Entity, room: int) -> str:
    return (f"entity {ent.name!r} holds {entity_size(ent)} bytes, more than one answer may carry ({room}); "
            "it is sent with only the observations that fit")


def fit_page(page: GraphPage, max_message_bytes: int) -> GraphPage:
    """The page cut where the next item would not fit, with its measured `size` (a caller gathering pages into one
    answer adds these up instead of measuring every item again)."""
    room = budget(max_message_bytes)
    used = 0
    for i, ent in enumerate(page.entities):
        size = entity_size(ent)
        if used + size > room:
            if i == 0:  # alone too large: send what fits of it and resume after it
                cut = _shrink(ent, room)
                return GraphPage((cut,), (), encode_cursor(Kind.ENTITY, (ent.name,)), _oversized(ent, room),
                                 entity_size(cut))
            return GraphPage(page.entities[:i], (), encode_cursor(Kind.ENTITY, (page.entities[i - 1].name,)),
                             size=used)
        used += size
    for j, rel in enumerate(page.relations):
        size = relation_size(rel)
        if used + size > room:
            if j == 0 and not page.entities:
                return replace(page, size=used + size)  # cannot happen within the metadata limits; never stall
            resume = encode_cursor(Kind.RELATION, page.relations[j - 1].key) if j else \
                encode_cursor(Kind.ENTITY, (page.entities[-1].name,))
            return GraphPage(page.entities, page.relations[:j], resume, size=used)
        used += size
    return replace(page, size=used)


def _fit_entities(entities: tuple[Entity, ...], room: int) -> tuple[tuple[Entity, ...], int, str]:
    """The entities that fit (at least the first, shrunk if need be), the bytes they take, and the note."""
    used = 0
    for i, ent in enumerate(entities):
        size = entity_size(ent)
        if used + size > room:
            if i == 0:
                cut = _shrink(ent, room)
                return (cut,), entity_size(cut), _oversized(ent, room)
            return entities[:i], used, (f"answer cut at the message limit: {i} of {len(entities)} entities sent; "
                                        "narrow the query, open fewer names at a time, or page with ReadGraph")
        used += size
    return entities, used, ""


def _fit_relations(relations: tuple[Relation, ...], room: int) -> tuple[tuple[Relation, ...], str]:
    used = 0
    for j, rel in enumerate(relations):
        used += relation_size(rel)
        if used > room:
            return relations[:j], (f"answer cut at the message limit: {j} of {len(relations)} relations sent; "
                                   "open fewer names at a time, or page with ReadGraph")
    return relations, ""


def fit_graph(graph: Graph, max_message_bytes: int) -> Graph:
    room = budget(max_message_bytes)
    entities, used, note = _fit_entities(graph.entities, room)
    relations, rel_note = _fit_relations(graph.relations, room - used)
    if len(entities) < len(graph.entities):  # relations of entities left out are not sent either
        kept = {e.name for e in entities}
        relations = tuple(r for r in relations if r.source in kept or r.target in kept)
    return Graph(entities, relations, note or rel_note)


def fit_search(result: SearchResult, max_message_bytes: int) -> SearchResult:
    room = budget(max_message_bytes) - 2 * _FIELD * len(result.results)  # each hit's wrapper and score
    entities, used, note = _fit_entities(tuple(r.entity for r in result.results), room)
    hits = tuple(ScoredEntity(e, r.score) for e, r in zip(entities, result.results, strict=False))
    relations, rel_note = _fit_relations(result.relations, room - used)
    if len(hits) < len(result.results):
        kept = {h.entity.name for h in hits}
        relations = tuple(r for r in relations if r.source in kept or r.target in kept)
    return SearchResult(hits, relations, note or rel_note)


# --- MCP answers -------------------------------------------------------------------------------------------------
# An MCP tool's answer carries every item twice: in the structured content (compact JSON) and inside the text content
# (the same JSON indented by two, as the reference server's `JSON.stringify(x, null, 2)`, then escaped as one JSON
# string). Both are measured here, per item, so a whole-graph answer stops at the budget item by item.
_JSON_LINE = 2 + 12  # an escaped newline and the widest indentation an item's line gets inside the answer
_JSON_ITEM = 8  # the separators around an item in both copies


def json_item_size(item: Mapping[str, object]) -> int:
    """An upper bound of the bytes one entity or relation dict adds to an MCP answer."""
    compact = orjson.dumps(item)
    escapes = compact.count(b'"') + compact.count(b"\\")  # each gains a backslash inside the text content
    lines = 4 + len(item) + sum(len(v) for v in item.values() if isinstance(v, list))
    return 2 * len(compact) + escapes + len(item) + lines * _JSON_LINE + _JSON_ITEM


def shrink_json_item(item: dict[str, Any], room: int) -> dict[str, Any]:
    """An entity dict alone larger than `room` bytes of an MCP answer, with the longest prefix of its observations
    that fits (found by halving: the size grows with every observation kept)."""
    observations = item["observations"]
    low, high = 0, len(observations)
    while low < high:
        mid = (low + high + 1) // 2
        if json_item_size({**item, "observations": observations[:mid]}) <= room:
            low = mid
        else:
            high = mid - 1
    return {**item, "observations": observations[:low]}
