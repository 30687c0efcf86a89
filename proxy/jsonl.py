"""The MCP reference memory server's file format, `memory.jsonl`: one JSON object a line, entities first —
`{"type":"entity","name":...,"entityType":...,"observations":[...]}` and
`{"type":"relation","from":...,"to":...,"relationType":...}`. Parsing names the line of any problem; formatting
writes what the reference server loads back to the same graph."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from adapters.model import Entity, Relation


class JsonlError(ValueError):
    def __init__(self, line: int, problem: str) -> None:
        self.line = line
        super().__init__(f"line {line}: {problem}")


def _strings(value: Any, field: str, line: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise JsonlError(line, f"{field} must be a list of strings")
    return tuple(value)


def _string(obj: dict[str, Any], field: str, line: int) -> str:
    value = obj.get(field)
    if not isinstance(value, str):
        raise JsonlError(line, f"{field} must be a string")
    return value


def parse(lines: Iterable[str]) -> Iterator[tuple[int, Entity | Relation]]:
    """(line number, entity or relation) for every non-blank line; JsonlError naming the line otherwise."""
    for number, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JsonlError(number, f"not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise JsonlError(number, "must be a JSON object")
        kind = obj.get("type")
        if kind == "entity":
            yield number, Entity(_string(obj, "name", number), _string(obj, "entityType", number),
                                 _strings(obj.get("observations", []), "observations", number))
        elif kind == "relation":
            yield number, Relation(_string(obj, "from", number), _string(obj, "to", number),
                                   _string(obj, "relationType", number))
        else:
            raise JsonlError(number, f"type must be \"entity\" or \"relation\", not {kind!r}")


def entity_line(e: Entity) -> str:
    return json.dumps({"type": "entity", "name": e.name, "entityType": e.entity_type,
                       "observations": list(e.observations)}, ensure_ascii=False)


def relation_line(r: Relation) -> str:
    return json.dumps({"type": "relation", "from": r.source, "to": r.target, "relationType": r.relation_type},
                      ensure_ascii=False)
