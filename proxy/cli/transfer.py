"""`memshift import` and `memshift export`: a scope's memory in and out as the MCP reference server's memory.jsonl,
through a running proxy (so an import during a migration is dual-written like any other write).

An import reads the file three times, never holding it: first every line is parsed and checked against the API's
own rules (a bad line is reported with its number and nothing is written), then entities go in batches (an entity
that exists gets the observations it lacks, as the reference server's add would), then relations. Running it again
changes nothing: every step skips what exists. `--dry-run` reports what would change and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO, TypeVar

import grpc

from adapters.errors import InvalidInput, JsonlError
from adapters.model import Entity, Relation
from memshift.v1 import admin_pb2 as admin_pb
from memshift.v1 import admin_pb2_grpc as admin_grpc
from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc as pb_grpc
from proxy.cli import admin as admin_cli
from proxy.formats import backup, jsonl
from proxy.routing import validation as check
from proxy.runtime.config import Limits
from proxy.transports import convert

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
            raise JsonlError(number, field) from None
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


# --- memshift-jsonl backups, over the admin API --------------------------------------------------------------------
BACKUP_CHUNK = 500  # lines a call: well under the message limit even with a vector a line


def is_backup(path: Path) -> bool:
    """True when the file starts with a memshift-jsonl header (else it is read as the reference's memory.jsonl)."""
    with path.open(encoding="utf-8") as f:
        for raw in f:
            if raw.strip():
                try:
                    backup.parse_header(raw)
                except JsonlError:
                    return False
                return True
    return False


def check_backup(path: Path, limits: Limits) -> tuple[str, int]:
    """(the header line, records and vectors in the file); raises JsonlError naming the first bad line, before
    anything is sent."""
    with path.open(encoding="utf-8") as f:
        header, body = backup.parse(f, limits)
        n = sum(1 for _ in body)
    return backup.header_line(header), n


def _chunks(path: Path, size: int) -> Iterator[tuple[int, list[str]]]:
    """(line number of the first, lines) of the file after its header, about `size` non-blank lines at a time,
    never cut before a vector line: a vector travels with the record of its entity before it."""
    chunk: list[str] = []
    first = 0
    with path.open(encoding="utf-8") as f:
        numbered = ((n, raw.rstrip("\n")) for n, raw in enumerate(f, 1) if raw.strip())
        next(numbered, None)  # the header
        for number, line in numbered:
            if len(chunk) >= size and not backup.is_vector_line(line):
                yield first, chunk
                chunk = []
            if not chunk:
                first = number
            chunk.append(line)
    if chunk:
        yield first, chunk


async def import_backup(stub: admin_grpc.MigrationAdminStub, path: Path, dry_run: bool,
                        metadata: tuple[tuple[str, str], ...]) -> dict[str, float]:
    """Restore a memshift-jsonl file: checked whole first, then sent a chunk a call (each applied if newer, so a
    chunk sent again after an interrupted run changes nothing), the last one settling the vectors."""
    header, n = check_backup(path, Limits())
    progress = Progress(n, "would restore" if dry_run else "restored")
    newer = vectors = embedded = 0
    used = True
    chunks = list(_chunks(path, BACKUP_CHUNK)) or [(2, [])]
    for i, (first, lines) in enumerate(chunks):
        res = await stub.ImportRecords(admin_pb.ImportRecordsRequest(
            header=header, lines=lines, first_line=first, dry_run=dry_run, finish=i == len(chunks) - 1),
            metadata=metadata)
        newer += res.newer
        vectors += res.vectors
        used = used and (res.vectors_used or not res.vectors)
        embedded += res.embedded
        progress.add(len(lines))
    rate = progress.end()
    verb = "would apply" if dry_run else "applied"
    how = ("vectors kept" if used else "vectors left out: the file's model differs from the store's, so it "
           "re-embeds") if vectors else "no vectors in the file"
    sys.stdout.write(f"{verb} {newer} records newer than the store's (of {n} lines; the rest the store held at the "
                     f"same version or newer); {how}; {embedded} entities embedded ({rate:,.0f} lines/s)\n")
    return {"records": n, "newer": newer, "rate": rate}


async def export_backup(stub: admin_grpc.MigrationAdminStub, scope: str | None, sink: TextIO, vectors: bool,
                        metadata: tuple[tuple[str, str], ...]) -> dict[str, float]:
    started, count = time.monotonic(), 0
    progress = Progress(0, "backed up")
    async for chunk in stub.ExportRecords(admin_pb.ExportRecordsRequest(scope=scope or "", no_vectors=not vectors),
                                          metadata=metadata):
        for line in chunk.lines:
            sink.write(line + "\n")
        progress.total = max(chunk.total, chunk.done)
        progress.add(chunk.done - count)
        count = chunk.done
    progress.end()
    return {"records": count, "rate": count / max(1e-6, time.monotonic() - started)}


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                client: Callable[..., argparse.ArgumentParser]) -> None:
    p = client(sub, "import", "import a memory.jsonl file (the MCP memory server's format) into a scope, or "
                              "restore a memshift-jsonl backup (told apart by its first line)")
    p.add_argument("file", type=Path)
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    _admin_options(p)
    p = client(sub, "export", "export a scope as memory.jsonl (the MCP memory server's format), or back up "
                              "everything a store keeps (--format memshift-jsonl)")
    p.add_argument("--format", choices=["mcp-jsonl", "memshift-jsonl"], default="mcp-jsonl")
    p.add_argument("--all-scopes", action="store_true", help="memshift-jsonl: every scope, not just --scope")
    p.add_argument("--no-vectors", action="store_true", help="memshift-jsonl: leave the vectors out")
    p.add_argument("--output", "-o", type=Path, help="file to write (default: standard output)")
    _admin_options(p)


def _admin_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin-target", default=os.environ.get("MEMSHIFT_ADMIN_TARGET", "127.0.0.1:50052"),
                   help="memshift-jsonl backups go through the admin API")
    p.add_argument("--admin-token", default=os.environ.get("MEMSHIFT_ADMIN_TOKEN"))
    p.add_argument("--admin-token-file", default=os.environ.get("MEMSHIFT_ADMIN_TOKEN_FILE", "./data/admin.token"))


async def run_backup(args: argparse.Namespace) -> bool:
    """`import` of a backup file or `export --format memshift-jsonl`, over the admin API; False for anything else."""
    exporting = args.command == "export" and args.format == "memshift-jsonl"
    if not exporting and not (args.command == "import" and is_backup(args.file)):
        return False
    token = admin_cli.admin_token(args.admin_token, args.admin_token_file, "--admin-token")
    metadata = (("authorization", f"Bearer {token}"), ("x-memshift-actor", os.environ.get("USER", "operator")))
    async with grpc.aio.insecure_channel(args.admin_target) as channel:
        stub = admin_grpc.MigrationAdminStub(channel)
        if not exporting:
            await import_backup(stub, args.file, args.dry_run, metadata)
        elif args.output is None:
            await export_backup(stub, None if args.all_scopes else args.scope, sys.stdout, not args.no_vectors,
                                metadata)
        else:
            with args.output.open("w", encoding="utf-8") as sink:
                await export_backup(stub, None if args.all_scopes else args.scope, sink, not args.no_vectors,
                                    metadata)
    return True
