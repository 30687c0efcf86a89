"""OpenTelemetry for the proxy: a span per RPC with a child span per store call, and the migration's metrics.

Names follow OpenTelemetry's semantic conventions: RPC server spans and `rpc.server.call.duration` carry
`rpc.system.name`/`rpc.method`/`rpc.response.status_code`; store spans and `db.client.operation.duration` carry
`db.system.name`/`db.operation.name`. Memshift's own attribute `memshift.store.role` says which side of a migration a
store call was on (primary, secondary, shadow). Exporters come from `TelemetryConfig`: OTLP, a Prometheus scrape
endpoint, the console; tests hand in providers with in-memory readers instead.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from adapters.specs import scrub

log = logging.getLogger("memshift.telemetry")
SCOPE = "memshift"


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    otlp_endpoint: str | None = None  # e.g. http://otel-collector:4317 (OTLP over gRPC)
    prometheus_listen: str | None = None  # host:port serving /metrics for Prometheus
    console: bool = False  # print spans and metrics to stdout (development)
    service_name: str = "memshift"


@dataclass(frozen=True, slots=True)
class Gauges:
    """What the observable gauges report, read when a metric reader collects."""
    phase: str
    read_fraction: float
    shadow_rate: float
    repair_queue_depth: int
    backfill_done: int
    backfill_total: int
    backfill_rate: float


# gRPC codes that mark a server span as an error (semantic conventions for gRPC); the rest are the caller's.
_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})


@dataclass(slots=True)
class RpcCall:
    status: str = "OK"  # the gRPC status code name sent to the caller


PHASES = ("NotStarted", "DataMigration", "DualWrite", "Completed", "RolledBack")


_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)


class Telemetry:
    def __init__(self, tracer_provider: trace.TracerProvider | None = None,
                 meter_provider: metrics.MeterProvider | None = None) -> None:
        # Nothing configured: no span or sample is kept anywhere, so the per-call helpers skip building them (the
        # API's no-op objects still cost several context managers per call, paid twice by every dual write).
        self._off = tracer_provider is None and meter_provider is None
        self.tracer: Tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer(SCOPE)
        meter: Meter = (meter_provider or metrics.NoOpMeterProvider()).get_meter(SCOPE)
        self._gauges: Callable[[], Gauges] | None = None
        self.rpc_duration = meter.create_histogram(
            "rpc.server.call.duration", unit="s", description="Duration of incoming RPCs.")
        self.store_duration = meter.create_histogram(
            "db.client.operation.duration", unit="s", description="Duration of store calls, by store role.")
        self.store_errors = meter.create_counter(
            "memshift.store.errors", unit="{error}", description="Failed store calls, by store role.")
        self.dual_write_failures = meter.create_counter(
            "memshift.dual_write.failures", unit="{write}",
            description="Dual-writes whose secondary failed, was late or wrote something else (queued for repair).")
        self.shadow_reads = meter.create_counter(
            "memshift.shadow.reads", unit="{read}",
            description="Shadow reads by outcome: match, mismatch, error, timeout, dropped.")
        self.shadow_mismatches = meter.create_counter(
            "memshift.shadow.mismatches", unit="{read}", description="Shadow comparisons that differed.")
        self.read_fallbacks = meter.create_counter(
            "memshift.reads.fallbacks", unit="{read}",
            description="Reads routed to the secondary that failed there and were served by the primary.")
        self.policy_actions = meter.create_counter(
            "memshift.policy.actions", unit="{action}", description="Rollback-policy rules that fired.")
        self.backfill_records = meter.create_counter(
            "memshift.backfill.records", unit="{record}", description="Records copied by the backfill.")
        meter.create_observable_gauge("memshift.repair.queue.depth", [self._observe("repair")], unit="{key}",
                                      description="Keys waiting to be reconciled onto the secondary.")
        meter.create_observable_gauge("memshift.backfill.progress", [self._observe("progress")], unit="{record}",
                                      description="Backfill records done and total (attribute memshift.count).")
        meter.create_observable_gauge("memshift.backfill.rate", [self._observe("rate")], unit="{record}/s",
                                      description="Backfill records per second since it started.")
        meter.create_observable_gauge("memshift.migration.phase", [self._observe("phase")], unit="1",
                                      description="1 for the current migration phase, 0 for the others.")
        meter.create_observable_gauge("memshift.reads.secondary_fraction", [self._observe("fraction")], unit="1",
                                      description="Fraction of reads served by the secondary.")
        meter.create_observable_gauge("memshift.shadow.sample_rate", [self._observe("shadow")], unit="1",
                                      description="Fraction of reads shadowed on the other store.")

    def gauges_from(self, source: Callable[[], Gauges]) -> None:
        self._gauges = source

    def _observe(self, what: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            if self._gauges is None:
                return []
            g = self._gauges()
            if what == "repair":
                return [Observation(g.repair_queue_depth)]
            if what == "progress":
                return [Observation(g.backfill_done, {"memshift.count": "done"}),
                        Observation(g.backfill_total, {"memshift.count": "total"})]
            if what == "rate":
                return [Observation(g.backfill_rate)]
            if what == "phase":
                return [Observation(1 if p == g.phase else 0, {"memshift.phase": p}) for p in PHASES]
            if what == "fraction":
                return [Observation(g.read_fraction)]
            return [Observation(g.shadow_rate)]
        return callback

    def rpc(self, service: str, method: str) -> contextlib.AbstractContextManager[RpcCall]:
        """The server span of one RPC and its duration sample; the caller sets `status` to the gRPC code sent."""
        return contextlib.nullcontext(RpcCall()) if self._off else self._rpc(service, method)

    @contextlib.contextmanager
    def _rpc(self, service: str, method: str) -> Iterator[RpcCall]:
        full = f"{service}/{method}"
        call = RpcCall()
        start = time.perf_counter()
        with self.tracer.start_as_current_span(full, kind=SpanKind.SERVER, record_exception=False,
                                               set_status_on_exception=False,
                                               attributes={"rpc.system.name": "grpc", "rpc.method": full}) as span:
            try:
                yield call
            finally:
                span.set_attribute("rpc.response.status_code", call.status)
                if call.status in _SERVER_ERRORS:
                    span.set_status(Status(StatusCode.ERROR, call.status))
                self.rpc_duration.record(time.perf_counter() - start, {
                    "rpc.system.name": "grpc", "rpc.method": full, "rpc.response.status_code": call.status})

    def store_call(self, role: str, system: str, operation: str, *,
                   parent: Any = None) -> contextlib.AbstractContextManager[Span]:
        """A client span and a duration sample for one call to a store. `role` is primary, secondary or shadow."""
        return _NO_SPAN if self._off else self._store_call(role, system, operation, parent)

    @contextlib.contextmanager
    def _store_call(self, role: str, system: str, operation: str, parent: Any) -> Iterator[Span]:
        attrs = {"db.system.name": system, "db.operation.name": operation, "memshift.store.role": role}
        start = time.perf_counter()
        # Exceptions are recorded by hand, scrubbed: a store's message may quote its spec (adapters.specs).
        with self.tracer.start_as_current_span(f"{operation} {role}", context=parent, kind=SpanKind.CLIENT,
                                               attributes=attrs, record_exception=False,
                                               set_status_on_exception=False) as span:
            try:
                yield span
            except BaseException as exc:
                error = type(exc).__name__
                message = scrub(str(exc))
                span.add_event("exception", {"exception.type": error, "exception.message": message})
                span.set_status(Status(StatusCode.ERROR, f"{error}: {message}"))
                self.store_errors.add(1, {**attrs, "error.type": error})
                self.store_duration.record(time.perf_counter() - start, {**attrs, "error.type": error})
                raise
            self.store_duration.record(time.perf_counter() - start, attrs)

    def policy_event(self, action: str, rule: str, figures: dict[str, Any]) -> None:
        """An automatic action as an OpenTelemetry event (on its own span, so it is exported even between RPCs)."""
        attrs = {"memshift.policy.action": action, "memshift.policy.rule": rule,
                 **{f"memshift.policy.{k}": scrub(v) if isinstance(v, str) else v for k, v in figures.items()
                    if isinstance(v, int | float | str)}}
        with self.tracer.start_as_current_span("memshift.policy", kind=SpanKind.INTERNAL) as span:
            span.add_event("memshift.policy.fired", attrs)
            if action == "rollback":
                span.set_status(Status(StatusCode.ERROR, f"rollback by rule {rule}"))
        self.policy_actions.add(1, {"memshift.policy.action": action, "memshift.policy.rule": rule})


def build(config: TelemetryConfig) -> tuple[Telemetry, Callable[[], None]]:
    """Telemetry with the exporters `config` asks for, and a function that flushes and shuts them down.
    With nothing configured, the no-op API providers: no cost beyond a function call."""
    resource = Resource.create({"service.name": config.service_name})
    tracer_provider: TracerProvider | None = None
    readers: list[MetricReader] = []
    if config.otlp_endpoint or config.console:
        tracer_provider = TracerProvider(resource=resource)
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        assert tracer_provider is not None
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=config.otlp_endpoint)))
    if config.console:
        assert tracer_provider is not None
        tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=30_000))
    if config.prometheus_listen:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        host, _, port = config.prometheus_listen.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0")
        readers.append(PrometheusMetricReader())
        log.info("prometheus metrics", extra={"listen": config.prometheus_listen, "path": "/metrics"})
    meter_provider = MeterProvider(resource=resource, metric_readers=readers) if readers else None

    def shutdown() -> None:
        if tracer_provider is not None:
            tracer_provider.shutdown()
        if meter_provider is not None:
            meter_provider.shutdown()

    return Telemetry(tracer_provider, meter_provider), shutdown
