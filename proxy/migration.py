"""The hot-migration engine: phases, dual-write, repair queue, backfill (docs/design.md, Phases).

Writes. Every write is stamped with a version before any store is touched. With no migration running it goes to the
primary alone. From the moment DataMigration starts (before the first backfill batch) it goes to primary and
secondary in parallel; the primary's outcome is the caller's answer. The two outcomes are compared: when the
secondary failed, was slower than `secondary_grace`, or wrote different records than the primary (a write the
primary refused, data the backfill has not brought yet), the keys the write may touch go to the durable repair queue
before the caller is answered.

Repair. The repair loop reconciles queued keys from the primary: it reads both stores' records and makes the
secondary hold exactly the primary's, by compare-and-set on the secondary's version, so a write racing the repair is
never overwritten (the key is simply retried).

Backfill. Streams the primary's live records in key order, in batches, apply-if-newer onto the secondary with their
vectors (or without, to re-embed), checkpointing the cursor in the control store after every batch so a restarted
proxy resumes where it stopped. It starts only once the writes that began before dual-writing have finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

from adapters.base import Backend, ExportPage, VectorMap, WriteResult, fleet_problem
from adapters.model import EntityNotFound, StoreUnavailable
from adapters.records import EntityRecord, Kind, Record, RecordKey, key_text, parents_of, same_content
from policies import pacing
from policies.rules import Observations
from proxy import heap
from proxy.clock import HybridClock, earlier, unix_seconds
from proxy.control import (
    Conflict,
    ControlStore,
    HistoryEntry,
    MigrationOptions,
    MigrationState,
    Phase,
    RepairItem,
)
from proxy.eager import start_eagerly
from proxy.errors import FleetUnsafe, IllegalTransition, LeaseLapsed
from proxy.ops import ApplyRecords, WriteOp
from proxy.outage import Outage, OutageWatch, Unreachable
from proxy.phases import Stage, Step, check, stage, writes_secondary
from proxy.placement import EVERYTHING, Selection, after_cutover, moves, source_of
from proxy.redaction import redact, scrub
from proxy.refusals import find_refusal, refused_twice, transient
from proxy.stores import system_of
from proxy.telemetry import Telemetry
from proxy.validation import within

log = logging.getLogger("memshift.migration")
T = TypeVar("T")
MAX_BATCH = 10_000  # records per backfill batch
MAX_WORKERS = 16  # batches applied at once
# Re-copied after a rollback besides what changed: the writes of the last 10 minutes before it, in case another
# proxy's clock ran behind (one proxy's own clock needs no margin: a write reads the phase in the same step it is
# stamped, so every write stamped before the rollback was dual-written or queued).
RESYNC_MARGIN_MS = 10 * 60 * 1000
MAX_RATE_LIMIT = 1e9  # records per second: far above any store, yet finite
MAX_MIRROR_SECONDS = 366 * 86_400.0  # a rollback window of at most a year
StoreOpener = Callable[[str], Awaitable[Backend]]

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


@dataclass(slots=True)
class Counters:
    """Counted in place, on every dual write: a copy per write cost as much as a small store write."""

    dual_writes: int = 0
    secondary_failures: int = 0
    secondary_late: int = 0
    effect_mismatches: int = 0
    repairs_done: int = 0
    repair_failures: int = 0  # keys whose repair failed at least once, not every retry
    secondary_skipped: int = 0  # dual writes that skipped an unreachable new store (queued for repair)
    since: float = field(default_factory=time.time)  # this proxy's: counters start at zero on every start


def _key_of(r: Record) -> RecordKey:
    return r.key


def _purge_point(r: Record | None) -> int:
    return r.purged if isinstance(r, EntityRecord) else 0


def _same(a: Record | None, b: Record | None) -> bool:
    """Two stores agree on a key when both have nothing live there, or the same record — and, for an entity, the
    same purge point, which decides which children may exist (even for an entity that was never created: a
    relation may name it)."""
    if _purge_point(a) != _purge_point(b):
        return False
    a_live = a if a is not None and not a.deleted else None
    b_live = b if b is not None and not b.deleted else None
    if a_live is None or b_live is None:
        return a_live is None and b_live is None
    return same_content(a_live, b_live)


class MigrationEngine:
    _REPAIR_WAIT = 5.0  # seconds a repair waits for the writes in flight in its scopes
    _OPEN_TIMEOUT = 10.0  # seconds opening a store may take before it counts as unreachable
    _START_TIMEOUT = 3.0  # the same at start, where the admin API and a healthy primary wait on it
    _PARKED = 300.0  # seconds before a key the new store refused is tried again (at once when queued again)

    def __init__(self, control: ControlStore, open_store: StoreOpener, clock: HybridClock, *,
                 secondary_grace: float = 0.05, repair_interval: float = 0.2, repair_batch: int = 200,
                 background: bool = True, telemetry: Telemetry | None = None,
                 observations: Observations | None = None, fleet: bool = False,
                 resync_margin_ms: int = RESYNC_MARGIN_MS) -> None:
        self._control = control
        self._resync_margin_ms = resync_margin_ms
        self._open = open_store
        self._clock = clock
        self._grace = secondary_grace
        self._page_size = pacing.FLOOR  # the backfill's next page, in records (policies.pacing sizes it by time)
        self._repair_interval = repair_interval
        self._repair_batch = repair_batch
        self._background = background  # False: tests drive backfill and repair step by step
        self._lock = asyncio.Lock()  # serialises state changes within this proxy; CAS guards across proxies
        self._stores: dict[str, Backend] = {}
        self._systems: dict[int, str] = {}  # id(store) -> db.system.name
        self.telemetry = telemetry or Telemetry()
        self.observations = observations  # secondary outcomes for the rollback policy, when one watches
        # Scopes with a pending repair: their reads stay on the primary (read-your-writes, docs/design.md, Phases).
        self._dirty: set[str] = set()
        self._dirty_since: list[set[str]] = []  # one per refresh in progress: scopes queued meanwhile
        self.last_repair_depth = 0  # for the metrics gauge, which cannot await
        self._solo_inflight = 0
        # A repair reads the primary, then the secondary, then copies. A dual write whose secondary half lands before
        # that read and whose primary half lands after the first would have the primary's older record copied over
        # the newer one, and nothing would queue the key again. So dual writes share their scopes and a repair holds
        # its scopes alone: it waits for the writes in flight there, and new ones wait for it (a few milliseconds).
        self._scope_gate = asyncio.Condition()
        self._writing: Counter[str] = Counter()
        self._repairing: Counter[str] = Counter()  # both hold only scopes in use: empty means none
        self._solo_idle = asyncio.Event()
        self._solo_idle.set()
        self._repair_wakeup = asyncio.Event()
        self._resume = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._backfill_task: asyncio.Task[None] | None = None
        self._window_task: asyncio.Future[None] | None = None
        self._notices: set[asyncio.Task[None]] = set()  # pauses and un-pauses decided by a repair, see _notice
        # Stores that could not be opened are stood in for (proxy.outage.Unreachable) and opened again here.
        self._reconnects: dict[str, asyncio.Task[None]] = {}
        self.primary_up = asyncio.Event()  # the primary is open: the proxy can serve (health SERVING)
        self.outage = OutageWatch(self._probe_secondary, self._outage_changed)
        self.counters = Counters()
        self.state = MigrationState()
        # A fleet (proxy.fleet): the backfill runs only where the fleet elected it, and writes stop when this
        # proxy's lease on the control store lapses (until then: monotonic deadline; 0 = not yet in sync).
        self._fleet = fleet
        self._may_backfill = not fleet
        self._write_deadline: float | None = 0.0 if fleet else None

    # --- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        log.info("reading the migration state", extra={"control": type(self._control).__name__})
        self.state = await self._control.load()
        log.info("opening the primary", extra={"store": redact(self.state.primary), "phase": self.state.phase.value})
        await self._store(self.state.primary, tolerate=True)
        for spec in self.state.placement.stores():
            if spec != self.state.primary:
                log.info("opening a store scopes are placed on", extra={"store": redact(spec)})
                await self._store(spec, tolerate=True)
        if self.state.secondary:
            log.info("opening the secondary", extra={"store": redact(self.state.secondary)})
            second = await self._store(self.state.secondary, tolerate=True)
            if isinstance(second, Unreachable):
                self.outage.report(StoreUnavailable(second.cause))
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

    async def _store(self, spec: str, tolerate: bool = False) -> Backend:
        """The open store of `spec`. With `tolerate` (at start), a store that cannot be reached now, or that takes
        longer than a few seconds to open, is stood in for by an Unreachable (every call fails as an outage) while
        the opening goes on in the background; the proxy does not wait on a host that does not answer."""
        store = self._stores.get(spec)
        if store is None:
            opening = asyncio.ensure_future(self._open_shareable(spec))
            if not tolerate:
                store = await asyncio.wait_for(opening, self._OPEN_TIMEOUT)
            else:
                await asyncio.wait({opening}, timeout=self._START_TIMEOUT)
                failed = opening.done() and opening.exception() is not None
                if opening.done() and not failed:
                    store = opening.result()
                else:
                    cause = opening.exception() if failed else None
                    if cause is not None and not transient(cause):
                        raise cause
                    shown = f"{type(cause).__name__}: {cause}"[:300] if cause else "still opening"
                    log.warning("store unreachable; serving without it and reconnecting in the background",
                                extra={"store": redact(spec), "error": shown})
                    store = cast(Backend, Unreachable(redact(spec), shown))
                    self._reconnects[spec] = asyncio.ensure_future(
                        self._reconnect(spec, None if failed else opening))
            self._adopt_store(spec, store)
        elif spec == self.state.primary and not isinstance(store, Unreachable):
            self.primary_up.set()
        return store

    async def _open_shareable(self, spec: str) -> Backend:
        """Open `spec`; in a fleet, refuse a store several proxies cannot write at once (FleetUnsafe)."""
        store = await self._open(spec)
        if self._fleet and (why := fleet_problem(store)) is not None:
            await store.close()
            raise FleetUnsafe(f"a fleet cannot share {redact(spec)}: {why}")
        return store

    def _adopt_store(self, spec: str, store: Backend) -> None:
        """`store` now serves `spec` (opened, or stood in for while it cannot be)."""
        self._stores[spec] = store
        self._systems[id(store)] = system_of(spec)
        if not isinstance(store, Unreachable):
            heap.freeze_new_modules()  # its client library's objects are as long-lived as the ones frozen at start
        if spec == self.state.primary and not isinstance(store, Unreachable):
            self.primary_up.set()

    async def _reconnect(self, spec: str, opening: asyncio.Future[Backend] | None) -> None:
        """Open `spec` until it answers (`opening`: an attempt already under way, awaited first)."""
        delay = 0.2
        while True:
            try:
                if opening is not None:
                    store = await opening
                else:
                    await asyncio.sleep(delay)
                    delay = min(5.0, delay * 2)
                    store = await asyncio.wait_for(self._open_shareable(spec), self._OPEN_TIMEOUT)
            except Exception as exc:
                opening = None
                log.debug("store still unreachable", extra={"store": redact(spec), "error": repr(exc)})
                continue
            self._adopt_store(spec, store)
            self._reconnects.pop(spec, None)
            log.info("store reachable again", extra={"store": redact(spec)})
            self._repair_wakeup.set()
            return

    @property
    def primary(self) -> Backend:
        """The store a migration moves scopes from (after cutover: to), which decides the answers for those scopes.
        Every other scope is served by its own store (`store_for`)."""
        return self._stores[self.state.primary]

    def opened(self, spec: str) -> Backend:
        """The open store of `spec` (every store the state names is opened at start and when adopted)."""
        return self._stores[spec]

    def store_for(self, scope: str) -> Backend:
        """The store that serves `scope` (proxy.placement): the one its writes are answered by."""
        return self._stores[self.state.placement.store_of(scope)]

    def moves(self, scope: str) -> bool:
        """Whether the current migration writes `scope` to both stores: it selected the scope, and the other store
        is still being written (docs/placement.md). Every other scope pays nothing for the migration."""
        s = self.state
        return writes_secondary(s.phase, s.secondary) and moves(s.start_placement, s.selection, s.source, scope)

    def moved(self) -> Callable[[str], bool]:
        """Which scopes the current migration moves, fixed now (for a Verify that may outlive the rollback window)."""
        s = self.state
        return functools.partial(moves, s.start_placement, s.selection, s.source)

    def stores(self) -> list[Backend]:
        """Every open store the placement names."""
        return [self._stores[spec] for spec in self.state.placement.stores() if spec in self._stores]

    @property
    def secondary(self) -> Backend | None:
        """The store being written alongside the primary, or None."""
        if not writes_secondary(self.state.phase, self.state.secondary):
            return None
        return self._stores.get(self.state.secondary)

    @property
    def secondary_reachable(self) -> Backend | None:
        """The secondary, unless it is out (proxy.outage): then reads and shadow reads stay on the primary."""
        return None if self.outage.current is not None else self.secondary

    async def _probe_secondary(self) -> None:
        secondary = self.secondary
        if secondary is None:
            return  # nothing to wait for any more
        await asyncio.wait_for(secondary.get_records([_PROBE_KEY]), 5.0)

    async def _outage_changed(self, started: Outage | None, ended: Outage | None) -> None:
        if started is not None:
            log.warning("new store unreachable: reads stay on the primary, writes are queued for repair, the backfill "
                        "and the read ramp hold", extra={"store": redact(self.state.secondary),
                                                         "reason": started.reason})
            await self.note("memshift", f"new store unreachable ({scrub(started.reason)}): reads on the primary, "
                            "writes queued for repair, backfill and ramp held until it answers", {})
            return
        assert ended is not None
        lasted = time.time() - ended.since
        log.info("new store reachable again; the migration goes on", extra={"outage_seconds": round(lasted, 1)})
        async with self._lock:
            s = self.state
            if s.ramp_step >= 0:  # the step is judged afresh: nothing was compared while the store was out
                await self._save(replace(s, ramp_step_started_at=time.time()))
            await self._note("memshift", f"new store reachable again after {lasted:.1f} s: resumed",
                             {"outage_seconds": round(lasted, 1)})
        self._repair_wakeup.set()

    def system(self, store: Backend) -> str:
        return self._systems.get(id(store), "other")

    def scope_pending(self, scope: str) -> bool:
        """True while the scope has a repair pending: the secondary may lack an acknowledged write there."""
        return scope in self._dirty

    async def _run(self, op: WriteOp[T], store: Backend, role: str, version: int) -> WriteResult[T]:
        with self.telemetry.store_call(role, self.system(store), type(op).__name__):
            return await op.run(store, version)

    # --- writes ----------------------------------------------------------------------------------------------------
    async def write(self, op: WriteOp[T]) -> WriteResult[T]:
        if self._write_deadline is not None and time.monotonic() > self._write_deadline:
            raise LeaseLapsed("this proxy has lost touch with the fleet's control store (its lease lapsed), so it "
                              "may not know the current phase; writes are refused until it has caught up")
        self._expire_mirror_if_due()
        version = self._clock.now()
        secondary = self.secondary if self.moves(op.scope) else None
        if secondary is None:
            self._solo_inflight += 1
            self._solo_idle.clear()
            try:
                return await self._run(op, self.store_for(op.scope), "primary", version)
            finally:
                self._solo_inflight -= 1
                if self._solo_inflight == 0:
                    self._solo_idle.set()
        return await self._dual_write(op, version, self.primary, secondary)

    async def restore(self, records: Sequence[Record], vectors: VectorMap | None) -> int:
        """Records from a backup, each applied if newer with its own version, through `write`: during a migration
        they reach both stores (or the repair queue) like any write. The clock first moves past their versions, so a
        write made after the restore orders after what it restored. Returns how many replaced stored state."""
        if not records:
            return 0
        self._clock.observe(max(max(r.version, getattr(r, "purged", 0)) for r in records))
        routes: dict[tuple[str, bool], list[Record]] = {}  # one write per store a scope is placed on
        for r in records:
            routes.setdefault((self.state.placement.store_of(r.scope), self.moves(r.scope)), []).append(r)
        return sum([(await self.write(ApplyRecords(part, vectors))).answer for part in routes.values()])

    async def newer_than_stored(self, records: Sequence[Record]) -> int:
        """How many of these records a restore would apply: those the primary lacks or holds at an older version,
        leaving out children older than a deletion of their entity (a purge hides them; see adapters.records)."""
        parents = {p for r in records for p in parents_of(r.key)}
        wanted: dict[str, set[RecordKey]] = {}
        for key in {r.key for r in records} | parents:
            wanted.setdefault(self.state.placement.store_of(key[1]), set()).add(key)
        held = {r.key: r for spec, keys in wanted.items() for r in await self._stores[spec].get_records(list(keys))}
        purged = {k: _purged(held.get(k)) for k in parents}
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
        placed = self.stores()
        done = sum([await store.embed_stale() for store in placed])
        secondary = self.secondary
        if secondary is not None and secondary not in placed and self.outage.current is None:
            with contextlib.suppress(StoreUnavailable):  # the backfill or a repair embeds there later
                await secondary.embed_stale()
        return done

    async def _dual_write(self, op: WriteOp[T], version: int, primary: Backend,
                          secondary: Backend) -> WriteResult[T]:
        if self.outage.current is not None:
            # The new store is out: no time is spent on it; its half is owed through the repair queue, which the
            # caller's acknowledgement waits for, as for any failed secondary write.
            result = await self._run(op, primary, "primary", version)
            self._count(secondary_skipped=1)
            await self._enqueue(self.state.migration_id, op.keys() + [r.key for r in result.effects])
            return result
        keys = op.keys()  # a WriteOp's keys, not a mapping's
        scopes = {k[1] for k in keys}
        # With no repair running anywhere, nobody waits on the gate and nobody needs waking: the write goes through
        # without its lock (the check and the count happen with no await between them, so no repair can slip in).
        if self._repairing:
            async with self._scope_gate:
                await self._scope_gate.wait_for(lambda: not any(self._repairing[s] for s in scopes))
                self._writing.update(scopes)
        else:
            self._writing.update(scopes)
        try:
            return await self._both(op, version, primary, secondary)
        finally:
            _release(self._writing, scopes)
            if self._repairing:
                async with self._scope_gate:
                    self._scope_gate.notify_all()

    async def _both(self, op: WriteOp[T], version: int, primary: Backend, secondary: Backend) -> WriteResult[T]:
        migration_id = self.state.migration_id
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
                await self._enqueue(migration_id, op.keys())
            if not s_done:
                s_task.add_done_callback(_consume)
            raise p_exc
        done = s_task.done() or bool((await asyncio.wait({s_task}, timeout=self._grace))[0])
        self._count(dual_writes=1)
        if not done:
            s_task.add_done_callback(_consume)
            self._count(secondary_late=1)
            self.telemetry.dual_write_failures.add(1, {"memshift.reason": "late"})
            await self._enqueue(migration_id, op.keys())
        elif s_task.exception() is not None:
            exc = s_task.exception()
            if isinstance(exc, EntityNotFound):  # the backfill has not brought that entity yet: expected
                self._count(effect_mismatches=1)
                self._secondary_outcome(error=False)
            elif isinstance(exc, StoreUnavailable):  # an outage, not a wrong answer: held, not counted against it
                self._count(secondary_failures=1)
                self.outage.report(exc)
            else:
                self._count(secondary_failures=1)
                self._secondary_outcome(error=True)
                self.telemetry.dual_write_failures.add(1, {"memshift.reason": "error"})
                log.warning("secondary write failed; queued for repair",
                            extra={"error": repr(exc), "keys": len(op.keys())})
            await self._enqueue(migration_id, op.keys())
        else:
            self._secondary_outcome(error=False)
            # Plain record equality (in key order): cheaper than digests on the hot path, and the same test.
            mine = sorted(p_result.effects, key=_key_of)
            theirs = sorted(s_task.result().effects, key=_key_of)
            if mine != theirs:
                self._count(effect_mismatches=1)
                self.telemetry.dual_write_failures.add(1, {"memshift.reason": "mismatch"})
                await self._enqueue(migration_id, op.keys() + [r.key for r in p_result.effects])
        return p_result

    def _count(self, **inc: int) -> None:
        for name, n in inc.items():
            setattr(self.counters, name, getattr(self.counters, name) + n)

    def _secondary_outcome(self, error: bool) -> None:
        if self.observations is not None:
            self.observations.secondary_call(time.time(), error)

    async def _enqueue(self, migration_id: int, keys: list[RecordKey]) -> None:
        await self._control.enqueue_repairs(migration_id, list(dict.fromkeys(keys)))
        scopes = {k[1] for k in keys}  # after the insert, so a concurrent refresh cannot drop them
        self._dirty |= scopes
        for added in self._dirty_since:
            added |= scopes
        self._repair_wakeup.set()

    async def _refresh_dirty(self) -> None:
        # Refreshes may overlap (the repair loop, a fleet broadcast): each keeps its own record of what was queued
        # while it read, so none can drop a scope another write just made dirty.
        added: set[str] = set()
        self._dirty_since.append(added)
        try:
            found = await self._control.repair_scopes(self.state.migration_id)
            self._dirty = found | added
        finally:
            self._dirty_since.remove(added)

    # --- repair ----------------------------------------------------------------------------------------------------
    async def _repair_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._repair_wakeup.wait(), self._repair_interval)
            self._repair_wakeup.clear()
            try:
                while await self.repair_once() > 0:
                    pass
                await self._refresh_dirty()
                await self.repair_depth()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("repair pass failed")

    async def repair_once(self) -> int:
        """One batch of due repairs; returns how many keys were settled."""
        secondary = self.secondary
        if secondary is None or self.outage.current is not None:
            return 0  # an outage: the queue waits for the store instead of counting a failure per key per try
        items = await self._control.due_repairs(self.state.migration_id, self._repair_batch)
        if strays := [i for i in items if not self.moves(i.key[1])]:
            # Carried over from a migration that moved other scopes: this one's target may be where those scopes
            # live now, so nothing may be copied onto it; a later migration of those scopes copies them afresh.
            await self._control.repaired([i.id for i in strays])
            items = [i for i in items if self.moves(i.key[1])]
        if not items:
            return len(strays)
        scopes = {i.key[1] for i in items}
        registered = False  # undo only what was done: counting out scopes never counted in would free others'
        try:
            async with self._scope_gate:
                self._repairing.update(scopes)
                registered = True
                # Bounded: a primary that hangs holds its caller anyway; the repair comes back to these keys later.
                await asyncio.wait_for(self._scope_gate.wait_for(lambda: not any(self._writing[s] for s in scopes)),
                                       self._REPAIR_WAIT)
            try:
                moved = set(await self.reconcile([i.key for i in items], self.primary, secondary))
            except Exception as exc:
                if transient(exc):
                    raise
                # One key the new store refuses must not hold back the others: each is repaired on its own, and a
                # key refused alone is parked (retried rarely, and at once when written or queued again).
                moved, items = await self._repair_each(items, secondary)
        except Exception as exc:
            self._count(repair_failures=sum(1 for i in items if i.attempts == 0))  # keys that failed, not tries
            for item in items:
                await self._control.repair_failed(item, repr(exc), min(30.0, 0.2 * 2 ** item.attempts))
            log.warning("repair failed; will retry", extra={"error": repr(exc), "keys": len(items)})
            return 0
        finally:
            if registered:
                async with self._scope_gate:
                    _release(self._repairing, scopes)
                    self._scope_gate.notify_all()
        for item in items:
            if item.key in moved:  # a write raced the repair; read both sides again shortly
                await self._control.repair_failed(item, "raced a write", 0.0)
        settled = [i for i in items if i.key not in moved]
        await self._control.repaired([i.id for i in settled])
        self._count(repairs_done=len(settled))
        if self.state.blocked_key:
            self._notice(self._unblock({key_text(i.key) for i in settled}, "memshift"))
        return len(settled)

    def _notice(self, change: Awaitable[None]) -> None:
        """Run a state change a repair decided, on its own: a repair may run inside a phase change that holds the
        state lock (draining the queue before cutover), so it cannot take that lock itself."""
        task = asyncio.ensure_future(change)
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)
        task.add_done_callback(_consume)

    async def _repair_each(self, items: list[RepairItem], secondary: Backend) -> tuple[set[RecordKey],
                                                                                     list[RepairItem]]:
        """Reconcile `items` one key at a time; returns the keys that raced a write and the items settled or raced
        (those the new store refuses are parked, and the migration is paused naming the first)."""
        moved: set[RecordKey] = set()
        done: list[RepairItem] = []
        for item in items:
            raced, refused = await refused_twice(
                lambda key=item.key: self.reconcile([key], self.primary, secondary))  # type: ignore[misc]
            if refused is None:
                moved |= set(raced or ())
                done.append(item)
                continue
            self._count(repair_failures=1 if item.attempts == 0 else 0)
            await self._control.repair_failed(item, repr(refused)[:500], self._PARKED)
            self._notice(self.block(item.key, refused, during="repair"))
        return moved, done

    @staticmethod
    async def reconcile(keys: list[RecordKey], primary: Backend, secondary: Backend) -> list[RecordKey]:
        """Make the secondary hold exactly the primary's records for these keys; returns keys that raced.

        An entity brings its children along: a purge one store made and the other did not (a delete the primary
        refused) removed children there, and only reconciling them puts them back. A child is judged against its
        entities' purge points when it is applied, so the entities a queued child hangs from are compared too, and
        every entity is fixed before any child: a relation restored while the secondary still held its endpoint's
        tombstone would be refused again, and nothing would queue it a second time."""
        queued = list(dict.fromkeys(keys))
        entities = [k for k in queued if k[0] == Kind.ENTITY]
        queued_entities = set(entities)
        parents = [k for k in dict.fromkeys(p for k in queued for p in parents_of(k)) if k not in queued_entities]
        mine: dict[RecordKey, Record] = {}
        theirs: dict[RecordKey, Record] = {}

        async def fetch(wanted: list[RecordKey]) -> None:
            if wanted:
                mine.update((r.key, r) for r in await primary.get_records(wanted))
                theirs.update((r.key, r) for r in await secondary.get_records(wanted))

        await fetch(parents)
        entities += [k for k in parents if not _same(mine.get(k), theirs.get(k))]
        children: list[RecordKey] = []
        for _, scope, parts in entities:
            children += await primary.child_keys(scope, parts[0])
            children += await secondary.child_keys(scope, parts[0])
        keys = list(dict.fromkeys([*entities, *queued, *children]))  # entities first; stores apply in this order
        fetched = set(parents)
        await fetch([k for k in keys if k not in fetched])  # the parents' records are already here
        fixes: list[tuple[RecordKey, Record | None, int | None]] = []
        for key in keys:
            p, s = mine.get(key), theirs.get(key)
            if not _same(p, s):
                fixes.append((key, p, s.version if s is not None else None))
        return await secondary.replace_if(fixes) if fixes else []

    async def drain_repairs(self, within: float = 30.0) -> int:
        """Repair until the queue is empty (or the time is up); returns what is left."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            await self.repair_once()
            left = await self._control.repair_depth(self.state.migration_id)
            if left == 0 or self.secondary is None:
                await self._refresh_dirty()
                return left
            await asyncio.sleep(0.01)
        return await self._control.repair_depth(self.state.migration_id)

    # --- backfill --------------------------------------------------------------------------------------------------
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
                task.add_done_callback(_consume)  # a batch retried from the checkpoint, or no longer wanted
            in_flight.clear()
            if ahead is not None:
                ahead[1].cancel()
                ahead[1].add_done_callback(_consume)

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
                    next_cursor, exhausted = page.next_after, page.next_after is None
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

    async def block(self, key: RecordKey, exc: BaseException, during: str) -> None:
        """A record the new store refuses for good: pause instead of retrying forever. The backfill stops at its
        checkpoint and the read ramp stops; status, history and log name the key and the store's reason. The backfill
        goes on when an operator resumes it (after fixing or deleting the record through the API); a refused repair
        clears by itself once that key is repaired (written again, or queued again by Verify --repair)."""
        shown = key_text(key)
        reason = f"the new store refuses {shown} ({during}): {type(exc).__name__}: {scrub(str(exc))[:300]}"
        async with self._lock:
            s = self.state
            backfilling = s.phase == Phase.DATA_MIGRATION and not s.backfill_complete
            if backfilling:
                self._resume.clear()
            if s.blocked == reason:
                return
            if s.blocked:  # the status keeps naming the first refused key; the history lists each of them
                await self._note("memshift", f"also refused: {reason}", {"key": shown, "during": during})
            else:
                await self._save(replace(s, paused=s.paused or backfilling, blocked_key=shown, blocked=reason,
                                         ramp_step=-1,
                                         ramp_note=f"stopped: {reason}" if s.ramp_step >= 0 else s.ramp_note))
                await self._note("memshift", f"paused: {reason}", {"key": shown, "during": during})
        log.error("migration paused: the new store refuses a record", extra={"key": shown, "reason": reason})

    async def _unblock(self, settled: set[str], actor: str) -> None:
        async with self._lock:
            s = self.state
            if s.blocked_key and s.blocked_key in settled:
                await self._save(replace(s, blocked_key="", blocked=""))
                await self._note(actor, f"unblocked: {s.blocked_key} is on the new store now", {})

    def _changed(self, page: ExportPage) -> _Page:
        """The part of `page` this migration writes: all of it, or (going back to a target that had the whole copy
        at a rollback) the records changed since then. Every record still counts as read."""
        since = self.state.copy_since
        records = tuple(r for r in page.records if (not since or r.version > since) and self.moves(r.scope))
        vectors = page.vectors
        if vectors and len(records) < len(page.records):
            vectors = {k: v for k, v in vectors.items() if self.moves(k[0])}
        return _Page(records, page.next_after, vectors, len(page.records))

    async def _read_page(self, cursor: RecordKey | None) -> ExportPage:
        state = self.state
        secondary = self.secondary
        keep = secondary is not None and not state.options.reembed and self.primary.embedding == secondary.embedding
        size, rate = min(self._page_size, state.options.batch_size), state.options.rate_limit
        if rate > 0:  # at most a second's worth of records a batch: under a low limit progress still moves evenly
            size = min(size, max(1, math.ceil(rate)))
        return await self.primary.export_page(cursor, size, vectors=keep)

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

    # --- a fleet (driven by proxy.fleet.FleetSync) -------------------------------------------------------------------
    async def adopt(self, state: MigrationState) -> bool:
        """Apply a state another proxy saved (a broadcast or the periodic re-read); True if it was news."""
        async with self._lock:
            news = await self._adopt(state)
        if news:
            self._expire_mirror_if_due()
            await self._refresh_dirty()
        return news

    async def _fresh(self) -> None:
        """In a fleet, act on the latest state: another proxy may have changed it since the last broadcast."""
        if self._fleet:
            await self._adopt(await self._control.load())

    async def _adopt(self, state: MigrationState) -> bool:
        if state.revision <= self.state.revision:
            return False
        for spec in dict.fromkeys([state.primary, state.secondary, *state.placement.stores()]):
            if spec:
                await self._store(spec)
        before, self.state = self.state, state
        if state.paused:
            self._resume.clear()
        else:
            self._resume.set()
        if state.migration_id != before.migration_id:
            self._dirty = set()
        if (state.phase != Phase.DATA_MIGRATION or state.backfill_complete) and self._backfill_task is not None:
            self._backfill_task.cancel()
        return True

    @property
    def solo_writes_idle(self) -> bool:
        return self._solo_idle.is_set()

    async def solo_writes_done(self) -> None:
        """Wait for writes that started before dual-writing (they went to the primary alone)."""
        await self._solo_idle.wait()

    def lease_renewed(self, deadline: float) -> None:
        """In sync with the fleet until `deadline` (time.monotonic)."""
        self._write_deadline = deadline

    def lead_backfill(self, lead: bool) -> None:
        """Elected (or not) to run the backfill; another proxy continues from the checkpoint when this one stops."""
        self._may_backfill = lead
        if lead and self.state.phase == Phase.DATA_MIGRATION and not self.state.backfill_complete:
            self._start_backfill()
        elif not lead and self._backfill_task is not None and not self._backfill_task.done():
            self._backfill_task.cancel()

    @property
    def backfilling(self) -> bool:
        return self._backfill_task is not None and not self._backfill_task.done()

    # --- phase changes ---------------------------------------------------------------------------------------------
    async def _save(self, new: MigrationState, durable: bool = True) -> None:
        # A save that has started finishes, and this proxy adopts what it wrote, even when the caller is cancelled
        # meanwhile (a backfill cancelled during its checkpoint): the control store's worker thread completes the
        # write anyway, and a state in memory one revision behind the store would fail the next change.
        # The cancelled caller also waits for that write before it lets go of the lock: otherwise the next change
        # would read the revision from before it and fail with a Conflict against this proxy's own write.
        saving = asyncio.ensure_future(self._control.save(new, self.state.revision, durable))
        saving.add_done_callback(self._saved)
        cancelled = False
        while True:
            try:
                await asyncio.shield(saving)
                break
            except asyncio.CancelledError:
                if saving.done():
                    raise
                cancelled = True  # bounded: the control store's own timeouts end the write
            except Conflict:
                self.state = await self._control.load()
                if cancelled:
                    break
                raise
        if cancelled:
            raise asyncio.CancelledError

    def _saved(self, saving: asyncio.Future[MigrationState]) -> None:
        if not saving.cancelled() and saving.exception() is None and saving.result().revision > self.state.revision:
            self.state = saving.result()

    async def _change(self, to: MigrationState, actor: str, reason: str, figures: dict[str, Any]) -> None:
        before = self.state.phase
        await self._save(to)
        entry = _history(before, to.phase, actor, reason, figures)
        await self._control.record(entry)
        log.info("phase change", extra={"from": before.value, "to": to.phase.value, "actor": entry.actor,
                                        "reason": entry.reason, **entry.figures})

    def _check(self, step: Step) -> Stage:
        """Where `step` leads from the current state (`proxy.phases.TABLE`), or IllegalTransition."""
        return check(self.state.phase, self.state.secondary, step, self._phase_shown())

    def _phase_shown(self) -> str:
        """The phase for an error message; after a rollback, with when, by whom and why it happened."""
        s = self.state
        return s.phase.value + (f" (rolled back {s.rolled_back})" if s.phase == Phase.ROLLED_BACK else "")

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
            total = (await (await self._store(source)).count()).total  # every record is read, selected or not
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

    # --- read ramp and policy actions (decided by proxy.guard, applied here) ----------------------------------------
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

    async def note(self, actor: str, reason: str, figures: dict[str, Any]) -> None:
        """Record an action that does not change the phase (an alert, a ramp step) in the phase history."""
        async with self._lock:
            await self._note(actor, reason, figures)

    async def _note(self, actor: str, reason: str, figures: dict[str, Any]) -> None:
        phase = self.state.phase
        await self._control.record(_history(phase, phase, actor, reason, figures))

    async def record_verify(self, differences: int) -> None:
        async with self._lock:
            await self._save(replace(self.state, last_verify_differences=differences, verify_cursor=None))

    async def save_verify_cursor(self, cursor: RecordKey | None) -> None:
        async with self._lock:
            await self._save(replace(self.state, verify_cursor=cursor), durable=False)  # a resume point, see save

    def _expire_mirror_if_due(self) -> None:
        s = self.state
        due = stage(s.phase, s.secondary) == Stage.WINDOW and 0 < s.mirror_until < time.time()
        if due and (self._window_task is None or self._window_task.done()):
            self._window_task = asyncio.ensure_future(self._close_window())

    async def _close_window(self) -> None:
        with contextlib.suppress(IllegalTransition, Conflict):
            await self.advance(Phase.COMPLETED, "memshift", "rollback window expired")

    async def settle(self, keys: Sequence[RecordKey], within: float = 10.0) -> None:
        """Wait (at most `within` seconds) until no write is in flight in the scopes of `keys` and none of them has a
        repair pending: what Verify waits for before it calls a difference persistent."""
        scopes = {k[1] for k in keys}
        deadline = time.monotonic() + within
        await asyncio.sleep(2 * self._grace)  # a secondary half answering late is queued within the grace
        while time.monotonic() < deadline:
            await self._refresh_dirty()
            if not any(self._writing[s] for s in scopes) and not scopes & self._dirty:
                return
            self._repair_wakeup.set()
            await asyncio.sleep(0.05)

    async def enqueue_repairs(self, keys: list[RecordKey]) -> None:
        await self._enqueue(self.state.migration_id, keys)

    async def repair_depth(self) -> int:
        self.last_repair_depth = await self._control.repair_depth(self.state.migration_id)
        return self.last_repair_depth

    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        return await self._control.history(limit)


def _history(before: Phase, after: Phase, actor: str, reason: str, figures: dict[str, Any]) -> HistoryEntry:
    """A history entry as it may be kept: every text in it scrubbed of credentials (a reason naming a store spec,
    typed by an operator or written by the engine), since the history outlives every log."""
    return HistoryEntry(time.time(), before, after, scrub(actor), scrub(reason),
                        {k: scrub(v) if isinstance(v, str) else v for k, v in figures.items()})


def _purged(record: Record | None) -> int:
    return record.purged if isinstance(record, EntityRecord) else 0


_PROBE_KEY: RecordKey = (Kind.ENTITY, "memshift-probe", ("reachable?",))


@dataclass(frozen=True, slots=True)
class _Page:
    """A page as the backfill writes it: the records to write, and how many were read (`ExportPage` otherwise)."""

    records: tuple[Record, ...]
    next_after: RecordKey | None
    vectors: VectorMap | None
    read: int


class _Blocked(Exception):
    """The backfill met a record the new store refuses; the migration is paused (MigrationEngine.block)."""


def _release(held: Counter[str], scopes: set[str]) -> None:
    """Count `scopes` out of `held`, dropping those no longer held: an empty counter then means nothing is held, and
    it does not keep an entry for every scope ever written."""
    for scope in scopes:
        if held[scope] > 1:
            held[scope] -= 1
        else:
            held.pop(scope, None)


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of work nobody waits for any more (a late secondary write, whose keys are already
    queued; a backfill read or apply dropped for a retry) so asyncio does not warn."""
    if not task.cancelled():
        task.exception()
