"""Traces and metrics, read back through the OpenTelemetry SDK's in-memory exporter and reader."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from adapters.embedder import BatchingEmbedder
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import memory_pb2 as pb
from proxy.runtime.telemetry import Telemetry, TelemetryConfig
from tests.cluster import AUTH, boot, shutdown, wait_for
from tests.test_shadow_policy import ReadFaults, read_until, start, to_dual_write


def points(reader: InMemoryMetricReader, name: str) -> Iterator[Any]:
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    yield from metric.data.data_points


async def test_spans_and_metrics_cover_rpcs_store_calls_and_the_migration(embedder: BatchingEmbedder,
                                                                          tmp_path: Path) -> None:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[reader]))
    c = await boot(embedder, tmp_path, telemetry=telemetry)
    try:
        await to_dual_write(c, entities=10)
        spans.clear()
        await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope="seed", entities=[
            pb.Entity(name="traced", entity_type="t", observations=["o"])]))
        await c.memory.OpenNodes(pb.OpenNodesRequest(scope="seed", names=["traced"]))
        await wait_for(c, lambda s: s.shadow.matched >= 1, 10)
        await c.server.shadow.drain()
    finally:
        await shutdown(c)
    finished = spans.get_finished_spans()
    by_name = {s.name: s for s in finished}
    write = by_name["memshift.v1.Memory/CreateEntities"]
    assert write.kind is SpanKind.SERVER and write.attributes is not None
    assert write.attributes["rpc.system.name"] == "grpc"
    assert write.attributes["rpc.response.status_code"] == "OK"
    children = [s for s in finished if s.parent is not None and s.parent.span_id == write.context.span_id]
    roles = sorted(str((s.attributes or {})["memshift.store.role"]) for s in children)
    assert roles == ["primary", "secondary"]
    assert all(s.kind is SpanKind.CLIENT and (s.attributes or {})["db.system.name"] == "sqlite" and
               (s.attributes or {})["db.operation.name"] == "CreateEntities" for s in children)
    read = by_name["memshift.v1.Memory/OpenNodes"]
    read_children = {str((s.attributes or {})["memshift.store.role"]) for s in finished
                     if s.parent is not None and s.parent.span_id == read.context.span_id}
    assert read_children == {"primary", "shadow"}, "the shadow read is traced under the RPC it shadows"
    assert by_name["memshift.v1.MigrationAdmin/GetStatus"].kind is SpanKind.SERVER

    durations = list(points(reader, "db.client.operation.duration"))
    assert {p.attributes["memshift.store.role"] for p in durations} >= {"primary", "secondary", "shadow"}
    shadow = {p.attributes["memshift.outcome"]: p.value for p in points(reader, "memshift.shadow.reads")}
    assert shadow.get("match", 0) >= 1
    phase = {p.attributes["memshift.phase"]: p.value for p in points(reader, "memshift.migration.phase")}
    assert phase["DualWrite"] == 1 and phase["NotStarted"] == 0
    progress = {p.attributes["memshift.count"]: p.value for p in points(reader, "memshift.backfill.progress")}
    assert progress["done"] == progress["total"] >= 10
    assert [p.value for p in points(reader, "memshift.shadow.sample_rate")] == [1.0]
    assert [p.value for p in points(reader, "memshift.repair.queue.depth")] == [0]  # both stores agreed
    assert sum(p.value for p in points(reader, "memshift.backfill.records")) >= 10
    rpcs = {p.attributes["rpc.method"] for p in points(reader, "rpc.server.call.duration")}
    assert "memshift.v1.Memory/OpenNodes" in rpcs


async def test_policy_actions_are_events_and_counted(embedder: BatchingEmbedder, tmp_path: Path) -> None:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    faults = ReadFaults()
    c = await start(embedder, tmp_path, faults)
    c.server.engine.telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[reader]))
    try:
        await to_dual_write(c)
        faults.corrupt = True
        await read_until(c, lambda s: s.phase == apb.ROLLED_BACK)
    finally:
        await shutdown(c)
    [event] = [e for s in spans.get_finished_spans() if s.name == "memshift.policy" for e in s.events]
    assert event.name == "memshift.policy.fired" and event.attributes is not None
    assert event.attributes["memshift.policy.action"] == "rollback"
    assert event.attributes["memshift.policy.rule"] == "mismatch-rate"
    assert float(event.attributes["memshift.policy.value"]) > 0.001  # type: ignore[arg-type]
    fired = {p.attributes["memshift.policy.rule"]: p.value for p in points(reader, "memshift.policy.actions")}
    assert fired == {"mismatch-rate": 1}


async def test_prometheus_endpoint_serves_the_metrics(embedder: BatchingEmbedder, tmp_path: Path,
                                                      unused_tcp_port: int) -> None:
    c = await boot(embedder, tmp_path, telemetry=None,
                   telemetry_config=TelemetryConfig(prometheus_listen=f"127.0.0.1:{unused_tcp_port}"))
    try:
        await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope="s", entities=[pb.Entity(name="a",
                                                                                               entity_type="t")]))
        await c.admin.GetStatus(apb.GetStatusRequest(), metadata=AUTH)
        url = f"http://127.0.0.1:{unused_tcp_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    finally:
        await shutdown(c)
    assert "db_client_operation_duration_seconds_bucket" in body
    assert 'memshift_migration_phase{memshift_phase="NotStarted"' in body
