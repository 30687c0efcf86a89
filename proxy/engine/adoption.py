"""One proxy of a fleet taking on the state the others save (driven by proxy.engine.fleet.FleetSync).

A broadcast or the periodic re-read hands over the latest state: the proxy opens any store it names, takes it on
(the backfill follows its pause by itself), drops the pending scopes of an earlier migration and stops a backfill
that is no longer wanted.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.engine import phases
from proxy.engine.backfill import Backfill
from proxy.engine.control import MigrationState
from proxy.engine.keeper import StateKeeper
from proxy.engine.repair import RepairQueue
from proxy.engine.stores import OpenStores


class FleetAdoption:
    def __init__(self, keeper: StateKeeper, stores: OpenStores, repairs: RepairQueue, backfill: Backfill,
                 after_news: Callable[[], None] = lambda: None) -> None:
        self._keeper = keeper
        self._stores = stores
        self._repairs = repairs
        self._backfill = backfill
        self._after_news = after_news

    async def adopt(self, state: MigrationState) -> bool:
        """Apply a state another proxy saved (a broadcast or the periodic re-read); True if it was news."""
        async with self._keeper.lock:
            news = await self.adopt_locked(state)
        if news:
            self._after_news()
            await self._repairs.refresh_scopes()
        return news

    async def fresh(self) -> None:
        """In a fleet, act on the latest state (under the lock): another proxy may have changed it since the last
        broadcast. So does any proxy after a save whose outcome it does not know (it may have landed)."""
        if self._keeper.fleet or self._keeper.uncertain:
            await self.adopt_locked(await self._keeper.control.load())
            self._keeper.uncertain = False

    async def reread(self) -> None:
        """Read the stored state again after an uncertain save (takes the lock)."""
        async with self._keeper.lock:
            await self.fresh()
        await self._repairs.refresh_scopes()

    async def adopt_locked(self, state: MigrationState) -> bool:
        before = self._keeper.state
        if state.revision <= before.revision:
            return False
        for spec in state.named_stores():
            await self._stores.get(spec)
        self._keeper.adopt(state)
        if state.migration_id != before.migration_id:
            self._repairs.forget_scopes()
        if not phases.backfilling(state):
            self._backfill.stop()
        return True
