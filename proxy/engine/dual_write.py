"""The write path: every write stamped with a version, then sent to its scope's store, or to both stores.

With no migration moving the write's scope it goes to the scope's store alone. From the moment DataMigration starts
(before the first backfill batch) a moved scope's write goes to both stores in parallel; the decisive store's outcome
is the caller's answer. The two outcomes are compared: when the new store failed, was slower than `grace`, or wrote
different records (a write the decisive store refused, data the backfill has not brought yet), the keys the write
may touch go to the durable repair queue (proxy.engine.repair) before the caller is answered. When the control store
cannot take them, the write that reached the decisive store is answered UNAVAILABLE (`RepairNotRecorded`), never
"done", and the keys wait in memory until the control store answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from adapters.base import Backend, VectorMap, WriteResult
from adapters.errors import EntityNotFound, LeaseLapsed, RepairNotRecorded, StoreUnavailable
from adapters.records import EntityRecord, Record, RecordKey, parents_of
from policies.rules import Observations
from proxy.engine import phases
from proxy.engine.clock import HybridClock
from proxy.engine.gate import ScopeGate
from proxy.engine.keeper import StateKeeper
from proxy.engine.outage import OutageWatch
from proxy.engine.repair import Counters, RepairQueue, purge_point
from proxy.engine.stores import OpenStores
from proxy.engine.strain import WriteStrain
from proxy.routing.ops import ApplyRecords, WriteOp
from proxy.runtime.eager import consume, start_eagerly
from proxy.runtime.telemetry import Telemetry

log = logging.getLogger("memshift.migration")
T = TypeVar("T")


def _key_of(r: Record) -> RecordKey:
    return r.key


class DualWriter:
    """Every write: versioned, then to its scope's store alone or, for a moved scope, to both stores."""

    def __init__(self, keeper: StateKeeper, stores: OpenStores, repairs: RepairQueue, gate: ScopeGate,
                 outage: OutageWatch, clock: HybridClock, counters: Counters, telemetry: Telemetry, *,
                 observations: Observations | None = None, grace: float = 0.05, fleet: bool = False,
                 before_write: Callable[[], None] = lambda: None, strain: WriteStrain | None = None) -> None:
        self._keeper = keeper
        self._stores = stores
        self._repairs = repairs
        self._gate = gate
        self._outage = outage
        self._clock = clock
        self.counters = counters
        self.telemetry = telemetry
        self._observations = observations  # secondary outcomes for the rollback policy, when one watches
        self._grace = grace
        self._before_write = before_write
        # A fleet: writes stop when this proxy's lease on the control store lapses (until then: a monotonic
        # deadline; 0 = not yet in sync). One proxy: never.
        self._write_deadline: float | None = 0.0 if fleet else None
        self.late_in_flight = 0  # new-store halves still running after their caller was answered
        # Every write timed (only recorded here: the bulk work that reads it decides, with its own target).
        self.strain = strain or WriteStrain(0.0)

    def lease_renewed(self, deadline: float) -> None:
        """In sync with the fleet until `deadline` (time.monotonic)."""
        self._write_deadline = deadline

    async def write(self, op: WriteOp[T]) -> WriteResult[T]:
        started = time.monotonic()
        try:
            return await self._write(op)
        finally:  # what the agent waited for, in any phase (proxy.engine.strain)
            self.strain.record(time.monotonic() - started)

    async def _write(self, op: WriteOp[T]) -> WriteResult[T]:
        if self._write_deadline is not None and time.monotonic() > self._write_deadline:
            raise LeaseLapsed("this proxy has lost touch with the fleet's control store (its lease lapsed), so it "
                              "may not know the current phase; writes are refused until it has caught up")
        self._before_write()
        await self._keeper.certain()  # after a state change whose outcome is unknown: the stored phase decides
        version = self._clock.now()
        state = self._keeper.state
        secondary = self._stores.secondary if phases.moves(state, op.scope) else None
        if secondary is None:
            with self._gate.solo():
                return await self._run(op, self._stores.store_for(op.scope), "primary", version)
        return await self._dual_write(op, version, self._stores.primary, secondary)

    async def _run(self, op: WriteOp[T], store: Backend, role: str, version: int) -> WriteResult[T]:
        with self.telemetry.store_call(role, self._stores.system(store), type(op).__name__):
            return await op.run(store, version)

    async def restore(self, records: Sequence[Record], vectors: VectorMap | None) -> int:
        """Records from a backup, each applied if newer with its own version, through `write`: during a migration
        they reach both stores (or the repair queue) like any write. The clock first moves past their versions, so a
        write made after the restore orders after what it restored. Returns how many replaced stored state."""
        if not records:
            return 0
        self._clock.observe(max(max(r.version, getattr(r, "purged", 0)) for r in records))
        state = self._keeper.state
        routes: dict[tuple[str, bool], list[Record]] = {}  # one write per store a scope is placed on
        for r in records:
            routes.setdefault((state.placement.store_of(r.scope), phases.moves(state, r.scope)), []).append(r)
        return sum([(await self.write(ApplyRecords(part, vectors))).answer for part in routes.values()])

    async def newer_than_stored(self, records: Sequence[Record]) -> int:
        """How many of these records a restore would apply: those the primary lacks or holds at an older version,
        leaving out children older than a deletion of their entity (a purge hides them; see adapters.records)."""
        parents = {p for r in records for p in parents_of(r.key)}
        wanted: dict[str, set[RecordKey]] = {}
        for key in {r.key for r in records} | parents:
            wanted.setdefault(self._keeper.state.placement.store_of(key[1]), set()).add(key)
        held = {r.key: r for spec, keys in wanted.items()
                for r in await self._stores.opened(spec).get_records(list(keys))}
        purged = {k: purge_point(held.get(k)) for k in parents}
        for r in records:
            if isinstance(r, EntityRecord) and r.key in purged:
                purged[r.key] = max(purged[r.key], r.purged)

        def newer(r: Record) -> bool:
            stored = held.get(r.key)
            return (stored is None or stored.version < r.version) and all(
                r.version > purged[p] for p in parents_of(r.key))

        return sum(1 for r in records if newer(r))

    async def embed_stale(self) -> int:
        """After a restore whose vectors were left out or made by another model: embed what still lacks one."""
        placed = self._stores.placed()
        done = 0
        for store in placed:
            done += await store.embed_stale()
            await store.build_indexes()
        secondary = self._stores.secondary
        if secondary is not None and secondary not in placed and self._outage.current is None:
            with contextlib.suppress(StoreUnavailable):  # the backfill or a repair embeds there later
                await secondary.embed_stale()
                await secondary.build_indexes()
        return done

    async def _dual_write(self, op: WriteOp[T], version: int, primary: Backend,
                          secondary: Backend) -> WriteResult[T]:
        if self._outage.current is not None:
            # The new store is out: no time is spent on it; its half is owed through the repair queue, which the
            # caller's acknowledgement waits for, as for any failed secondary write.
            result = await self._run(op, primary, "primary", version)
            self.counters.secondary_skipped += 1
            await self._repairs.enqueue(op.keys() + [r.key for r in result.effects])
            return result
        keys = op.keys()  # a WriteOp's keys, not a mapping's
        async with self._gate.writing({k[1] for k in keys}):
            return await self._both(op, version, primary, secondary)

    async def _both(self, op: WriteOp[T], version: int, primary: Backend, secondary: Backend) -> WriteResult[T]:
        migration_id = self._keeper.state.migration_id  # keys owed to the migration this write was made in

        async def queue(keys: list[RecordKey]) -> None:
            await self._repairs.enqueue_for(migration_id, keys)

        def follow_late(task: asyncio.Future[WriteResult[T]]) -> None:
            """A half still running after the caller was answered may land after its repair ran: when it ends, its
            keys are queued again, so a repair follows it."""
            self.late_in_flight += 1

            def landed(_: object) -> None:
                self.late_in_flight -= 1
                again = asyncio.ensure_future(queue(op.keys()))
                again.add_done_callback(consume)

            task.add_done_callback(landed)

        # The secondary's half starts first and runs until it has to wait (on the embedded store it never does);
        # the primary's runs meanwhile, so neither store waits for the other.
        s_task = start_eagerly(self._run(op, secondary, "secondary", version))
        try:
            p_result = await self._run(op, primary, "primary", version)
        except BaseException as p_exc:
            # The primary refused: the caller gets that error, and whatever the secondary kept is undone.
            s_done = bool((await asyncio.wait({s_task}, timeout=self._grace))[0])
            # Agreement: nothing written on the secondary either, or both refused definitively (NOT_FOUND). An
            # "unavailable" can hide a committed write on a network store, so it never counts as agreement.
            s_exc = s_task.exception() if s_done else None
            agreed = s_done and (isinstance(s_exc, EntityNotFound) and isinstance(p_exc, EntityNotFound)
                                 if s_exc is not None else not s_task.result().effects)
            if not agreed:
                # Kept in memory if the control store is out too; the caller's answer is the primary's refusal.
                with contextlib.suppress(RepairNotRecorded):
                    await queue(op.keys())
            if not s_done:
                s_task.add_done_callback(consume)
                follow_late(s_task)
            raise p_exc
        done = s_task.done() or bool((await asyncio.wait({s_task}, timeout=self._grace))[0])
        self.counters.dual_writes += 1
        if not done:
            s_task.add_done_callback(consume)
            follow_late(s_task)
            self.counters.secondary_late += 1
            self.telemetry.dual_write_failures.add(1, {"memshift.reason": "late"})
            await queue(op.keys())
        elif s_task.exception() is not None:
            exc = s_task.exception()
            if isinstance(exc, EntityNotFound):  # the backfill has not brought that entity yet: expected
                self.counters.effect_mismatches += 1
                self._secondary_outcome(error=False)
            elif isinstance(exc, StoreUnavailable):  # an outage, not a wrong answer: held, not counted against it
                self.counters.secondary_failures += 1
                self._outage.report(exc)
            else:
                self.counters.secondary_failures += 1
                self._secondary_outcome(error=True)
                self.telemetry.dual_write_failures.add(1, {"memshift.reason": "error"})
                log.warning("secondary write failed; queued for repair",
                            extra={"error": repr(exc), "keys": len(op.keys())})
            await queue(op.keys())
        else:
            self._secondary_outcome(error=False)
            # Plain record equality (in key order): cheaper than digests on the hot path, and the same test.
            mine = sorted(p_result.effects, key=_key_of)
            theirs = sorted(s_task.result().effects, key=_key_of)
            if mine != theirs:
                self.counters.effect_mismatches += 1
                self.telemetry.dual_write_failures.add(1, {"memshift.reason": "mismatch"})
                await queue(op.keys() + [r.key for r in p_result.effects])
        return p_result

    def _secondary_outcome(self, error: bool) -> None:
        if self._observations is not None:
            self._observations.secondary_call(time.time(), error)
