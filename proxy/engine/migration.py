"""The hot-migration engine as operators and the policy drive it (docs/design.md, Phases; docs/placement.md).

`MigrationEngine` wires the parts, each an object of its own built with the one keeper of the state:
`StateKeeper` (proxy.engine.keeper: the state, its lock, compare-and-set saves, history, the phase table's steps),
`OpenStores` (the stores and which serves a scope), `ScopeGate` (who is writing where), `RepairQueue`, `DualWriter`,
`Backfill` and `FleetAdoption`. It holds the lifecycle and the operator's steps: start a migration of every scope or
of a chosen set, advance, roll back, pause and resume, route reads, the read ramp and the policy's actions. Every
step asks the phase table for the next state (the table writes the phase) and saves it by compare-and-set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from adapters.base import Backend
from adapters.errors import Conflict, IllegalTransition, StoreUnavailable
from adapters.export import scope_counts
from adapters.records import Kind, RecordKey
from adapters.specs import redact, scrub
from policies.rules import Observations
from proxy.engine import phases
from proxy.engine.adoption import FleetAdoption
from proxy.engine.backfill import Backfill, BackfillProgress
from proxy.engine.clock import HybridClock, earlier, unix_seconds
from proxy.engine.control import ControlStore, MigrationOptions, MigrationState, Phase
from proxy.engine.dual_write import DualWriter
from proxy.engine.gate import ScopeGate
from proxy.engine.keeper import StateKeeper
from proxy.engine.outage import Outage, OutageWatch, Unreachable
from proxy.engine.phases import Stage, Step
from proxy.engine.placement import EVERYTHING, Moved, Selection, after_cutover, source_of
from proxy.engine.repair import Counters, RepairQueue
from proxy.engine.stores import OpenStores, StoreOpener
from proxy.engine.strain import WriteStrain
from proxy.routing.validation import within
from proxy.runtime.telemetry import Telemetry

log = logging.getLogger("memshift.migration")

MAX_BATCH = 10_000  # records per backfill batch
MAX_WORKERS = 16  # batches applied at once
MAX_RATE_LIMIT = 1e9  # records per second: far above any store, yet finite
MAX_MIRROR_SECONDS = 366 * 86_400.0  # a rollback window of at most a year

# Re-copied after a rollback besides what changed: the writes of the last 10 minutes before it, in case another
# proxy's clock ran behind (one proxy's own clock needs no margin: a write reads the phase in the same step it is
# stamped, so every write stamped before the rollback was dual-written or queued).
RESYNC_MARGIN_MS = 10 * 60 * 1000

_PROBE_KEY: RecordKey = (Kind.ENTITY, "memshift-probe", ("reachable?",))


class MigrationEngine:
    """The parts, wired; the lifecycle; the steps an operator or the policy takes."""

    def __init__(self, control: ControlStore, open_store: StoreOpener, clock: HybridClock, *,
                 secondary_grace: float = 0.05, repair_interval: float = 0.2, repair_batch: int = 200,
                 background: bool = True, telemetry: Telemetry | None = None,
                 observations: Observations | None = None, fleet: bool = False,
                 resync_margin_ms: int = RESYNC_MARGIN_MS, clock_margin_ms: int = 0,
                 latency_target: float = 2.0) -> None:
        self.telemetry = telemetry or Telemetry()
        self.keeper = StateKeeper(control, fleet)
        self.stores = OpenStores(self.keeper, open_store, fleet)
        self.gate = ScopeGate()
        self.counters = Counters()
        self.outage = OutageWatch(self._probe_secondary, self._outage_changed)
        # Agents' writes timed; the backfill and Verify rest between pages while the agents' p99 is above
        # `latency_target` times what it is with neither running (0: they never rest).
        self.strain = WriteStrain(latency_target)
        self.repairs = RepairQueue(self.keeper, self.stores, self.gate, self.outage, self.counters,
                                   interval=repair_interval, batch=repair_batch, grace=secondary_grace)
        self.backfill = Backfill(self.keeper, self.stores, self.gate, self.outage, self.telemetry, clock,
                                 grace=secondary_grace, scheduled=background, elected=not fleet,
                                 clock_margin_ms=clock_margin_ms, strain=self.strain)
        self.writer = DualWriter(self.keeper, self.stores, self.repairs, self.gate, self.outage, clock,
                                 self.counters, self.telemetry, observations=observations, grace=secondary_grace,
                                 fleet=fleet, before_write=self._expire_window_if_due, strain=self.strain)
        self.adoption = FleetAdoption(self.keeper, self.stores, self.repairs, self.backfill,
                                      after_news=self._expire_window_if_due)
        self.stores.when_reachable(self.repairs.wake)
        self.keeper.reread_with(self.adoption.reread)
        self.clock = clock
        self._background = background  # False: the caller drives the repair queue and the backfill itself
        self._resync_margin_ms = resync_margin_ms
        self._tasks: list[asyncio.Task[None]] = []
        self._window_task: asyncio.Future[None] | None = None

    @property
    def state(self) -> MigrationState:
        return self.keeper.state

    @property
    def secondary_reachable(self) -> Backend | None:
        """The secondary, unless it is out (proxy.engine.outage): then reads and shadow reads stay on the primary."""
        return None if self.outage.current is not None else self.stores.secondary

    def progress(self) -> BackfillProgress:
        return self.backfill.progress()

    # --- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        log.info("reading the migration state", extra={"control": type(self.keeper.control).__name__})
        s = await self.keeper.load()
        # Above every stamp the state holds too (a rollback's resync point, the copy's bounds): a write stamped below
        # a rollback's point by a clock set back since would be taken for one the old target already had, and the
        # next migration back to it would never copy it (found by the stateful test: a restart 60 s behind).
        self.clock.observe(max(s.resync_version, s.copy_since, s.copy_until))
        for spec in s.named_stores():
            role = ("the primary" if spec == s.primary else "the secondary" if spec == s.secondary
                    else "a store scopes are placed on")
            log.info(f"opening {role}", extra={"store": redact(spec), "phase": s.phase.value})
            opened = await self.stores.get(spec, tolerate=True)
            if spec == s.secondary and isinstance(opened, Unreachable):
                self.outage.report(StoreUnavailable(opened.cause))
            elif not isinstance(opened, Unreachable):
                # A proxy restarted with its clock set back (another machine, an NTP step) must still stamp its
                # writes above what is stored, or a delete and a create after it would order the wrong way round.
                with contextlib.suppress(StoreUnavailable):
                    self.clock.observe(await opened.max_version())
        self._expire_window_if_due()
        await self.repairs.refresh_scopes()
        if self._background:
            self._tasks.append(asyncio.create_task(self.repairs.run(), name="repair"))
        self.backfill.start()
        log.info("migration engine started", extra={"phase": self.state.phase.value,
                                                    "migration_id": self.state.migration_id})

    async def stop(self, within: float = 5.0) -> None:
        """Stop the background work and close the stores, in at most about `within` seconds: a store whose server is
        gone must not hold a SIGTERM past the grace period."""
        backfill = self.backfill.stop()
        background = [*self._tasks, *([backfill] if backfill else []), *self.repairs.pending_notices(),
                      *self.stores.reconnecting()]
        for task in background:
            task.cancel()
        await self.outage.stop()
        if background:
            await asyncio.wait(background, timeout=within / 2)
        await self._record_owed_repairs(within / 4)
        await self.stores.close(within / 2)

    async def _record_owed_repairs(self, within: float) -> None:
        """Keys owed to the new store that only memory holds (the control store was out when their writes were
        answered UNAVAILABLE) are recorded before this process goes; if the control store is still out they are
        lost with it, and a Verify with repair finds what they would have fixed."""
        if not self.repairs.owed:
            return
        try:
            await asyncio.wait_for(self.repairs.record_owed(), within)
        except Exception as exc:
            log.error("stopping with repairs the control store never took; run a Verify with repair",
                      extra={"keys": self.repairs.owed, "error": type(exc).__name__})

    # --- the new store's outages --------------------------------------------------------------------------------
    async def _probe_secondary(self) -> None:
        secondary = self.stores.secondary
        if secondary is None:
            return  # nothing to wait for any more
        await asyncio.wait_for(secondary.get_records([_PROBE_KEY]), 5.0)

    async def _outage_changed(self, started: Outage | None, ended: Outage | None) -> None:
        keeper = self.keeper
        if started is not None:
            log.warning("new store unreachable: reads stay on the primary, writes are queued for repair, the backfill "
                        "and the read ramp hold", extra={"store": redact(self.state.secondary),
                                                         "reason": started.reason})
            await keeper.note("memshift", f"new store unreachable ({scrub(started.reason)}): reads on the primary, "
                              "writes queued for repair, backfill and ramp held until it answers", {})
            return
        assert ended is not None
        lasted = time.time() - ended.since
        log.info("new store reachable again; the migration goes on", extra={"outage_seconds": round(lasted, 1)})
        async with keeper.lock:
            s = keeper.state
            if s.ramp_step >= 0:  # the step is judged afresh: nothing was compared while the store was out
                await keeper.save(replace(s, ramp_step_started_at=time.time()))
            await keeper.note_locked("memshift", f"new store reachable again after {lasted:.1f} s: resumed",
                                     {"outage_seconds": round(lasted, 1)})
        self.repairs.wake()

    # --- the rollback window ------------------------------------------------------------------------------------
    def _expire_window_if_due(self) -> None:
        s = self.state
        due = phases.in_window(s) and 0 < s.mirror_until < time.time()
        if due and (self._window_task is None or self._window_task.done()):
            self._window_task = asyncio.ensure_future(self._close_window())

    async def _close_window(self) -> None:
        with contextlib.suppress(IllegalTransition, Conflict):
            await self.advance(Phase.COMPLETED, "memshift", "rollback window expired")

    # --- the operator's steps -----------------------------------------------------------------------------------
    async def start_migration(self, target: str, options: MigrationOptions, actor: str, reason: str = "",
                              chosen: Selection = EVERYTHING) -> None:
        """Move the scopes `chosen` selects (every scope of the default store when it selects none) to `target`."""
        keeper = self.keeper
        async with keeper.lock:
            await self.adoption.fresh()
            keeper.check(Step.START)
            source = source_of(self.state.placement, chosen)
            if target == source:
                raise IllegalTransition(f"the target {redact(target)!r} is the store the selected scopes are on "
                                        "already")
            # Up to workers + 1 batches are held at once, each record with its vector: the bounds keep that in
            # hundreds of megabytes at worst, whatever an operator types.
            within("batch_size", options.batch_size, 1, MAX_BATCH)
            within("workers", options.workers, 1, MAX_WORKERS)
            within("rate_limit", options.rate_limit, 0, MAX_RATE_LIMIT)  # 0: unlimited
            within("mirror_seconds", options.mirror_seconds, 0, MAX_MIRROR_SECONDS)
            await self.stores.get(target)
            total = await _records_to_copy(await self.stores.get(source), Moved(self.state.placement, chosen, source))
            s = self.state
            resync = target == s.resync_target and chosen == s.selection and source == s.source
            copy_since = s.resync_version if resync and not options.full_copy else 0
            new = keeper.next(Step.START, primary=source, secondary=target, selection=chosen, source=source,
                              start_placement=s.placement, copy_since=copy_since, copy_until=0, backfill_copied=0,
                              resync_target="", resync_version=0, migration_id=s.migration_id + 1, options=options,
                              paused=False, backfill_cursor=None, backfill_done=0, backfill_total=total,
                              backfill_complete=False, backfill_seconds=0.0, verify_cursor=None,
                              last_verify_differences=-1, read_fraction=0.0, ramp_step=-1, mirror_until=0.0,
                              blocked_key="", blocked="")
            # Keys a rolled-back migration still owed its target are owed to this one (reconciling is correct for
            # any secondary, and a no-op where the stores agree).
            await keeper.control.carry_over_repairs(new.migration_id)
            # Dual-writing starts with this save, before the first backfill batch.
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_seconds(copy_since)))
            since = f", copying only what changed since {when}" if copy_since else ""
            moving = "" if chosen.everything else f" of {chosen.shown()}"
            await keeper.change(new, actor, reason or f"start migration{moving} to {redact(target)}{since}",
                                {"records_to_copy": total, "batch_size": options.batch_size,
                                 "copy_changed_only": bool(copy_since), "scopes": chosen.shown()})
            self.backfill.start()

    async def _again_on_conflict(self, step: Callable[[], Awaitable[None]]) -> None:
        """An operator's step, taken again (twice at most) when another proxy's save came between this proxy reading
        the state and writing it, provided that save left the same migration in the same stage (a backfill
        checkpoint, a ramp step): the operator's intent still holds. One that moved it on stays a Conflict."""
        for attempt in range(3):
            where = (self.state.migration_id, phases.stage_of(self.state))
            try:
                await step()
                return
            except Conflict:  # the keeper has loaded the state that won
                if attempt == 2 or (self.state.migration_id, phases.stage_of(self.state)) != where:
                    raise

    async def advance(self, expected: Phase, actor: str, reason: str = "") -> None:
        await self._again_on_conflict(lambda: self._advance(expected, actor, reason))

    async def _advance(self, expected: Phase, actor: str, reason: str) -> None:
        keeper = self.keeper
        async with keeper.lock:
            await self.adoption.fresh()
            s = self.state
            if s.phase != expected:
                raise IllegalTransition(f"expected phase {expected.value}, but the migration is in {keeper.shown()}")
            to = keeper.check(Step.ADVANCE)
            if to == Stage.DUAL_WRITE:
                if not s.backfill_complete:
                    p = self.progress()
                    raise IllegalTransition(f"cannot advance to DualWrite: the backfill is at {p.done}/{p.total}")
                if s.options.require_verify and s.last_verify_differences != 0:
                    raise IllegalTransition("cannot advance to DualWrite: this migration requires a Verify with "
                                            f"zero differences (last: {s.last_verify_differences}; -1 = none run)")
                await keeper.apply(Step.ADVANCE, actor, reason or "backfill complete",
                                   {"records_copied": s.backfill_done})
            elif to == Stage.WINDOW:
                left = await self.repairs.drain(within=10.0)
                if left:
                    raise IllegalTransition(f"cannot complete: {left} repairs are still pending on the new store")
                placement = after_cutover(s.start_placement, s.selection, s.source, s.secondary)
                await keeper.apply(Step.ADVANCE, actor, reason or "cutover",
                                   {"new_primary": redact(s.secondary), "mirror_seconds": s.options.mirror_seconds,
                                    "scopes": s.selection.shown()},
                                   primary=s.secondary, secondary=s.primary, placement=placement, read_fraction=0.0,
                                   ramp_step=-1, mirror_until=time.time() + s.options.mirror_seconds)
            else:  # Stage.COMPLETED: the window closes
                await keeper.apply(Step.ADVANCE, actor, reason or "rollback window closed", {}, secondary="",
                                   mirror_until=0.0)

    async def rollback(self, reason: str, actor: str, figures: dict[str, Any] | None = None) -> None:
        await self._again_on_conflict(lambda: self._rollback(reason, actor, figures))

    async def _rollback(self, reason: str, actor: str, figures: dict[str, Any] | None) -> None:
        keeper = self.keeper
        async with keeper.lock:
            await self.adoption.fresh()
            s = self.state
            # The store left behind keeps what it had: a migration back to it later copies only what changed since
            # (a margin of wall time covers writes stamped by other proxies whose clocks run behind).
            since = earlier(self.clock.now(), self._resync_margin_ms)
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            rolled_back = scrub(f"{when} by {actor}: {reason}")
            if not phases.in_window(s):
                new = keeper.next(Step.ROLLBACK, read_fraction=0.0, ramp_step=-1, rolled_back=rolled_back,
                                  resync_target=s.secondary if s.backfill_complete else "", resync_version=since)
            else:
                keeper.check(Step.ROLLBACK)
                # Every write since cutover must be on the old store before it serves again.
                left = await self.repairs.drain(within=10.0)
                if left:
                    raise IllegalTransition(f"cannot roll back yet: {left} writes are still being copied back to "
                                            f"{redact(s.secondary)}; retry when the repair queue is empty")
                new = keeper.next(Step.ROLLBACK, primary=s.secondary, secondary=s.primary,
                                  placement=s.start_placement, read_fraction=0.0, ramp_step=-1, mirror_until=0.0,
                                  resync_target=s.primary, resync_version=since, rolled_back=rolled_back)
            self.backfill.stop()
            self.outage.reset()
            await keeper.change(new, actor, reason, {**(figures or {}), "scopes": s.selection.shown()})

    async def pause_backfill(self, actor: str, reason: str = "") -> None:
        keeper = self.keeper
        async with keeper.lock:
            await self.adoption.fresh()
            keeper.check(Step.PAUSE)
            await keeper.save(replace(self.state, paused=True))
            log.info("backfill paused", extra={"actor": actor, "reason": reason})

    async def resume_backfill(self, actor: str) -> None:
        keeper = self.keeper
        async with keeper.lock:
            await self.adoption.fresh()
            keeper.check(Step.RESUME)
            blocked = self.state.blocked
            await keeper.save(replace(self.state, paused=False, blocked_key="", blocked=""))
            if blocked:
                await keeper.note_locked(actor, f"resumed after: {blocked}", {})
            self.backfill.start()
            log.info("backfill resumed", extra={"actor": actor})

    async def set_read_routing(self, read_fraction: float, shadow_rate: float) -> None:
        within("read_fraction", read_fraction, 0, 1)
        within("shadow_sample_rate", shadow_rate, 0, 1)
        keeper = self.keeper
        async with keeper.lock:
            await self.adoption.fresh()
            if read_fraction > 0:
                keeper.check(Step.ROUTE_READS)
            # Routing by hand overrides a running ramp.
            note = "stopped: read fraction set by hand" if self.state.ramp_step >= 0 else self.state.ramp_note
            await keeper.save(replace(self.state, read_fraction=read_fraction, shadow_rate=shadow_rate,
                                      ramp_step=-1, ramp_note=note))

    async def start_ramp(self, steps: tuple[float, ...], interval: float, shadow_rate: float, actor: str) -> None:
        keeper = self.keeper
        async with keeper.lock:
            await self.adoption.fresh()
            keeper.check(Step.RAMP)
            within("shadow_sample_rate", shadow_rate, 0, 1)
            plan = ", ".join(f"{f:.0%}" for f in steps)
            await keeper.save(replace(self.state, ramp_steps=steps, ramp_interval=interval, ramp_step=0,
                                      ramp_step_started_at=time.time(), read_fraction=steps[0],
                                      shadow_rate=shadow_rate, ramp_note=f"serving {steps[0]:.0%}"))
            await keeper.note_locked(actor, f"read ramp started: {plan}, {interval:g}s per step",
                                     {"steps": plan, "interval_seconds": interval})

    async def ramp_to(self, step: int, reason: str, figures: dict[str, Any]) -> None:
        keeper = self.keeper
        async with keeper.lock:
            s = self.state
            if s.phase != Phase.DUAL_WRITE or s.ramp_step < 0 or step >= len(s.ramp_steps):
                return  # the ramp was stopped or the phase moved on meanwhile
            await keeper.save(replace(s, ramp_step=step, ramp_step_started_at=time.time(),
                                      read_fraction=s.ramp_steps[step], ramp_note=reason))
            await keeper.note_locked("memshift-policy", reason, figures)

    async def ramp_note(self, note: str, stop: bool = False) -> None:
        keeper = self.keeper
        async with keeper.lock:
            if self.state.ramp_note != note or (stop and self.state.ramp_step >= 0):
                await keeper.save(replace(self.state, ramp_note=note, ramp_step=-1 if stop else self.state.ramp_step))

    async def policy_pause(self, reason: str, figures: dict[str, Any]) -> None:
        """The policy's `pause`: the ramp stops where it is and the backfill pauses, until an operator acts."""
        keeper = self.keeper
        async with keeper.lock:
            s = self.state
            await keeper.save(replace(s, paused=s.paused or phases.backfilling(s), ramp_step=-1,
                                      ramp_note=f"stopped by policy: {reason}" if s.ramp_step >= 0 else s.ramp_note))
            await keeper.note_locked("memshift-policy", f"paused: {reason}", figures)

    async def record_verify(self, differences: int) -> None:
        async with self.keeper.lock:
            await self.keeper.save(replace(self.state, last_verify_differences=differences, verify_cursor=None))

    async def save_verify_cursor(self, cursor: RecordKey | None) -> None:
        async with self.keeper.lock:
            await self.keeper.save(replace(self.state, verify_cursor=cursor), durable=False)  # a resume point


async def _records_to_copy(source: Backend, moved: Moved) -> int:
    """The live records the backfill will copy, for its progress: the whole store's count, a count per named scope
    (each is on the source: `source_of` refused the start otherwise), or (prefixes) the store's per-scope counts —
    one query on the SQL stores, a walk of the records on the others."""
    chosen = moved.chosen
    if chosen.everything:
        return (await source.count()).total
    if not chosen.prefixes:
        return sum([(await source.count(name)).total for name in chosen.names])
    return sum(n for scope, n in (await scope_counts(source)).items() if moved(scope))
