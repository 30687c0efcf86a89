"""The hot-migration engine as operators and the policy drive it (docs/design.md, Phases; docs/placement.md).

`MigrationEngine` is the whole engine: the parts it is built from each hold one concern and can be read alone —
`proxy.engine_core` (state, stores, placement routing, history), `proxy.repair` (the repair queue),
`proxy.dual_write` (the write path), `proxy.backfill` (the copy), `proxy.adoption` (a fleet's shared state). This
module holds the lifecycle and the operator's steps: start a migration of every scope or of a chosen set, advance,
roll back, pause and resume, route reads, the read ramp and the policy's actions. Every step consults the one table
of legal steps (proxy.phases) and saves the state by compare-and-set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from adapters.base import Backend
from adapters.export import scope_counts
from adapters.model import StoreUnavailable
from adapters.records import RecordKey
from proxy.adoption import FleetMember
from proxy.clock import earlier, unix_seconds
from proxy.control import Conflict, HistoryEntry, MigrationOptions, Phase
from proxy.errors import IllegalTransition
from proxy.outage import Unreachable
from proxy.phases import Stage, Step, stage
from proxy.placement import EVERYTHING, Moved, Selection, after_cutover, source_of
from proxy.redaction import redact, scrub
from proxy.validation import within

log = logging.getLogger("memshift.migration")


MAX_BATCH = 10_000  # records per backfill batch


MAX_WORKERS = 16  # batches applied at once


MAX_RATE_LIMIT = 1e9  # records per second: far above any store, yet finite


MAX_MIRROR_SECONDS = 366 * 86_400.0  # a rollback window of at most a year


class MigrationEngine(FleetMember):
    """The whole engine: its parts, plus the lifecycle and the steps an operator or the policy takes."""

    async def start(self) -> None:
        log.info("reading the migration state", extra={"control": type(self._control).__name__})
        self.state = await self._control.load()
        s = self.state
        for spec in s.named_stores():
            role = ("the primary" if spec == s.primary else "the secondary" if spec == s.secondary
                    else "a store scopes are placed on")
            log.info(f"opening {role}", extra={"store": redact(spec), "phase": s.phase.value})
            opened = await self._store(spec, tolerate=True)
            if spec == s.secondary and isinstance(opened, Unreachable):
                self.outage.report(StoreUnavailable(opened.cause))
        self._expire_mirror_if_due()
        await self._refresh_dirty()
        if not self.state.paused:
            self._resume.set()
        if self._background:
            self._tasks.append(asyncio.create_task(self._repair_loop(), name="repair"))
        if self.state.phase == Phase.DATA_MIGRATION and not self.state.backfill_complete:
            self._start_backfill()
        log.info("migration engine started", extra={"phase": self.state.phase.value,
                                                    "migration_id": self.state.migration_id})

    async def stop(self, within: float = 5.0) -> None:
        """Stop the background work and close the stores, in at most about `within` seconds: a store whose server is
        gone must not hold a SIGTERM past the grace period."""
        background = [*self._tasks, *([self._backfill_task] if self._backfill_task else []), *self._notices,
                      *self._reconnects.values()]
        for task in background:
            task.cancel()
        await self.outage.stop()
        if background:
            await asyncio.wait(background, timeout=within / 2)
        for store in self._stores.values():
            try:
                await asyncio.wait_for(store.close(), within / 2)
            except Exception as exc:
                log.warning("store did not close cleanly", extra={"store": store.name, "error": repr(exc)})
        self._stores.clear()

    async def start_migration(self, target: str, options: MigrationOptions, actor: str, reason: str = "",
                              chosen: Selection = EVERYTHING) -> None:
        """Move the scopes `chosen` selects (every scope of the default store when it selects none) to `target`."""
        async with self._lock:
            await self._fresh()
            self._check(Step.START)
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
            await self._store(target)
            total = await _records_to_copy(await self._store(source), Moved(self.state.placement, chosen, source))
            s = self.state
            resync = target == s.resync_target and chosen == s.selection and source == s.source
            copy_since = s.resync_version if resync and not options.full_copy else 0
            new = replace(self.state, phase=Phase.DATA_MIGRATION, primary=source, secondary=target,
                          selection=chosen, source=source, start_placement=s.placement, copy_since=copy_since,
                          backfill_copied=0, resync_target="", resync_version=0,
                          migration_id=self.state.migration_id + 1, options=options, paused=False,
                          backfill_cursor=None, backfill_done=0, backfill_total=total, backfill_complete=False,
                          backfill_seconds=0.0, verify_cursor=None, last_verify_differences=-1, read_fraction=0.0,
                          ramp_step=-1, mirror_until=0.0, blocked_key="", blocked="")
            # Keys a rolled-back migration still owed its target are owed to this one (reconciling is correct for
            # any secondary, and a no-op where the stores agree).
            await self._control.carry_over_repairs(new.migration_id)
            # Dual-writing starts with this save, before the first backfill batch.
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_seconds(copy_since)))
            since = f", copying only what changed since {when}" if copy_since else ""
            moving = "" if chosen.everything else f" of {chosen.shown()}"
            await self._change(new, actor, reason or f"start migration{moving} to {redact(target)}{since}",
                               {"records_to_copy": total, "batch_size": options.batch_size,
                                "copy_changed_only": bool(copy_since), "scopes": chosen.shown()})
            self._resume.set()
            self._start_backfill()

    async def _again_on_conflict(self, step: Callable[[], Awaitable[None]]) -> None:
        """An operator's step, taken again (twice at most) when another proxy's save came between this proxy reading
        the state and writing it, provided that save left the same migration in the same stage (a backfill
        checkpoint, a ramp step): the operator's intent still holds. One that moved it on stays a Conflict."""
        for attempt in range(3):
            where = (self.state.migration_id, stage(self.state.phase, self.state.secondary))
            try:
                await step()
                return
            except Conflict:  # `_save` has loaded the state that won
                if attempt == 2 or (self.state.migration_id, stage(self.state.phase, self.state.secondary)) != where:
                    raise

    async def advance(self, expected: Phase, actor: str, reason: str = "") -> None:
        await self._again_on_conflict(lambda: self._advance(expected, actor, reason))

    async def _advance(self, expected: Phase, actor: str, reason: str) -> None:
        async with self._lock:
            await self._fresh()
            s = self.state
            if s.phase != expected:
                raise IllegalTransition(f"expected phase {expected.value}, but the migration is in "
                                        f"{self._phase_shown()}")
            to = self._check(Step.ADVANCE)
            if to == Stage.DUAL_WRITE:
                if not s.backfill_complete:
                    p = self.progress()
                    raise IllegalTransition(f"cannot advance to DualWrite: the backfill is at {p.done}/{p.total}")
                if s.options.require_verify and s.last_verify_differences != 0:
                    raise IllegalTransition("cannot advance to DualWrite: this migration requires a Verify with "
                                            f"zero differences (last: {s.last_verify_differences}; -1 = none run)")
                await self._change(replace(s, phase=Phase.DUAL_WRITE), actor, reason or "backfill complete",
                                   {"records_copied": s.backfill_done})
            elif to == Stage.WINDOW:
                left = await self.drain_repairs(within=10.0)
                if left:
                    raise IllegalTransition(f"cannot complete: {left} repairs are still pending on the new store")
                placement = after_cutover(s.start_placement, s.selection, s.source, s.secondary)
                await self._change(replace(s, phase=Phase.COMPLETED, primary=s.secondary, secondary=s.primary,
                                           placement=placement, read_fraction=0.0, ramp_step=-1,
                                           mirror_until=time.time() + s.options.mirror_seconds),
                                   actor, reason or "cutover", {"new_primary": redact(s.secondary),
                                                                "mirror_seconds": s.options.mirror_seconds,
                                                                "scopes": s.selection.shown()})
            else:  # Stage.COMPLETED: the window closes
                await self._change(replace(s, secondary="", mirror_until=0.0), actor,
                                   reason or "rollback window closed", {})

    async def rollback(self, reason: str, actor: str, figures: dict[str, Any] | None = None) -> None:
        await self._again_on_conflict(lambda: self._rollback(reason, actor, figures))

    async def _rollback(self, reason: str, actor: str, figures: dict[str, Any] | None) -> None:
        async with self._lock:
            await self._fresh()
            s = self.state
            # The store left behind keeps what it had: a migration back to it later copies only what changed since
            # (a margin of wall time covers writes stamped by other proxies whose clocks run behind).
            since = earlier(self._clock.now(), self._resync_margin_ms)
            self._check(Step.ROLLBACK)
            if stage(s.phase, s.secondary) != Stage.WINDOW:
                new = replace(s, phase=Phase.ROLLED_BACK, read_fraction=0.0, ramp_step=-1,
                              resync_target=s.secondary if s.backfill_complete else "", resync_version=since)
            else:
                # Every write since cutover must be on the old store before it serves again.
                left = await self.drain_repairs(within=10.0)
                if left:
                    raise IllegalTransition(f"cannot roll back yet: {left} writes are still being copied back to "
                                            f"{redact(s.secondary)}; retry when the repair queue is empty")
                new = replace(s, phase=Phase.ROLLED_BACK, primary=s.secondary, secondary=s.primary,
                              placement=s.start_placement, read_fraction=0.0, ramp_step=-1, mirror_until=0.0,
                              resync_target=s.primary,
                              resync_version=since)
            if self._backfill_task is not None:
                self._backfill_task.cancel()
            self.outage.reset()
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            new = replace(new, rolled_back=scrub(f"{when} by {actor}: {reason}"))
            await self._change(new, actor, reason, {**(figures or {}), "scopes": s.selection.shown()})

    async def pause_backfill(self, actor: str, reason: str = "") -> None:
        async with self._lock:
            await self._fresh()
            self._check(Step.PAUSE)
            self._resume.clear()
            await self._save(replace(self.state, paused=True))
            log.info("backfill paused", extra={"actor": actor, "reason": reason})

    async def resume_backfill(self, actor: str) -> None:
        async with self._lock:
            await self._fresh()
            self._check(Step.RESUME)
            blocked = self.state.blocked
            await self._save(replace(self.state, paused=False, blocked_key="", blocked=""))
            if blocked:
                await self._note(actor, f"resumed after: {blocked}", {})
            self._resume.set()
            self._start_backfill()
            log.info("backfill resumed", extra={"actor": actor})

    async def set_read_routing(self, read_fraction: float, shadow_rate: float) -> None:
        within("read_fraction", read_fraction, 0, 1)
        within("shadow_sample_rate", shadow_rate, 0, 1)
        async with self._lock:
            await self._fresh()
            if read_fraction > 0:
                self._check(Step.ROUTE_READS)
            # Routing by hand overrides a running ramp.
            note = "stopped: read fraction set by hand" if self.state.ramp_step >= 0 else self.state.ramp_note
            await self._save(replace(self.state, read_fraction=read_fraction, shadow_rate=shadow_rate,
                                     ramp_step=-1, ramp_note=note))

    async def start_ramp(self, steps: tuple[float, ...], interval: float, shadow_rate: float, actor: str) -> None:
        async with self._lock:
            await self._fresh()
            self._check(Step.RAMP)
            within("shadow_sample_rate", shadow_rate, 0, 1)
            plan = ", ".join(f"{f:.0%}" for f in steps)
            await self._save(replace(self.state, ramp_steps=steps, ramp_interval=interval, ramp_step=0,
                                     ramp_step_started_at=time.time(), read_fraction=steps[0],
                                     shadow_rate=shadow_rate, ramp_note=f"serving {steps[0]:.0%}"))
            await self._note(actor, f"read ramp started: {plan}, {interval:g}s per step",
                             {"steps": plan, "interval_seconds": interval})

    async def ramp_to(self, step: int, reason: str, figures: dict[str, Any]) -> None:
        async with self._lock:
            s = self.state
            if s.phase != Phase.DUAL_WRITE or s.ramp_step < 0 or step >= len(s.ramp_steps):
                return  # the ramp was stopped or the phase moved on meanwhile
            await self._save(replace(s, ramp_step=step, ramp_step_started_at=time.time(),
                                     read_fraction=s.ramp_steps[step], ramp_note=reason))
            await self._note("memshift-policy", reason, figures)

    async def ramp_note(self, note: str, stop: bool = False) -> None:
        async with self._lock:
            if self.state.ramp_note != note or (stop and self.state.ramp_step >= 0):
                await self._save(replace(self.state, ramp_note=note,
                                         ramp_step=-1 if stop else self.state.ramp_step))

    async def policy_pause(self, reason: str, figures: dict[str, Any]) -> None:
        """The policy's `pause`: the ramp stops where it is and the backfill pauses, until an operator acts."""
        async with self._lock:
            s = self.state
            backfilling = s.phase == Phase.DATA_MIGRATION and not s.backfill_complete
            if backfilling:
                self._resume.clear()
            await self._save(replace(s, paused=s.paused or backfilling, ramp_step=-1,
                                     ramp_note=f"stopped by policy: {reason}" if s.ramp_step >= 0 else s.ramp_note))
            await self._note("memshift-policy", f"paused: {reason}", figures)

    async def record_verify(self, differences: int) -> None:
        async with self._lock:
            await self._save(replace(self.state, last_verify_differences=differences, verify_cursor=None))

    async def save_verify_cursor(self, cursor: RecordKey | None) -> None:
        async with self._lock:
            await self._save(replace(self.state, verify_cursor=cursor), durable=False)  # a resume point, see save

    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        return await self._control.history(limit)


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
