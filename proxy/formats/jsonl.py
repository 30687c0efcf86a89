"""The MCP reference memory server's record shapes, in one place: its entity `{"name", "entityType", "observations"}`
and relation `{"from", "to", "relationType"}` (what its tools take and answer, proxy.transports.mcp_server), and its
file, `memory.jsonl`: one such object a line with a `"type"`, entities first. Parsing names the line of any problem;
formatting writes what the reference server loads back to the same graph."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from typing_extensions import TypedDict

from adapters.errors import JsonlError
from adapters.model import Entity, Relation


class EntityIn(TypedDict):
    name: str
    entityType: str  # the reference server's field names
    observations: list[str]


RelationIn = TypedDict("RelationIn", {"from": str, "to": str, "relationType": str})


def entity_dict(e: Entity) -> EntityIn:
    return {"name": e.name, "entityType": e.entity_type, "observations": list(e.observations)}


def relation_dict(r: Relation) -> RelationIn:
    return {"from": r.source, "to": r.target, "relationType": r.relation_type}


def entity_of(d: EntityIn) -> Entity:
    return Entity(d["name"], d["entityType"], tuple(d["observations"]))


def relation_of(d: RelationIn) -> Relation:
    return Relation(d["from"], d["to"], d["relationType"])




def _strings(value: Any, field: str, line: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise JsonlError(line, f"{field} must be a list of strings")
    return tuple(value)


def _string(obj: dict[str, Any], field: str, line: int) -> str:
    value = obj.get(field)
    if not isinstance(value, str):
        raise JsonlError(line, f"{field} must be a string")
    return value


def json_object(raw: str, number: int) -> dict[str, Any] | None:
    """One line of a JSON-lines file as an object (None for a blank line); JsonlError naming the line otherwise."""
    text = raw.strip()
    if not text:
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JsonlError(number, f"not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise JsonlError(number, "must be a JSON object")
    return obj


def parse(lines: Iterable[str]) -> Iterator[tuple[int, Entity | Relation]]:
    """(line number, entity or relation) for every non-blank line; JsonlError naming the line otherwise."""
    for number, raw in enumerate(lines, 1):
        obj = json_object(raw, number)
        if obj is None:
            continue
        kind = obj.get("type")
        if kind == "entity":
            yield number, entity_of({"name": _string(obj, "name", number),
                                     "entityType": _string(obj, "entityType", number),
                                     "observations": list(_strings(obj.get("observations", []), "observations",
                                                                   number))})
        elif kind == "relation":
            yield number, relation_of({"from": _string(obj, "from", number), "to": _string(obj, "to", number),
                                       "relationType": _string(obj, "relationType", number)})
        else:
            raise JsonlError(number, f"type must be \"entity\" or \"relation\", not {kind!r}")


def entity_line(e: Entity) -> str:
    return json.dumps({"type": "entity", **entity_dict(e)}, ensure_ascii=False)


def relation_line(r: Relation) -> str:
    return json.dumps({"type": "relation", **relation_dict(r)}, ensure_ascii=False)
