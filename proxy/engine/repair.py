"""The repair queue: keys a dual write could not settle on the new store, reconciled from the decisive store.

A write whose new-store half failed, came late or wrote different records queues its keys (durably, in the control
store) before the caller is answered. The repair loop reads both stores' records of those keys and makes the new
store hold exactly the decisive store's, by compare-and-set on the new store's version, so a write racing the repair
is never overwritten (the key is simply retried). Scopes with a pending repair are read from the decisive store
(read-your-writes). Only the scopes the migration moves are repaired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

from adapters.base import Backend
from adapters.errors import RepairNotRecorded
from adapters.records import EntityRecord, Kind, Record, RecordKey, key_text, parents_of, same_content
from proxy.engine import blocking, phases
from proxy.engine.control import RepairItem
from proxy.engine.gate import ScopeGate
from proxy.engine.keeper import StateKeeper
from proxy.engine.outage import OutageWatch
from proxy.engine.refusals import refused_twice, transient
from proxy.engine.stores import OpenStores
from proxy.runtime.eager import consume

log = logging.getLogger("memshift.migration")


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


def purge_point(r: Record | None) -> int:
    return r.purged if isinstance(r, EntityRecord) else 0


def _same(a: Record | None, b: Record | None) -> bool:
    """Two stores agree on a key when both have nothing live there, or the same record — and, for an entity, the
    same purge point, which decides which children may exist (even for an entity that was never created: a
    relation may name it)."""
    if purge_point(a) != purge_point(b):
        return False
    a_live = a if a is not None and not a.deleted else None
    b_live = b if b is not None and not b.deleted else None
    if a_live is None or b_live is None:
        return a_live is None and b_live is None
    return same_content(a_live, b_live)


class RepairQueue:
    """Keys the new store may disagree on, queued durably and reconciled from the decisive store."""

    WAIT = 5.0  # seconds a repair waits for the writes in flight in its scopes
    PARKED = 300.0  # seconds before a key the new store refused is tried again (at once when queued again)

    def __init__(self, keeper: StateKeeper, stores: OpenStores, gate: ScopeGate, outage: OutageWatch,
                 counters: Counters, *, interval: float = 0.2, batch: int = 200, grace: float = 0.05) -> None:
        self._keeper = keeper
        self._control = keeper.control
        self._stores = stores
        self._gate = gate
        self._outage = outage
        self.counters = counters
        self._interval = interval
        self._batch = batch
        self._grace = grace  # the dual write's: a secondary half answering late is queued within it
        # Scopes with a pending repair: their reads stay on the primary (read-your-writes, docs/design.md, Phases).
        self._dirty: set[str] = set()
        self._dirty_since: list[set[str]] = []  # one per refresh in progress: scopes queued meanwhile
        self.last_depth = 0  # for the metrics gauge, which cannot await
        self._wakeup = asyncio.Event()
        self._notices: set[asyncio.Task[None]] = set()  # pauses and un-pauses decided by a repair, see _notice
        # Keys owed to the new store that the control store could not take (it was out): recorded there by the next
        # pass, before any repair. Their scopes stay pending meanwhile, so reads stay on the decisive store.
        self._owed: dict[int, list[RecordKey]] = {}

    def wake(self) -> None:
        self._wakeup.set()

    def forget_scopes(self) -> None:
        """A new migration (another proxy's): the scopes pending belonged to the one before."""
        self._dirty = set()

    def scope_pending(self, scope: str) -> bool:
        """True while the scope has a repair pending: the secondary may lack an acknowledged write there."""
        return scope in self._dirty

    async def enqueue(self, keys: list[RecordKey]) -> None:
        await self.enqueue_for(self._keeper.state.migration_id, keys)

    async def enqueue_for(self, migration_id: int, keys: list[RecordKey]) -> None:
        """Record durably that the new store owes these keys. When the control store fails, the keys are kept in
        memory (recorded by the next pass that reaches it) and `RepairNotRecorded` is raised: the caller must not be
        told "done" while the only record of the debt would die with this process."""
        keys = list(dict.fromkeys(keys))
        try:
            await self._control.enqueue_repairs(migration_id, keys)
        except Exception as exc:
            self._owed.setdefault(migration_id, []).extend(keys)
            self._mark({k[1] for k in keys})
            log.warning("control store could not record owed keys; kept in memory",
                        extra={"error": type(exc).__name__, "keys": len(keys)})
            raise RepairNotRecorded(f"control store error: {type(exc).__name__}") from exc
        self._mark({k[1] for k in keys})  # after the insert, so a concurrent refresh cannot drop them

    def _mark(self, scopes: set[str]) -> None:
        self._dirty |= scopes
        for added in self._dirty_since:
            added |= scopes
        self._wakeup.set()

    @property
    def owed(self) -> int:
        """Keys owed to the new store that only this process knows of (the control store was out)."""
        return sum(len(keys) for keys in self._owed.values())

    async def record_owed(self) -> None:
        """Record in the control store the keys kept in memory while it was out (raises while it still is)."""
        for migration_id in list(self._owed):
            await self._control.enqueue_repairs(migration_id, list(dict.fromkeys(self._owed[migration_id])))
            del self._owed[migration_id]

    async def refresh_scopes(self) -> None:
        """Read again which scopes have a repair pending."""
        # Refreshes may overlap (the repair loop, a fleet broadcast): each keeps its own record of what was queued
        # while it read, so none can drop a scope another write just made dirty.
        added: set[str] = set()
        self._dirty_since.append(added)
        try:
            found = await self._control.repair_scopes(self._keeper.state.migration_id)
            self._dirty = found | added | {k[1] for keys in self._owed.values() for k in keys}
        finally:
            self._dirty_since.remove(added)

    async def run(self) -> None:
        """The repair loop as production runs it: a pass whenever woken, and every `interval` seconds."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._interval)
            self._wakeup.clear()
            try:
                await self._keeper.certain()  # after a state change whose outcome is unknown
                while await self.repair_once() > 0:
                    pass
                await self.refresh_scopes()
                await self.depth()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("repair pass failed")

    async def repair_once(self) -> int:
        """One batch of due repairs; returns how many keys were settled."""
        await self.record_owed()
        if self._keeper.uncertain:
            # Which store decides is not known until the state is read again (by a write or a step, which may hold
            # the lock this pass runs under): a repair now could copy in the wrong direction.
            return 0
        secondary = self._stores.secondary
        if secondary is None or self._outage.current is not None:
            return 0  # an outage: the queue waits for the store instead of counting a failure per key per try
        due = await self._control.due_repairs(self._keeper.state.migration_id, self._batch)
        items: list[RepairItem] = []
        strays: list[RepairItem] = []
        state = self._keeper.state
        for item in due:
            (items if phases.moves(state, item.key[1]) else strays).append(item)
        if strays:
            # Carried over from a migration that moved other scopes: this one's target may be where those scopes
            # live now, so nothing may be copied onto it; a later migration of those scopes copies them afresh.
            await self._control.repaired([i.id for i in strays])
        if not items:
            return len(strays)
        try:
            async with self._gate.repairing({i.key[1] for i in items}, self.WAIT):
                try:
                    moved = set(await self.reconcile([i.key for i in items], self._stores.primary, secondary))
                except Exception as exc:
                    if transient(exc):
                        raise
                    # One key the new store refuses must not hold back the others: each is repaired on its own, and
                    # a key refused alone is parked (retried rarely, and at once when written or queued again).
                    moved, items = await self._repair_each(items, secondary)
        except Exception as exc:
            self.counters.repair_failures += sum(1 for i in items if i.attempts == 0)  # keys, not tries
            for item in items:
                await self._control.repair_failed(item, repr(exc), min(30.0, 0.2 * 2 ** item.attempts))
            log.warning("repair failed; will retry", extra={"error": repr(exc), "keys": len(items)})
            return 0
        for item in items:
            if item.key in moved:  # a write raced the repair; read both sides again shortly
                await self._control.repair_failed(item, "raced a write", 0.0)
        settled = [i for i in items if i.key not in moved]
        await self._control.repaired([i.id for i in settled])
        self.counters.repairs_done += len(settled)
        if self._keeper.state.blocked_key:
            self._notice(blocking.unblock(self._keeper, {key_text(i.key) for i in settled}, "memshift"))
        return len(settled)

    async def _repair_each(self, items: list[RepairItem], secondary: Backend) -> tuple[set[RecordKey],
                                                                                     list[RepairItem]]:
        """Reconcile `items` one key at a time; returns the keys that raced a write and the items settled or raced
        (those the new store refuses are parked, and the migration is paused naming the first)."""
        moved: set[RecordKey] = set()
        done: list[RepairItem] = []
        for item in items:
            raced, refused = await refused_twice(
                lambda key=item.key: self.reconcile([key], self._stores.primary, secondary))  # type: ignore[misc]
            if refused is None:
                moved |= set(raced or ())
                done.append(item)
                continue
            self.counters.repair_failures += 1 if item.attempts == 0 else 0
            await self._control.repair_failed(item, repr(refused)[:500], self.PARKED)
            self._notice(blocking.block(self._keeper, item.key, refused, during="repair"))
        return moved, done

    def _notice(self, change: Awaitable[None]) -> None:
        """Run a state change a repair decided, on its own: a repair may run inside a phase change that holds the
        state lock (draining the queue before cutover), so it cannot take that lock itself."""
        task = asyncio.ensure_future(change)
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)
        task.add_done_callback(consume)

    def pending_notices(self) -> list[asyncio.Task[None]]:
        return list(self._notices)

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

    async def drain(self, within: float = 30.0) -> int:
        """Repair until the queue is empty (or the time is up); returns what is left."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            await self.repair_once()
            left = await self.depth()
            if left == 0 or self._stores.secondary is None:
                await self.refresh_scopes()
                return left
            await asyncio.sleep(0.01)
        return await self.depth()

    async def settle(self, keys: Sequence[RecordKey], within: float = 10.0) -> None:
        """Wait (at most `within` seconds) until no write is in flight in the scopes of `keys` and none of them has a
        repair pending: what Verify waits for before it calls a difference persistent."""
        scopes = {k[1] for k in keys}
        deadline = time.monotonic() + within
        await asyncio.sleep(2 * self._grace)  # a secondary half answering late is queued within the grace
        while time.monotonic() < deadline:
            await self.refresh_scopes()
            if not self._gate.busy(scopes) and not scopes & self._dirty:
                return
            self._wakeup.set()
            await asyncio.sleep(0.05)

    async def depth(self) -> int:
        """Keys pending on the new store: those queued in the control store and those owed in memory."""
        self.last_depth = await self._control.repair_depth(self._keeper.state.migration_id) + self.owed
        return self.last_depth
