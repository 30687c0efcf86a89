"""`memshift import` and `memshift export`: a scope's memory in and out as the MCP reference server's memory.jsonl,
through a running proxy (so an import during a migration is dual-written like any other write).

An import reads the file three times, never holding it: first every line is parsed and checked against the API's
own rules (a bad line is reported with its number and nothing is written), then entities go in batches (an entity
that exists gets the observations it lacks, as the reference server's add would), then relations. Running it again
changes nothing: every step skips what exists. `--dry-run` reports what would change and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO, TypeVar

from adapters.model import Entity, Relation
from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc as pb_grpc
from proxy import convert, jsonl
from proxy import validation as check
from proxy.config import Limits
from proxy.errors import InvalidInput

T = TypeVar("T")
ENTITY_BATCH = 200
RELATION_BATCH = 500


class Progress:
    """One line on stderr, redrawn: done/total, rate, ETA."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self._what, self._out = total, what, sys.stderr
        self._started = time.monotonic()
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        spent = max(1e-6, time.monotonic() - self._started)
        rate = self.done / spent
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self._out.write(f"\r{self._what} {self.done}/{self.total}  {rate:,.0f} records/s  ETA {eta:.0f}s   ")
        self._out.flush()

    def end(self) -> float:
        self._out.write("\n")
        return self.done / max(1e-6, time.monotonic() - self._started)


def _records(path: Path) -> Iterator[tuple[int, Entity | Relation]]:
    with path.open(encoding="utf-8") as f:
        yield from jsonl.parse(f)


def _batches(path: Path, kind: type[T], size: int) -> Iterator[list[T]]:
    """The file's records of one kind, `size` at a time (the file is read again for each kind)."""
    batch: list[T] = []
    for _, rec in _records(path):
        if isinstance(rec, kind):
            batch.append(rec)
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


def check_file(path: Path, limits: Limits) -> tuple[int, int]:
    """(entities, relations) in the file; raises JsonlError naming the first bad line, before anything is written."""
    entities = relations = 0
    for number, rec in _records(path):
        try:
            if isinstance(rec, Entity):
                check.entities([rec], limits)
                entities += 1
            else:
                check.relations([rec], limits)
                relations += 1
        except InvalidInput as exc:
            field = str(exc).replace("entities[0]", "entity").replace("relations[0]", "relation")
            raise jsonl.JsonlError(number, field) from None
    return entities, relations


async def import_file(stub: pb_grpc.MemoryStub, path: Path, scope: str, dry_run: bool,
                      metadata: tuple[tuple[str, str], ...] = ()) -> dict[str, float]:
    out = sys.stdout
    n_entities, n_relations = check_file(path, Limits())
    progress = Progress(n_entities + n_relations, "would import" if dry_run else "imported")
    created = added = related = 0
    for ents in _batches(path, Entity, ENTITY_BATCH):
        names = [e.name for e in ents]
        found = await stub.OpenNodes(pb.OpenNodesRequest(scope=scope, names=names), metadata=metadata)
        have = {e.name: set(e.observations) for e in found.entities}
        if dry_run:
            created += sum(1 for e in ents if e.name not in have)
            added += sum(len(set(e.observations) - have[e.name]) for e in ents if e.name in have)
        else:
            res = await stub.CreateEntities(pb.CreateEntitiesRequest(
                scope=scope, entities=[convert.entity_out(e) for e in ents if e.name not in have]), metadata=metadata)
            created += len(res.created)
            more = [pb.ObservationAddition(entity_name=e.name, contents=sorted(set(e.observations) - have[e.name]))
                    for e in ents if e.name in have and set(e.observations) - have[e.name]]
            if more:
                got = await stub.AddObservations(pb.AddObservationsRequest(scope=scope, observations=more),
                                                 metadata=metadata)
                added += sum(len(r.added_observations) for r in got.results)
        progress.add(len(ents))
    for rels in _batches(path, Relation, RELATION_BATCH):
        if dry_run:
            found = await stub.OpenNodes(pb.OpenNodesRequest(scope=scope, names=sorted({r.source for r in rels})),
                                         metadata=metadata)
            existing = {(getattr(r, "from"), r.relation_type, r.to) for r in found.relations}
            related += sum(1 for r in rels if r.key not in existing)
        else:
            res = await stub.CreateRelations(pb.CreateRelationsRequest(
                scope=scope, relations=[convert.relation_out(r) for r in rels]), metadata=metadata)
            related += len(res.created)
        progress.add(len(rels))
    rate = progress.end()
    verb = "would create" if dry_run else "created"
    out.write(f"{verb} {created} entities, {'would add' if dry_run else 'added'} {added} observations to existing "
              f"ones, {verb} {related} relations ({n_entities + n_relations} records, {rate:,.0f} records/s)\n")
    return {"entities": created, "observations": added, "relations": related, "rate": rate}


async def export_file(stub: pb_grpc.MemoryStub, scope: str, sink: TextIO,
                      metadata: tuple[tuple[str, str], ...] = ()) -> dict[str, float]:
    """The scope as memory.jsonl: entities first (name order), then relations, a line each."""
    started, count, token = time.monotonic(), 0, ""
    progress = Progress(0, "exported")
    while True:
        page = await stub.ReadGraph(pb.ReadGraphRequest(scope=scope, page_token=token), metadata=metadata)
        for e in page.entities:
            sink.write(jsonl.entity_line(convert.entity_in(e)) + "\n")
        for r in page.relations:
            sink.write(jsonl.relation_line(convert.relation_in(r)) + "\n")
        count += len(page.entities) + len(page.relations)
        progress.total = count
        progress.add(len(page.entities) + len(page.relations))
        token = page.next_page_token
        if not token:
            break
    progress.end()
    return {"records": count, "rate": count / max(1e-6, time.monotonic() - started)}


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                client: Callable[..., argparse.ArgumentParser]) -> None:
    p = client(sub, "import", "import a memory.jsonl file (the MCP memory server's format) into a scope")
    p.add_argument("file", type=Path)
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    p = client(sub, "export", "export a scope as memory.jsonl (the MCP memory server's format)")
    p.add_argument("--format", choices=["mcp-jsonl"], default="mcp-jsonl")
    p.add_argument("--output", "-o", type=Path, help="file to write (default: standard output)")
