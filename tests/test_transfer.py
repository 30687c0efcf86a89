"""memory.jsonl in and out through a running proxy: the MCP reference server's format imported (streaming, checked
first, nothing half done, idempotent, a dry run that writes nothing) and exported back to the same graph."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

from memshift.v1 import memory_pb2 as pb
from proxy.cli.main import main
from proxy.formats import jsonl
from tests.cluster import Cluster

REFERENCE = "\n".join([
    '{"type":"entity","name":"alice","entityType":"person","observations":["drinks green tea","lives in Paris"]}',
    '{"type":"entity","name":"paris","entityType":"city","observations":[]}',
    "",
    '{"type":"entity","name":"Straße 7","entityType":"place","observations":["\\"quoted\\" and ünïcode ✓"]}',
    '{"type":"relation","from":"alice","to":"paris","relationType":"lives_in"}',
    '{"type":"relation","from":"alice","to":"Straße 7","relationType":"visits"}',
])  # no final newline, a blank line: both fine, as for the reference server


async def cli(c: Cluster, *args: str) -> int:
    return await asyncio.to_thread(main, [*args[:1], "--target", f"127.0.0.1:{c.server.port}", *args[1:]])


async def graph(c: Cluster, scope: str) -> tuple[dict[str, tuple[str, set[str]]], set[tuple[str, str, str]]]:
    g = await c.memory.ReadGraph(pb.ReadGraphRequest(scope=scope))
    return ({e.name: (e.entity_type, set(e.observations)) for e in g.entities},
            {(getattr(r, "from"), r.relation_type, r.to) for r in g.relations})


def of_file(text: str) -> tuple[dict[str, tuple[str, set[str]]], set[tuple[str, str, str]]]:
    ents, rels = {}, set()
    for _, rec in jsonl.parse(text.splitlines()):
        if isinstance(rec, jsonl.Entity):
            ents[rec.name] = (rec.entity_type, set(rec.observations))
        else:
            rels.add(rec.key)
    return ents, rels


async def test_a_reference_file_imports_exports_and_imports_again_to_the_same_graph(
        cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "memory.json"  # the legacy name is fine too
    source.write_text(REFERENCE, encoding="utf-8")
    assert await cli(cluster, "import", "--scope", "imported", str(source)) == 0
    assert "created 3 entities, added 0 observations to existing ones, created 2 relations" in capsys.readouterr().out
    assert await graph(cluster, "imported") == of_file(REFERENCE)
    assert await cli(cluster, "import", "--scope", "imported", str(source)) == 0  # again: nothing changes
    assert "created 0 entities, added 0 observations to existing ones, created 0 relations" in capsys.readouterr().out
    exported = tmp_path / "out.jsonl"
    assert await cli(cluster, "export", "--scope", "imported", "--output", str(exported)) == 0
    lines = exported.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["type"] for x in lines] == ["entity"] * 3 + ["relation"] * 2  # entities first
    assert of_file(exported.read_text(encoding="utf-8")) == of_file(REFERENCE)
    assert await cli(cluster, "import", "--scope", "copy", str(exported)) == 0
    assert await graph(cluster, "copy") == of_file(REFERENCE)


async def test_a_dry_run_reports_what_would_change_and_writes_nothing(
        cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await cluster.memory.CreateEntities(pb.CreateEntitiesRequest(scope="dry", entities=[
        pb.Entity(name="alice", entity_type="person", observations=["drinks green tea"])]))
    source = tmp_path / "memory.jsonl"
    source.write_text(REFERENCE, encoding="utf-8")
    before = await graph(cluster, "dry")
    assert await cli(cluster, "import", "--scope", "dry", "--dry-run", str(source)) == 0
    out = capsys.readouterr().out
    assert "would create 2 entities, would add 1 observations to existing ones, would create 2 relations" in out
    assert await graph(cluster, "dry") == before


@pytest.mark.parametrize(("line", "says"), [
    ("{not json", "line 3: not JSON"),
    ('{"type":"entity","name":"","entityType":"t","observations":[]}', "line 3: entity.name: must not be empty"),
    ('{"type":"entity","name":"x","entityType":"t","observations":["a\\u0000b"]}', "line 3: entity.observations[0]"),
    ('{"type":"thing","name":"x"}', "line 3: type must be \"entity\" or \"relation\""),
    ('{"type":"relation","from":"a","to":7,"relationType":"r"}', "line 3: to must be a string"),
])
async def test_a_bad_line_is_reported_with_its_number_and_nothing_is_written(
        cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, says: str) -> None:
    good = REFERENCE.splitlines()
    source = tmp_path / "memory.jsonl"
    source.write_text("\n".join([*good[:2], line, *good[3:]]), encoding="utf-8")
    assert await cli(cluster, "import", "--scope", "bad", str(source)) == 2
    assert says in capsys.readouterr().err
    assert await graph(cluster, "bad") == ({}, set())


async def test_the_reference_server_loads_an_exported_file_to_the_same_graph(
        cluster: Cluster, tmp_path: Path, reference_server: Path) -> None:
    source = tmp_path / "memory.jsonl"
    source.write_text(REFERENCE, encoding="utf-8")
    assert await cli(cluster, "import", "--scope", "to-node", str(source)) == 0
    exported = tmp_path / "exported.jsonl"
    assert await cli(cluster, "export", "--scope", "to-node", "--output", str(exported)) == 0
    params = StdioServerParameters(command="node", args=[str(reference_server)],
                                   env={**os.environ, "MEMORY_FILE_PATH": str(exported)})
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        result = await session.call_tool("read_graph", {})
        assert not result.is_error, result.content
        theirs = result.structured_content or json.loads(result.content[0].text)
    ents = {e["name"]: (e["entityType"], set(e["observations"])) for e in theirs["entities"]}
    rels = {(r["from"], r["relationType"], r["to"]) for r in theirs["relations"]}
    assert (ents, rels) == of_file(REFERENCE)
