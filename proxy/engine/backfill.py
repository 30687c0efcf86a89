"""The backfill: the decisive store's records copied onto the new store, in checkpointed batches.

It streams the stored records in key order (tombstones included), keeps those of the scopes the migration moves,
and applies them if newer with their vectors (or without, to re-embed), checkpointing the cursor in the control
store after every batch so a restarted proxy, or another proxy of the fleet, resumes where it stopped. It starts only
once the writes that began before dual-writing have finished, and then fixes its watermark (`copy_until`): records
stamped after it were dual-written (or are owed through the repair queue), so the stores do not even return them
and the copy never chases agents that keep writing (docs/design.md, "Why the copy skips what is newer"). Batches are
sized by time (policies.pacing). It holds while the state says `paused` (an operator, the policy, a refused record)
and while the new store is out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, replace

from adapters.base import Backend, ExportPage, VectorMap
from adapters.errors import StoreUnavailable
from adapters.records import Record, RecordKey
from policies import pacing
from proxy.engine import blocking, phases
from proxy.engine.clock import HybridClock, later, unix_seconds
from proxy.engine.control import MigrationState
from proxy.engine.gate import ScopeGate
from proxy.engine.keeper import StateKeeper
from proxy.engine.outage import OutageWatch
from proxy.engine.placement import walk_from
from proxy.engine.refusals import find_refusal, transient
from proxy.engine.stores import OpenStores
from proxy.engine.strain import WriteStrain
from proxy.runtime.eager import consume
from proxy.runtime.telemetry import Telemetry

log = logging.getLogger("memshift.migration")


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    done: int
    total: int
    rate: float  # records per second of copying (MigrationState.backfill_seconds)
    eta_seconds: float  # -1 when unknown
    complete: bool
    paused: bool
    copied: int = 0  # records written (done counts records read)
    changes_since: float = 0.0  # unix seconds: only records changed since then are written (0: all)
    step: str = ""  # MigrationState.backfill_step
    rest: float = 0.0  # seconds the copy rests between pages so agents keep their latency (this proxy's copy)


@dataclass(frozen=True, slots=True)
class _Page:
    """A page as the backfill writes it: the records to write, and how many were read (`ExportPage` otherwise)."""

    records: tuple[Record, ...]
    next_after: RecordKey | None
    vectors: VectorMap | None
    read: int


class _Blocked(Exception):
    """The backfill met a record the new store refuses; the migration is paused (proxy.engine.blocking)."""


def progress_of(s: MigrationState) -> BackfillProgress:
    rate = s.backfill_done / s.backfill_seconds if s.backfill_seconds > 0 else 0.0
    left = max(0, s.backfill_total - s.backfill_done)
    eta = 0.0 if s.backfill_complete else (left / rate if rate > 0 else -1.0)
    return BackfillProgress(s.backfill_done, max(s.backfill_total, s.backfill_done), rate, eta,
                            s.backfill_complete, s.paused, s.backfill_copied,
                            unix_seconds(s.copy_since) if s.copy_since else 0.0, s.backfill_step)


class Backfill:
    """The copy of the moved scopes' records onto the new store, read ahead, applied in parallel, checkpointed."""

    def __init__(self, keeper: StateKeeper, stores: OpenStores, gate: ScopeGate, outage: OutageWatch,
                 telemetry: Telemetry, clock: HybridClock, *, grace: float = 0.05, scheduled: bool = True,
                 elected: bool = True, clock_margin_ms: int = 0, strain: WriteStrain | None = None) -> None:
        self._keeper = keeper
        self._clock = clock
        # How far another proxy's clock may run ahead of this one's: added to the watermark. A single proxy stamps
        # every write itself and needs none; a fleet's acknowledgements carry their clocks (observed before the copy
        # starts), so the margin covers only a write still travelling from a proxy that has left the fleet.
        self._clock_margin_ms = clock_margin_ms
        self._stores = stores
        self._gate = gate
        self._outage = outage
        self._telemetry = telemetry
        self._grace = grace  # the dual write's: a page may hold the new store for half of it
        self._scheduled = scheduled  # False: whoever built it calls `run` (the stateful property test)
        self._elected = elected  # a fleet: only where the fleet elected it (another resumes from the checkpoint)
        self._page_size = pacing.FLOOR  # the next page, in records (policies.pacing sizes it by time)
        self._strain = strain or WriteStrain(0.0)  # the agents' writes: the copy rests between pages when they slow
        self._task: asyncio.Task[None] | None = None
        self._resume = asyncio.Event()  # follows the state: set while not paused
        self.holds = 0  # times the copy stopped for a pause or an outage
        keeper.watch(self._follow)

    def _follow(self, state: MigrationState) -> None:
        if state.paused:
            self._resume.clear()
        else:
            self._resume.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Run the copy in the background, if it is wanted here and not running already."""
        if (self._scheduled and self._elected and phases.backfilling(self._keeper.state)
                and (self._task is None or self._task.done())):
            self._task = asyncio.create_task(self.run(), name="backfill")

    def stop(self) -> asyncio.Task[None] | None:
        """Cancel the copy (it resumes from its checkpoint when started again); the task, to wait for."""
        if self._task is not None:
            self._task.cancel()
        return self._task

    def elect(self, lead: bool) -> None:
        """Elected (or not) to run the backfill; another proxy continues from the checkpoint when this one stops."""
        self._elected = lead
        if lead:
            self.start()
        elif self.running:
            self.stop()

    def progress(self) -> BackfillProgress:
        return replace(progress_of(self._keeper.state), rest=self._strain.pause if self.running else 0.0)

    async def run(self) -> None:
        """The backfill as production runs it (a background task; the property test drives it directly): returns
        when the copy is complete or the phase moved on, and may be cancelled at any point."""
        with self._strain.bulk():
            await self._run()

    async def _run(self) -> None:
        # Writes that started before dual-writing went to the primary alone; the copy must begin after them.
        await self._gate.solo_done()
        # Up to `workers` pages are being applied (apply-if-newer makes their order irrelevant) and the next page is
        # already being read, so the stores never wait for this loop: a page's read queues right behind the apply
        # before it, and with two workers or more a page's checkpoint overlaps the next apply. (With one, starting
        # the next apply before the checkpoint was measured slower on the embedded store: the control store's
        # thread then competes with the store's for the interpreter.) Checkpoints go strictly in order, each after
        # its own page is applied, so a restart never skips a page.
        keeper = self._keeper
        in_flight: deque[tuple[RecordKey | None, _Page, asyncio.Future[int]]] = deque()
        ahead: tuple[RecordKey | None, asyncio.Future[ExportPage]] | None = None
        next_cursor, exhausted = keeper.state.backfill_cursor, False
        copying_since = time.monotonic()  # each checkpoint adds the time since the one before (or a start, a resume)
        rested = 0.0  # the rest taken after the last checkpoint (not the page's own work)

        def drop_pipeline() -> None:
            for _, _, task in in_flight:
                task.cancel()
                task.add_done_callback(consume)  # a batch retried from the checkpoint, or no longer wanted
            in_flight.clear()
            if ahead is not None:
                ahead[1].cancel()
                ahead[1].add_done_callback(consume)

        while phases.backfilling(keeper.state):
            if not self._resume.is_set() or self._outage.current is not None:
                self.holds += 1
                await self._resume.wait()
                await self._outage.recovered.wait()  # an outage of the new store holds the copy, uncounted
                copying_since = time.monotonic()
                continue
            started = time.monotonic()
            try:
                await keeper.certain()  # after a state change whose outcome is unknown (raises: retried below)
                secondary = self._stores.secondary
                if secondary is None:
                    return
                if not keeper.state.copy_until:
                    await self._fix_watermark()
                    continue
                while len(in_flight) < max(1, keeper.state.options.workers) and not exhausted:
                    if ahead is not None and ahead[0] == next_cursor:
                        page = await ahead[1]
                    else:
                        page = await self._read_page(next_cursor)
                    ahead = None
                    writing = self._changed(page)
                    in_flight.append((next_cursor, writing,
                                      asyncio.ensure_future(self._apply_page(secondary, writing))))
                    next_cursor, exhausted = writing.next_after, writing.next_after is None
                if ahead is None and not exhausted:
                    ahead = (next_cursor, asyncio.ensure_future(self._read_page(next_cursor)))
                cursor, batch, applying = in_flight.popleft()
                try:
                    await applying
                except Exception as exc:
                    if isinstance(exc, StoreUnavailable):
                        self._outage.report(exc)
                    if transient(exc):
                        raise
                    refusal = await find_refusal(secondary, batch.records, batch.vectors)
                    if refusal is not None:
                        await blocking.block(keeper, *refusal, during="backfill")
                        raise _Blocked from exc
                    # Every record went in on its own: the page is on the secondary after all.
                rate = keeper.state.options.rate_limit
                if rate > 0:  # before the checkpoint, so even a copy of one batch never reports more than the limit
                    await asyncio.sleep(max(0.0, batch.read / rate - (time.monotonic() - started)))
                now = time.monotonic()
                await self._checkpoint(batch, cursor, now - copying_since)
                # Counted as copying: it is what the copy costs with agents about.
                rested = self._strain.next_pause(max(0.0, now - copying_since - rested))
                copying_since = now
                if rested > 0:
                    await asyncio.sleep(rested)
            except asyncio.CancelledError:
                drop_pipeline()
                raise
            except Exception as exc:
                drop_pipeline()
                ahead = None
                next_cursor, exhausted = keeper.state.backfill_cursor, False
                if not isinstance(exc, _Blocked) and self._outage.current is None:  # blocked, out: waits above
                    log.warning("backfill batch failed; retrying from the checkpoint", extra={"error": repr(exc)})
                    await asyncio.sleep(1.0)
                continue
        drop_pipeline()
        if keeper.state.backfill_complete:
            log.info("backfill complete", extra={"records": keeper.state.backfill_done})

    async def _apply_page(self, secondary: Backend, page: _Page) -> int:
        """Apply a page, and size the next one by how long this one held the new store (policies.pacing): half the
        dual write's grace, so an agent's write waiting behind a page still lands in time."""
        started = time.monotonic()
        applied = await secondary.load(page.records, page.vectors)
        if page.records:
            self._page_size = pacing.next_page_size(pacing.PageTiming(
                len(page.records), time.monotonic() - started, self._grace / 2,
                self._keeper.state.options.batch_size))
        return applied

    def _changed(self, page: ExportPage) -> _Page:
        """The part of `page` this migration writes: the records of the scopes it moves, all of them or (going back
        to a target that had the whole copy at a rollback) those changed since then; every record of a moved scope
        counts as read. The next page starts at the next selected scope (`walk_from`): a run of scopes the migration
        does not move is jumped over, not read."""
        state = self._keeper.state
        since = state.copy_since
        moved = [r for r in page.records if phases.moves(state, r.scope)]
        records = tuple(r for r in moved if not since or r.version > since)
        vectors = page.vectors
        if vectors and len(records) < len(page.records):
            vectors = {k: v for k, v in vectors.items() if phases.moves(state, k[0])}
        resume = walk_from(state.selection, page.next_after) if page.next_after is not None else None
        return _Page(records, resume, vectors, len(moved))

    async def _read_page(self, cursor: RecordKey | None) -> ExportPage:
        state = self._keeper.state
        primary, secondary = self._stores.primary, self._stores.secondary
        keep = secondary is not None and not state.options.reembed and primary.embedding == secondary.embedding
        size, rate = min(self._page_size, state.options.batch_size), state.options.rate_limit
        if rate > 0:  # at most a second's worth of records a batch: under a low limit progress still moves evenly
            size = min(size, max(1, math.ceil(rate)))
        start = walk_from(state.selection, cursor)  # from the first selected scope, when the copy begins
        if cursor is not None and start is None:  # no selected scope after the checkpoint
            return ExportPage((), None, None)
        return await primary.export_page(start, size, vectors=keep, until=state.copy_until)

    async def _fix_watermark(self) -> None:
        """Fix `copy_until` once for the migration, when its copy first starts: every write to the old store alone
        has finished by now (this proxy's: `solo_done`; a fleet's: the leader starts only once every proxy has
        acknowledged, and it has observed their clocks), so each of them is stamped below this clock's next
        version. Fixed once and saved: a restart or another leader keeps it."""
        keeper = self._keeper
        # Read at once: every later tick only lets more of the agents' dual writes in below the watermark. (A clock
        # set back since an earlier run of this proxy cannot read below what is stored: the engine's start made it
        # observe every store's highest version.)
        until = self._clock.now()
        if self._clock_margin_ms:
            until = later(until, self._clock_margin_ms)
        async with keeper.lock:
            cur = keeper.state
            if cur.copy_until or not phases.backfilling(cur):
                return
            await keeper.save(replace(cur, copy_until=until))
            await keeper.note_locked("memshift", "copy watermark fixed: records stamped later are dual-written, "
                                     "not copied", {"copy_until": unix_seconds(until)})

    async def _step(self, step: str, cursor: RecordKey | None) -> bool:
        """Show that the copy's end has reached `step` (status, and any proxy of the fleet); False when a rollback
        or another proxy moved on meanwhile."""
        keeper = self._keeper
        async with keeper.lock:
            cur = keeper.state
            if cur.backfill_complete or cur.backfill_cursor != cursor or not phases.backfilling(cur):
                return False
            if cur.backfill_step != step:
                await keeper.save(replace(cur, backfill_step=step), durable=False)
            return True

    async def _checkpoint(self, page: _Page, cursor: RecordKey | None, spent: float) -> None:
        """Record that the page starting after `cursor` is on the secondary, `spent` seconds of copying after the
        checkpoint before (nothing, if a rollback or another proxy moved on meanwhile)."""
        keeper = self._keeper
        state = keeper.state
        secondary = self._stores.secondary
        if secondary is None or state.backfill_complete or state.backfill_cursor != cursor:
            return
        settling = indexing = 0.0
        if page.next_after is None:
            # What the loads left to the end (texts, search documents, anything whose text never matched a copied
            # vector), then the indexes a store builds once after a bulk copy (PostgreSQL's), timed apart.
            started = time.monotonic()
            if not await self._step("settling", cursor):
                return
            await secondary.embed_stale()
            settled = time.monotonic()
            if not await self._step("indexing", cursor):
                return
            await secondary.build_indexes()
            settling, indexing = settled - started, time.monotonic() - settled
        async with keeper.lock:
            cur = keeper.state
            if cur.migration_id != state.migration_id or cur.backfill_cursor != cursor:
                return  # a rollback or another proxy moved on meanwhile; the batch was harmless (apply-if-newer)
            await keeper.save(replace(
                cur, backfill_cursor=page.next_after, backfill_done=cur.backfill_done + page.read,
                backfill_copied=cur.backfill_copied + len(page.records),
                # At the end, the total is what was there to copy: records changed after the watermark were
                # counted at the start but dual write carried them.
                backfill_total=(cur.backfill_done + page.read if page.next_after is None
                                else max(cur.backfill_total, cur.backfill_done + page.read)),
                backfill_complete=page.next_after is None, backfill_seconds=cur.backfill_seconds + spent,
                backfill_step=""),
                durable=page.next_after is None)  # a lost checkpoint only copies batches again; the end is kept
            if page.next_after is None:
                done = keeper.state
                await keeper.note_locked("memshift", "backfill complete", {
                    "records_read": done.backfill_done, "records_copied": done.backfill_copied,
                    "copy_seconds": round(done.backfill_seconds, 3), "settle_seconds": round(settling, 3),
                    "index_seconds": round(indexing, 3)})
        self._telemetry.backfill_records.add(len(page.records))
