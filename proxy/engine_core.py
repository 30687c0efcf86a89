"""What every part of the migration engine shares: the state, the stores, and the one way the state changes.

`EngineCore` holds the migration state (read from and saved to the control store by compare-and-set, `_save`), the
open stores and which of them serves a scope (`store_for`, by the placement) or is written alongside for a moved
scope (`moves`, `secondary`), the step table every change consults (`_check`, proxy.phases), the phase history
(`_change`, `note`) and the pause a refused record causes (`block`). The parts build on it, each readable alone:
`proxy.repair` (the repair queue), `proxy.dual_write` (the write path), `proxy.backfill` (the copy),
`proxy.adoption` (a fleet's shared state) and `proxy.migration` (the operator's steps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

from adapters.base import Backend, WriteResult, fleet_problem
from adapters.records import Kind, RecordKey, key_text
from policies import pacing
from policies.rules import Observations
from proxy import heap
from proxy.clock import HybridClock
from proxy.control import Conflict, ControlStore, HistoryEntry, MigrationState, Phase
from proxy.eager import consume
from proxy.errors import FleetUnsafe, IllegalTransition
from proxy.ops import WriteOp
from proxy.outage import Outage, OutageWatch, Unreachable
from proxy.phases import Stage, Step, check, stage, writes_secondary
from proxy.placement import Moved, moves
from proxy.redaction import redact, scrub
from proxy.refusals import transient
from proxy.stores import system_of
from proxy.telemetry import Telemetry

log = logging.getLogger("memshift.migration")


T = TypeVar("T")


# Re-copied after a rollback besides what changed: the writes of the last 10 minutes before it, in case another
# proxy's clock ran behind (one proxy's own clock needs no margin: a write reads the phase in the same step it is
# stamped, so every write stamped before the rollback was dual-written or queued).
RESYNC_MARGIN_MS = 10 * 60 * 1000


StoreOpener = Callable[[str], Awaitable[Backend]]


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


class EngineCore(ABC):
    """The state, the stores and the one way the state changes; every part of the engine builds on it."""

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
        # The default store is open: the proxy can serve (health SERVING). A store only some scopes are placed on
        # does not hold up the others: while it is out, calls in those scopes answer UNAVAILABLE.
        self.default_up = asyncio.Event()
        self.outage = OutageWatch(self._probe_secondary, self._outage_changed)
        self.counters = Counters()
        self.state = MigrationState()
        # A fleet (proxy.fleet): the backfill runs only where the fleet elected it, and writes stop when this
        # proxy's lease on the control store lapses (until then: monotonic deadline; 0 = not yet in sync).
        self._fleet = fleet
        self._may_backfill = not fleet
        self._write_deadline: float | None = 0.0 if fleet else None

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
        elif spec == self.state.placement.default and not isinstance(store, Unreachable):
            self.default_up.set()
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
        if spec == self.state.placement.default and not isinstance(store, Unreachable):
            self.default_up.set()

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

    def moved(self) -> Moved:
        """Which scopes the current migration moves, fixed now (for a Verify that may outlive the rollback window)."""
        s = self.state
        return Moved(s.start_placement, s.selection, s.source)

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

    def _count(self, **inc: int) -> None:
        for name, n in inc.items():
            setattr(self.counters, name, getattr(self.counters, name) + n)

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
        entry = history_entry(before, to.phase, actor, reason, figures)
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

    async def note(self, actor: str, reason: str, figures: dict[str, Any]) -> None:
        """Record an action that does not change the phase (an alert, a ramp step) in the phase history."""
        async with self._lock:
            await self._note(actor, reason, figures)

    async def _note(self, actor: str, reason: str, figures: dict[str, Any]) -> None:
        phase = self.state.phase
        await self._control.record(history_entry(phase, phase, actor, reason, figures))

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

    def _notice(self, change: Awaitable[None]) -> None:
        """Run a state change a repair decided, on its own: a repair may run inside a phase change that holds the
        state lock (draining the queue before cutover), so it cannot take that lock itself."""
        task = asyncio.ensure_future(change)
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)
        task.add_done_callback(consume)

    def _expire_mirror_if_due(self) -> None:
        s = self.state
        due = stage(s.phase, s.secondary) == Stage.WINDOW and 0 < s.mirror_until < time.time()
        if due and (self._window_task is None or self._window_task.done()):
            self._window_task = asyncio.ensure_future(self._close_window())

    async def _close_window(self) -> None:
        with contextlib.suppress(IllegalTransition, Conflict):
            await self.advance(Phase.COMPLETED, "memshift", "rollback window expired")

    @abstractmethod
    async def advance(self, expected: Phase, actor: str, reason: str = "") -> None:
        """The operator's step to the next stage (proxy.migration); the rollback window closes through it."""


def history_entry(before: Phase, after: Phase, actor: str, reason: str, figures: dict[str, Any]) -> HistoryEntry:
    """A history entry as it may be kept: every text in it scrubbed of credentials (a reason naming a store spec,
    typed by an operator or written by the engine), since the history outlives every log."""
    return HistoryEntry(time.time(), before, after, scrub(actor), scrub(reason),
                        {k: scrub(v) if isinstance(v, str) else v for k, v in figures.items()})


_PROBE_KEY: RecordKey = (Kind.ENTITY, "memshift-probe", ("reachable?",))


def release_scopes(held: Counter[str], scopes: set[str]) -> None:
    """Count `scopes` out of `held`, dropping those no longer held: an empty counter then means nothing is held, and
    it does not keep an entry for every scope ever written."""
    for scope in scopes:
        if held[scope] > 1:
            held[scope] -= 1
        else:
            held.pop(scope, None)
