"""The `memshift-jsonl` backup format: every stored record of a store (or of one scope) with what the MCP format
drops: versions, creation stamps, purge points, tombstones, metadata, and the vectors with the model that made them.

One JSON object a line. The first line is the header; then records in the order a store lists them (entities,
observations, relations), each vector right after the last record of its entity (see `page_lines`):

    {"format": "memshift-jsonl", "formatVersion": 1, "model": "all-MiniLM-L6-v2", "dimension": 384, "scope": "a"}
    {"kind": "entity", "scope": "a", "name": "alice", "entityType": "person", "version": 7, "created": 7,
     "purged": 0, "deleted": false, "metadata": {}}
    {"kind": "observation", "scope": "a", "entity": "alice", "text": "likes tea", "version": 7, "created": 7,
     "deleted": false}
    {"kind": "relation", "scope": "a", "from": "alice", "relationType": "knows", "to": "bob", "version": 9,
     "deleted": false, "metadata": {}}
    {"kind": "vector", "scope": "a", "entity": "alice", "textHash": "...", "values": "<base64 float32 LE>"}

The same lines travel on the admin API (ExportRecords, ImportRecords), so the file and the wire have one definition,
this module's, and the proxy parses what it is sent with the same rules a file is checked with before it is sent.
Parsing checks every field against the API's value domain (`proxy.routing.validation`) and names the line and the field.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapters.base import VectorMap
from adapters.embedder import Vector
from adapters.errors import InvalidInput, JsonlError
from adapters.records import EntityRecord, ObservationRecord, Record, RelationRecord
from proxy.formats.jsonl import json_object
from proxy.routing import validation as check
from proxy.runtime.config import Limits

FORMAT = "memshift-jsonl"
FORMAT_VERSION = 1
MAX_VERSION = 2**63 - 1  # versions are signed 64-bit integers in every store


@dataclass(frozen=True, slots=True)
class Header:
    model: str
    dimension: int
    scope: str | None  # None: every scope


@dataclass(frozen=True, slots=True)
class VectorLine:
    scope: str
    entity: str
    text_hash: str
    values: Vector


def header_line(h: Header) -> str:
    return json.dumps({"format": FORMAT, "formatVersion": FORMAT_VERSION, "model": h.model,
                       "dimension": h.dimension, "scope": h.scope})


def record_line(rec: Record) -> str:
    body: dict[str, Any]
    if isinstance(rec, EntityRecord):
        body = {"kind": "entity", "scope": rec.scope, "name": rec.name, "entityType": rec.entity_type,
                "version": rec.version, "created": rec.created, "purged": rec.purged, "deleted": rec.deleted,
                "metadata": dict(rec.metadata)}
    elif isinstance(rec, ObservationRecord):
        body = {"kind": "observation", "scope": rec.scope, "entity": rec.entity, "text": rec.text,
                "version": rec.version, "created": rec.created, "deleted": rec.deleted}
    else:
        body = {"kind": "relation", "scope": rec.scope, "from": rec.source, "relationType": rec.relation_type,
                "to": rec.target, "version": rec.version, "deleted": rec.deleted, "metadata": dict(rec.metadata)}
    return json.dumps(body, ensure_ascii=False)


def vector_lines(vectors: VectorMap) -> Iterator[str]:
    for (scope, entity), (text_hash, values) in vectors.items():
        raw = np.asarray(values, dtype="<f4").tobytes()
        yield json.dumps({"kind": "vector", "scope": scope, "entity": entity, "textHash": text_hash,
                          "values": base64.b64encode(raw).decode()}, ensure_ascii=False)


def _owner(rec: Record) -> tuple[str, str] | None:
    if isinstance(rec, EntityRecord):
        return rec.scope, rec.name
    if isinstance(rec, ObservationRecord):
        return rec.scope, rec.entity
    return None


def page_lines(records: Sequence[Record], vectors: VectorMap) -> list[str]:
    """One exported page: its records, each vector right after the last record of its entity on the page.

    A store takes a carried vector only for an entity the same apply changed (and only if it matches the text then
    held), so a restore must send a vector together with that record: it never cuts a chunk before a vector line.
    """
    last = {owner: i for i, r in enumerate(records) if (owner := _owner(r)) is not None}
    after: dict[int, list[tuple[str, str]]] = {}
    loose: list[tuple[str, str]] = []
    for key in vectors:
        (after.setdefault(last[key], []) if key in last else loose).append(key)
    out: list[str] = []
    for i, rec in enumerate(records):
        out.append(record_line(rec))
        out.extend(vector_lines({k: vectors[k] for k in after.get(i, ())}))
    out.extend(vector_lines({k: vectors[k] for k in loose}))
    return out


def is_vector_line(line: str) -> bool:
    """Cheaply, without parsing: vector lines start with their kind (as `vector_lines` writes them)."""
    return line.startswith('{"kind": "vector"')


class _Fields:
    """One line's object, read field by field; every problem names the line and the field."""

    def __init__(self, obj: dict[str, Any], number: int, limits: Limits) -> None:
        self._obj, self.number, self._limits = obj, number, limits

    def fail(self, field: str, message: str) -> JsonlError:
        return JsonlError(self.number, f"{field} {message}")

    def string(self, field: str, max_chars: int, *, required: bool = True, single_line: bool = True) -> str:
        value = self._obj.get(field)
        if not isinstance(value, str):
            raise self.fail(field, "must be a string")
        try:
            check.text(field, value, max_chars, required=required, single_line=single_line)
        except InvalidInput as exc:
            raise JsonlError(self.number, str(exc)) from None
        return value

    def scope(self) -> str:
        value = self._obj.get("scope")
        if not isinstance(value, str):
            raise self.fail("scope", "must be a string")
        try:
            return check.scope(value)
        except InvalidInput as exc:
            raise JsonlError(self.number, str(exc)) from None

    def version(self, field: str, *, positive: bool = True) -> int:
        value = self._obj.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or not (1 if positive else 0) <= value <= MAX_VERSION:
            low = 1 if positive else 0
            raise self.fail(field, f"must be an integer from {low} to {MAX_VERSION}")
        return value

    def flag(self, field: str) -> bool:
        value = self._obj.get(field, False)
        if not isinstance(value, bool):
            raise self.fail(field, "must be true or false")
        return value

    def metadata(self) -> Mapping[str, str]:
        value = self._obj.get("metadata", {})
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise self.fail("metadata", "must be an object of strings")
        try:
            check.metadata("metadata", value, self._limits)
        except InvalidInput as exc:
            raise JsonlError(self.number, str(exc)) from None
        return value


def _header(obj: dict[str, Any], number: int) -> Header:
    if obj.get("format") != FORMAT:
        raise JsonlError(number, f"the first line must be the {FORMAT} header (is this a memory.jsonl file? "
                                 "import it with --format mcp-jsonl)")
    if obj.get("formatVersion") != FORMAT_VERSION:
        raise JsonlError(number, f"formatVersion {obj.get('formatVersion')!r} is not one this proxy reads "
                                 f"({FORMAT_VERSION})")
    model, dimension, scope = obj.get("model"), obj.get("dimension"), obj.get("scope")
    if not isinstance(model, str) or not isinstance(dimension, int) or dimension <= 0:
        raise JsonlError(number, "the header needs model (a string) and dimension (a positive integer)")
    if scope is not None and not isinstance(scope, str):
        raise JsonlError(number, "scope must be a string or null")
    return Header(model, dimension, scope)


def _record(f: _Fields, kind: Any, limits: Limits, dimension: int) -> Record | VectorLine:
    if kind == "entity":  # a tombstone keeps no type and no creation stamp
        deleted = f.flag("deleted")
        return EntityRecord(f.scope(), f.string("name", limits.max_name_chars),
                            f.string("entityType", limits.max_type_chars, required=not deleted),
                            f.version("version"), f.version("created", positive=False),
                            f.version("purged", positive=False), deleted, f.metadata())
    if kind == "observation":
        return ObservationRecord(f.scope(), f.string("entity", limits.max_name_chars),
                                 f.string("text", limits.max_observation_chars, single_line=False),
                                 f.version("version"), f.version("created", positive=False), f.flag("deleted"))
    if kind == "relation":
        return RelationRecord(f.scope(), f.string("from", limits.max_name_chars),
                              f.string("relationType", limits.max_type_chars), f.string("to", limits.max_name_chars),
                              f.version("version"), f.flag("deleted"), f.metadata())
    if kind == "vector":
        scope, entity = f.scope(), f.string("entity", limits.max_name_chars)
        text_hash = f.string("textHash", 128)
        try:
            raw = base64.b64decode(f.string("values", dimension * 8), validate=True)
        except ValueError:
            raise f.fail("values", "must be base64") from None
        if len(raw) != dimension * 4:
            raise f.fail("values", f"holds {len(raw) // 4} numbers; the header's dimension is {dimension}")
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if not np.isfinite(values).all():
            raise f.fail("values", "must be finite numbers")
        return VectorLine(scope, entity, text_hash, values)
    raise JsonlError(f.number, f"kind must be entity, observation, relation or vector, not {kind!r}")


def parse_header(raw: str, number: int = 1) -> Header:
    obj = json_object(raw, number)
    if obj is None:
        raise JsonlError(number, f"the first line must be the {FORMAT} header")
    return _header(obj, number)


def parse_body(lines: Iterable[tuple[int, str]], header: Header,
               limits: Limits) -> Iterator[tuple[int, Record | VectorLine]]:
    """(line number, record or vector) for every non-blank numbered line after the header; JsonlError naming the
    line and the field otherwise. A file made for one scope holds that scope only."""
    for number, raw in lines:
        obj = json_object(raw, number)
        if obj is None:
            continue
        item = _record(_Fields(obj, number, limits), obj.get("kind"), limits, header.dimension)
        if header.scope is not None and item.scope != header.scope:
            raise JsonlError(number, f"scope {item.scope!r} is not the file's scope {header.scope!r}")
        yield number, item


def parse(lines: Iterable[str], limits: Limits) -> tuple[Header, Iterator[tuple[int, Record | VectorLine]]]:
    """A whole file: its header, and its records as they are read."""
    numbered = enumerate(lines, 1)
    for number, raw in numbered:
        if raw.strip():
            header = parse_header(raw, number)
            return header, parse_body(numbered, header, limits)
    raise JsonlError(1, f"the file is empty; a {FORMAT} file starts with its header")


def vector_map(items: Iterable[VectorLine]) -> dict[tuple[str, str], tuple[str, Vector]]:
    return {(v.scope, v.entity): (v.text_hash, v.values) for v in items}
