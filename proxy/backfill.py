"""The backfill: the decisive store's records copied onto the new store, in checkpointed batches.

It streams every stored record in key order (tombstones included), keeps those of the scopes the migration moves,
and applies them if newer with their vectors (or without, to re-embed), checkpointing the cursor in the control
store after every batch so a restarted proxy, or another proxy of the fleet, resumes where it stopped. It starts only
once the writes that began before dual-writing have finished; batches are sized by time (policies.pacing).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, replace

from adapters.base import Backend, ExportPage, VectorMap
from adapters.model import StoreUnavailable
from adapters.records import Record, RecordKey
from policies import pacing
from proxy.clock import unix_seconds
from proxy.control import Phase
from proxy.eager import consume
from proxy.placement import walk_from
from proxy.refusals import find_refusal, transient
from proxy.repair import RepairQueue

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


@dataclass(frozen=True, slots=True)
class _Page:
    """A page as the backfill writes it: the records to write, and how many were read (`ExportPage` otherwise)."""

    records: tuple[Record, ...]
    next_after: RecordKey | None
    vectors: VectorMap | None
    read: int


class _Blocked(Exception):
    """The backfill met a record the new store refuses; the migration is paused (MigrationEngine.block)."""


class Backfill(RepairQueue):
    """The copy of the moved scopes' records onto the new store, read ahead, applied in parallel, checkpointed."""

    def _start_backfill(self) -> None:
        if self._background and self._may_backfill and (self._backfill_task is None or self._backfill_task.done()):
            self._backfill_task = asyncio.create_task(self.run_backfill(), name="backfill")

    async def run_backfill(self) -> None:
        """The backfill as production runs it (a background task; the property test drives it directly): returns
        when the copy is complete or the phase moved on, and may be cancelled at any point."""
        # Writes that started before dual-writing went to the primary alone; the copy must begin after them.
        await self._solo_idle.wait()
        # Up to `workers` pages are being applied (apply-if-newer makes their order irrelevant) and the next page is
        # already being read, so the stores never wait for this loop: a page's read queues right behind the apply
        # before it, and with two workers or more a page's checkpoint overlaps the next apply. (With one, starting
        # the next apply before the checkpoint was measured slower on the embedded store: the control store's
        # thread then competes with the store's for the interpreter.) Checkpoints go strictly in order, each after
        # its own page is applied, so a restart never skips a page.
        in_flight: deque[tuple[RecordKey | None, _Page, asyncio.Future[int]]] = deque()
        ahead: tuple[RecordKey | None, asyncio.Future[ExportPage]] | None = None
        next_cursor, exhausted = self.state.backfill_cursor, False
        copying_since = time.monotonic()  # each checkpoint adds the time since the one before (or a start, a resume)

        def drop_pipeline() -> None:
            for _, _, task in in_flight:
                task.cancel()
                task.add_done_callback(consume)  # a batch retried from the checkpoint, or no longer wanted
            in_flight.clear()
            if ahead is not None:
                ahead[1].cancel()
                ahead[1].add_done_callback(consume)

        while self.state.phase == Phase.DATA_MIGRATION and not self.state.backfill_complete:
            if not self._resume.is_set() or self.outage.current is not None:
                await self._resume.wait()
                await self.outage.recovered.wait()  # an outage of the new store holds the copy, uncounted
                copying_since = time.monotonic()
                continue
            started = time.monotonic()
            try:
                secondary = self.secondary
                if secondary is None:
                    return
                while len(in_flight) < max(1, self.state.options.workers) and not exhausted:
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
                        self.outage.report(exc)
                    if transient(exc):
                        raise
                    refusal = await find_refusal(secondary, batch.records, batch.vectors)
                    if refusal is not None:
                        await self.block(*refusal, during="backfill")
                        raise _Blocked from exc
                    # Every record went in on its own: the page is on the secondary after all.
                rate = self.state.options.rate_limit
                if rate > 0:  # before the checkpoint, so even a copy of one batch never reports more than the limit
                    await asyncio.sleep(max(0.0, batch.read / rate - (time.monotonic() - started)))
                now = time.monotonic()
                await self._checkpoint(batch, cursor, now - copying_since)
                copying_since = now
            except asyncio.CancelledError:
                drop_pipeline()
                raise
            except Exception as exc:
                drop_pipeline()
                ahead = None
                next_cursor, exhausted = self.state.backfill_cursor, False
                if not isinstance(exc, _Blocked) and self.outage.current is None:  # blocked, out: waits above
                    log.warning("backfill batch failed; retrying from the checkpoint", extra={"error": repr(exc)})
                    await asyncio.sleep(1.0)
                continue
        drop_pipeline()
        if self.state.backfill_complete:
            log.info("backfill complete", extra={"records": self.state.backfill_done})

    async def _apply_page(self, secondary: Backend, page: _Page) -> int:
        """Apply a page, and size the next one by how long this one held the new store (policies.pacing): half the
        dual write's grace, so an agent's write waiting behind a page still lands in time."""
        started = time.monotonic()
        applied = await secondary.apply(page.records, page.vectors)
        if page.records:
            self._page_size = pacing.next_page_size(pacing.PageTiming(
                len(page.records), time.monotonic() - started, self._grace / 2, self.state.options.batch_size))
        return applied

    def _changed(self, page: ExportPage) -> _Page:
        """The part of `page` this migration writes: the records of the scopes it moves, all of them or (going back
        to a target that had the whole copy at a rollback) those changed since then; every record of a moved scope
        counts as read. The next page starts at the next selected scope (`walk_from`): a run of scopes the migration
        does not move is jumped over, not read."""
        since = self.state.copy_since
        moved = [r for r in page.records if self.moves(r.scope)]
        records = tuple(r for r in moved if not since or r.version > since)
        vectors = page.vectors
        if vectors and len(records) < len(page.records):
            vectors = {k: v for k, v in vectors.items() if self.moves(k[0])}
        resume = walk_from(self.state.selection, page.next_after) if page.next_after is not None else None
        return _Page(records, resume, vectors, len(moved))

    async def _read_page(self, cursor: RecordKey | None) -> ExportPage:
        state = self.state
        secondary = self.secondary
        keep = secondary is not None and not state.options.reembed and self.primary.embedding == secondary.embedding
        size, rate = min(self._page_size, state.options.batch_size), state.options.rate_limit
        if rate > 0:  # at most a second's worth of records a batch: under a low limit progress still moves evenly
            size = min(size, max(1, math.ceil(rate)))
        start = walk_from(state.selection, cursor)  # from the first selected scope, when the copy begins
        if cursor is not None and start is None:  # no selected scope after the checkpoint
            return ExportPage((), None, None)
        return await self.primary.export_page(start, size, vectors=keep)

    async def _checkpoint(self, page: _Page, cursor: RecordKey | None, spent: float) -> None:
        """Record that the page starting after `cursor` is on the secondary, `spent` seconds of copying after the
        checkpoint before (nothing, if a rollback or another proxy moved on meanwhile)."""
        state = self.state
        secondary = self.secondary
        if secondary is None or state.backfill_complete or state.backfill_cursor != cursor:
            return
        if page.next_after is None:
            await secondary.embed_stale()  # anything whose text never matched a copied vector
        async with self._lock:
            cur = self.state
            if cur.migration_id != state.migration_id or cur.backfill_cursor != cursor:
                return  # a rollback or another proxy moved on meanwhile; the batch was harmless (apply-if-newer)
            await self._save(replace(
                cur, backfill_cursor=page.next_after, backfill_done=cur.backfill_done + page.read,
                backfill_copied=cur.backfill_copied + len(page.records),
                backfill_total=max(cur.backfill_total, cur.backfill_done + page.read),
                backfill_complete=page.next_after is None, backfill_seconds=cur.backfill_seconds + spent),
                durable=page.next_after is None)  # a lost checkpoint only copies batches again; the end is kept
        self.telemetry.backfill_records.add(len(page.records))

    def progress(self) -> BackfillProgress:
        s = self.state
        rate = s.backfill_done / s.backfill_seconds if s.backfill_seconds > 0 else 0.0
        left = max(0, s.backfill_total - s.backfill_done)
        eta = 0.0 if s.backfill_complete else (left / rate if rate > 0 else -1.0)
        return BackfillProgress(s.backfill_done, max(s.backfill_total, s.backfill_done), rate, eta,
                                s.backfill_complete, s.paused, s.backfill_copied,
                                unix_seconds(s.copy_since) if s.copy_since else 0.0)
