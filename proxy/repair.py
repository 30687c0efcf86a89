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
from collections.abc import Sequence

from adapters.base import Backend
from adapters.records import EntityRecord, Kind, Record, RecordKey, key_text, parents_of, same_content
from proxy.control import RepairItem
from proxy.engine_core import EngineCore, release_scopes
from proxy.refusals import refused_twice, transient

log = logging.getLogger("memshift.migration")


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


class RepairQueue(EngineCore):
    """Keys the new store may disagree on, queued durably and reconciled from the decisive store."""

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
        due = await self._control.due_repairs(self.state.migration_id, self._repair_batch)
        items: list[RepairItem] = []
        strays: list[RepairItem] = []
        for item in due:
            (items if self.moves(item.key[1]) else strays).append(item)
        if strays:
            # Carried over from a migration that moved other scopes: this one's target may be where those scopes
            # live now, so nothing may be copied onto it; a later migration of those scopes copies them afresh.
            await self._control.repaired([i.id for i in strays])
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
                    release_scopes(self._repairing, scopes)
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
