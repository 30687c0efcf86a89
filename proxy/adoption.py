"""One proxy of a fleet applying the state the others save (driven by proxy.fleet.FleetSync).

A broadcast or the periodic re-read hands over the latest state: the proxy opens any store it names, follows its
pause, drops what belonged to an earlier migration and stops a backfill that is no longer wanted. Writes are refused
once this proxy's lease lapses, and the backfill runs only where the fleet elected it.
"""

from __future__ import annotations

from proxy.backfill import Backfill
from proxy.control import MigrationState, Phase
from proxy.dual_write import DualWrites


class FleetMember(DualWrites, Backfill):
    """This proxy's side of a fleet: the state another proxy saved, the lease, the backfill election."""

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
        for spec in state.named_stores():
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
