"""The `memshift.v1.MigrationAdmin` servicer and its bearer-token guard."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import grpc

from adapters.errors import InvalidInput, PolicyError
from adapters.export import export_pages
from adapters.records import Record, key_text
from adapters.specs import scrub
from memshift.v1 import admin_pb2 as pb
from memshift.v1 import admin_pb2_grpc as pb_grpc
from policies.loader import ramp_schedule
from policies.rules import RuleResult
from proxy.engine import phases
from proxy.engine.backends import redact
from proxy.engine.control import HistoryEntry, MigrationOptions, Phase
from proxy.engine.fleet import FleetSync
from proxy.engine.migration import MigrationEngine
from proxy.engine.placement import Placement, selection
from proxy.engine.store_counts import count_placement
from proxy.engine.verify import VerifyReport, verify
from proxy.formats import backup
from proxy.routing import validation as check
from proxy.routing.guard import PolicyGuard
from proxy.routing.read_routing import ReadRouting
from proxy.routing.shadow import ShadowReader
from proxy.routing.validation import within
from proxy.runtime.config import Limits
from proxy.transports.servicer import abort_for, rpc
from proxy.transports.shedding import Budget

log = logging.getLogger("memshift.admin")


PHASE_TO_PB = {
    Phase.NOT_STARTED: pb.NOT_STARTED, Phase.DATA_MIGRATION: pb.DATA_MIGRATION, Phase.DUAL_WRITE: pb.DUAL_WRITE,
    Phase.COMPLETED: pb.COMPLETED, Phase.ROLLED_BACK: pb.ROLLED_BACK,
}
PHASE_FROM_PB = {v: k for k, v in PHASE_TO_PB.items()}


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every admin call needs `authorization: Bearer <token>`; anything else is UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "admin calls need metadata 'authorization: Bearer <token>' with the admin token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return await continuation(details)
        log.warning("admin call refused: bad or missing token", extra={"method": details.method})
        streaming = details.method.endswith(("/WatchStatus", "/Verify", "/ExportRecords"))
        return self._deny_stream if streaming else self._deny_unary


def _placement_pb(p: Placement) -> pb.Placement:
    placed = [pb.PlacedScopes(scope=prefix, prefix=True, store=redact(spec))
              for prefix, spec in sorted(p.prefixes.items())]
    placed += [pb.PlacedScopes(scope=scope, store=redact(spec)) for scope, spec in sorted(p.scopes.items())]
    return pb.Placement(default_store=redact(p.default), placed=placed)


async def _counts_pb(engine: MigrationEngine) -> dict[str, Any]:
    stores, selected = await count_placement(engine)
    return {"stores": [pb.StoreCount(**asdict(c)) for c in stores],
            "selected": [pb.ScopeCount(**asdict(c)) for c in selected]}


def _rule_pb(r: RuleResult) -> pb.RuleStatus:
    return pb.RuleStatus(name=r.rule.name, metric=r.rule.metric.value, verdict=r.verdict.value, value=r.value,
                         threshold=r.rule.threshold, samples=r.samples, min_samples=r.rule.min_samples,
                         streak=r.streak, consecutive=r.rule.consecutive, action=r.rule.action.value,
                         window_seconds=r.rule.window_seconds)


def _actor(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    return str(dict(context.invocation_metadata() or ()).get("x-memshift-actor", "admin"))


def _change_pb(h: HistoryEntry) -> pb.PhaseChange:
    return pb.PhaseChange(at_unix=h.at, from_phase=PHASE_TO_PB[h.from_phase], to_phase=PHASE_TO_PB[h.to_phase],
                          actor=h.actor, reason=h.reason, figures={k: str(v) for k, v in h.figures.items()})


def _record_text(rec: Record | None) -> str:
    if rec is None:
        return ""
    data = rec._asdict()
    if "metadata" in data:
        data["metadata"] = dict(data["metadata"])
    return json.dumps(data, default=str, ensure_ascii=False)


def _progress_pb(r: VerifyReport) -> pb.VerifyProgress:
    return pb.VerifyProgress(
        compared=r.compared, differences=r.differences, primary_records=r.primary_records,
        secondary_records=r.secondary_records, done=r.done, in_flight=r.in_flight, repaired=r.repaired,
        scopes=[pb.ScopeCounts(scope=s, primary_records=c[0], secondary_records=c[1], differences=c[2])
                for s, c in sorted(r.per_scope.items())],
        samples=[pb.DifferenceSample(key=key_text(d.key), primary=_record_text(d.primary),
                                     secondary=_record_text(d.secondary)) for d in r.samples])


@dataclass(frozen=True, slots=True)
class Watchers:
    """What watches a migration besides the engine: shadow reads, read routing and the rollback policy."""
    shadow: ShadowReader
    reads: ReadRouting
    guard: PolicyGuard
    fleet: FleetSync | None = None  # the proxies sharing the control store, when there is a fleet
    budget: Budget | None = None  # the Memory service's load shedding


class AdminServicer(pb_grpc.MigrationAdminServicer):
    SERVICE = "memshift.v1.MigrationAdmin"

    def __init__(self, engine: MigrationEngine, watchers: Watchers, limits: Limits | None = None) -> None:
        self._engine = engine
        self._watchers = watchers
        self._limits = limits or Limits()
        self.telemetry = engine.telemetry

    async def status(self, count_stores: bool = False) -> pb.MigrationStatus:
        e = self._engine
        s, p, c = e.state, e.progress(), e.counters
        window = max(0.0, s.mirror_until - time.time()) if phases.in_window(s) else 0.0
        fleet = self._watchers.fleet
        members = await fleet.members() if fleet is not None else []
        out = e.outage.current
        return pb.MigrationStatus(
            phase=PHASE_TO_PB[s.phase], primary=redact(s.primary), secondary=redact(s.secondary),
            migration_id=s.migration_id,
            backfill=pb.BackfillProgress(done=p.done, total=p.total, rate_per_second=p.rate, eta_seconds=p.eta_seconds,
                                         complete=p.complete, paused=p.paused, copied=p.copied,
                                         copying_changes_since_unix=p.changes_since, step=p.step,
                                         rest_seconds=p.rest),
            read_fraction=s.read_fraction, shadow_sample_rate=s.shadow_rate,
            repair_queue_depth=await e.repairs.depth(),
            counters=pb.DualWriteCounters(
                dual_writes=c.dual_writes, secondary_failures=c.secondary_failures, secondary_late=c.secondary_late,
                effect_mismatches=c.effect_mismatches, repairs_done=c.repairs_done,
                repair_failures=c.repair_failures, secondary_skipped=c.secondary_skipped, since_unix=c.since),
            recent_history=[_change_pb(h) for h in await e.keeper.history(10)],
            rollback_window_seconds_left=window, last_verify_differences=s.last_verify_differences,
            policy=[_rule_pb(r) for r in self._watchers.guard.last],
            ramp=pb.RampStatus(running=s.ramp_step >= 0, steps=s.ramp_steps, step=s.ramp_step,
                               interval_seconds=s.ramp_interval, step_started_unix=s.ramp_step_started_at,
                               note=s.ramp_note),
            shadow=pb.ShadowCounters(**asdict(self._watchers.shadow.counters)),
            reads=pb.ReadCounters(**asdict(self._watchers.reads.counters)),
            proxies=[pb.ProxyMember(node=m.node, address=m.address, phase=PHASE_TO_PB[m.phase],
                                    migration_id=m.migration_id, revision=m.revision, leader=m.leader,
                                    heartbeat_age_seconds=m.heartbeat_age, live=m.live)
                     for m in members],
            backfill_waiting_for=fleet.waiting_for if fleet else [], blocked_key=s.blocked_key, blocked=s.blocked,
            secondary_unreachable=scrub(out.reason) if out else "",
            secondary_unreachable_since_unix=out.since if out else 0.0,
            primary_unreachable=not e.stores.default_up.is_set(),
            rolled_back=s.rolled_back if s.phase == Phase.ROLLED_BACK else "",
            memory_calls_shed=self._watchers.budget.shed if self._watchers.budget else 0,
            placement=_placement_pb(s.placement),
            selection=pb.Selection(scopes=s.selection.names, scope_prefixes=s.selection.prefixes,
                                   shown=s.selection.shown()),
            **(await _counts_pb(e) if count_stores else {}))

    @rpc
    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.MigrationStatus:
        return await self.status(count_stores=request.count_stores)

    async def WatchStatus(self, request: pb.WatchStatusRequest, context: Any) -> AsyncIterator[pb.MigrationStatus]:
        interval = max(0.1, request.interval_seconds or 1.0)
        while True:
            yield await self.status()
            await asyncio.sleep(interval)

    @rpc
    async def StartMigration(self, request: pb.StartMigrationRequest, context: Any) -> pb.MigrationStatus:
        if not request.target:
            raise InvalidInput("target", "a store spec is required, e.g. sqlite:///./data/new.db")
        options = MigrationOptions(
            batch_size=request.batch_size or 500, rate_limit=request.rate_limit, workers=request.workers or 1,
            reembed=request.reembed, mirror_seconds=request.mirror_seconds or 3600.0,
            require_verify=request.require_verify, full_copy=request.full_copy)
        chosen = selection(request.scopes, request.scope_prefixes)
        await self._engine.start_migration(request.target, options, _actor(context), request.reason, chosen)
        return await self.status()

    @rpc
    async def Advance(self, request: pb.AdvanceRequest, context: Any) -> pb.MigrationStatus:
        if request.expected_phase not in PHASE_FROM_PB:
            raise InvalidInput("expected_phase", "required (the phase you are advancing from)")
        await self._engine.advance(PHASE_FROM_PB[request.expected_phase], _actor(context), request.reason)
        return await self.status()

    @rpc
    async def SetReadRouting(self, request: pb.SetReadRoutingRequest, context: Any) -> pb.MigrationStatus:
        if request.ramp or request.ramp_steps:
            within("ramp_interval_seconds", request.ramp_interval_seconds, 0, 86_400)  # 0: the policy's interval
            default = self._watchers.guard.policy.ramp
            try:
                schedule = ramp_schedule(list(request.ramp_steps) or list(default.steps),
                                         request.ramp_interval_seconds or default.interval_seconds)
            except PolicyError as exc:
                raise InvalidInput("ramp_steps", str(exc).partition(": ")[2]) from None
            await self._engine.start_ramp(schedule.steps, schedule.interval_seconds, request.shadow_sample_rate,
                                          _actor(context))
        else:
            await self._engine.set_read_routing(request.read_fraction, request.shadow_sample_rate)
        return await self.status()

    @rpc
    async def ListMismatches(self, request: pb.ListMismatchesRequest, context: Any) -> pb.ListMismatchesResponse:
        if request.limit < 0:
            raise InvalidInput("limit", "must not be negative (0 means 20)")
        shadow = self._watchers.shadow
        picked = [m for m in reversed(shadow.samples)
                  if (not request.operation or m.operation == request.operation)
                  and (not request.scope or m.scope == request.scope)][:request.limit or 20]
        return pb.ListMismatchesResponse(
            samples=[pb.MismatchSample(at_unix=m.at, operation=m.operation, scope=m.scope, request=m.request,
                                       primary=m.primary, secondary=m.secondary, detail=m.detail) for m in picked],
            total_mismatches=shadow.counters.mismatched)

    @rpc
    async def PauseBackfill(self, request: pb.PauseBackfillRequest, context: Any) -> pb.MigrationStatus:
        await self._engine.pause_backfill(_actor(context), request.reason)
        return await self.status()

    @rpc
    async def ResumeBackfill(self, request: pb.ResumeBackfillRequest, context: Any) -> pb.MigrationStatus:
        await self._engine.resume_backfill(_actor(context))
        return await self.status()

    @rpc
    async def Rollback(self, request: pb.RollbackRequest, context: Any) -> pb.MigrationStatus:
        if not request.reason:
            raise InvalidInput("reason", "say why you roll back; it is kept in the phase history")
        await self._engine.rollback(request.reason, _actor(context))
        return await self.status()

    async def Verify(self, request: pb.VerifyRequest, context: Any) -> AsyncIterator[pb.VerifyProgress]:
        engine = self._engine
        secondary = engine.stores.secondary
        if secondary is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"nothing to verify: the migration is in {engine.state.phase.value} with no "
                                "second store (verify runs in DataMigration, DualWrite and Completed's window)")
        assert secondary is not None
        start = engine.state.verify_cursor if request.resume else None
        with engine.strain.bulk():
            async for report in verify(engine.stores.primary, secondary, start_after=start,
                                       max_samples=request.max_samples or 20, settle=engine.repairs.settle,
                                       repair=engine.repairs.enqueue if request.repair else None,
                                       only=phases.moved(engine.state), rest=engine.strain.next_pause):
                if report.done:
                    if start is None:  # a partial (resumed) run does not speak for the whole store
                        await engine.record_verify(report.differences)
                else:
                    await engine.save_verify_cursor(report.cursor)
                yield _progress_pb(report)

    @rpc
    async def GetHistory(self, request: pb.GetHistoryRequest, context: Any) -> pb.GetHistoryResponse:
        changes = await self._engine.keeper.history(request.limit or 100)
        return pb.GetHistoryResponse(changes=[_change_pb(h) for h in changes])

    async def ExportRecords(self, request: pb.ExportRecordsRequest, context: Any) -> AsyncIterator[pb.RecordChunk]:
        """A backup, page by page as a backfill reads it (so its cost per chunk is bounded): each scope from the store
        the placement routes it to (a copy another store still holds is left out). One scope is filtered from the
        walk over every scope: stores list records in (kind, scope, key) order."""
        scope = request.scope or None
        size = request.page_size or 1000
        try:
            if scope is not None:
                check.scope(scope)
            within("page_size", size, 1, self._limits.max_page_size)
            placement = self._engine.state.placement
            specs = [placement.store_of(scope)] if scope is not None else placement.stores()
            stores = [(spec, self._engine.stores.opened(spec)) for spec in specs]
            # An estimate where a store still holds copies of scopes placed elsewhere (those are not exported).
            total = sum([(await store.count(scope)).total for _, store in stores])
            info = stores[0][1].embedding
            header = backup.header_line(backup.Header(info.model, info.dimension, scope))
            done, first = 0, True

            def wanted(s: str, spec: str) -> bool:
                return (scope is None or s == scope) and placement.store_of(s) == spec

            for spec, store in stores:
                async for page in export_pages(store, size, vectors=not request.no_vectors):
                    records = [r for r in page.records if wanted(r.scope, spec)]
                    vectors = {k: v for k, v in (page.vectors or {}).items() if wanted(k[0], spec)}
                    lines = backup.page_lines(records, vectors)
                    done += len(records)
                    if lines or first or page.next_after is None:
                        yield pb.RecordChunk(lines=([header] if first else []) + lines, done=done, total=total)
                        first = False
        except Exception as exc:
            await abort_for(context, exc, "ExportRecords")
            raise

    @rpc
    async def ImportRecords(self, request: pb.ImportRecordsRequest, context: Any) -> pb.ImportRecordsResponse:
        header = backup.parse_header(request.header)
        check.count("lines", request.lines, self._limits.max_page_size)
        first = max(1, request.first_line)
        items = [item for _, item in backup.parse_body(enumerate(request.lines, first), header, self._limits)]
        records = [i for i in items if not isinstance(i, backup.VectorLine)]
        carried = [i for i in items if isinstance(i, backup.VectorLine)]
        info = self._engine.stores.primary.embedding
        # Vectors of the store's own model: the chunk is applied with those it carries and embeds nothing itself
        # (an entity's vector may come in a later chunk, after its last observation); the finish embeds the rest.
        same_model = (header.model, header.dimension) == (info.model, info.dimension)
        if request.dry_run:
            newer = await self._engine.writer.newer_than_stored(records)
        else:
            newer = await self._engine.writer.restore(records, backup.vector_map(carried) if same_model else None)
        embedded = await self._engine.writer.embed_stale() if request.finish and not request.dry_run else 0
        return pb.ImportRecordsResponse(records=len(records), newer=newer, vectors=len(carried),
                                        vectors_used=same_model and bool(carried),
                                        embedded=embedded)

