"""One proxy's part in a fleet sharing a PostgreSQL control store (docs/design.md, Fleet).

Every heartbeat (a third of the lease, or at once when a phase change is broadcast) the proxy re-reads the state,
applies it and acknowledges it: its row in `proxies` names the phase, migration and revision it applies. A phase
that dual-writes is acknowledged only once the writes that began before it (to the old store alone) have finished.
Writes are accepted only within a lease of the last successful round, so a proxy cut off from the control store
stops taking writes before the rest of the fleet stops waiting for it.

The backfill leader: proxies that see an unfinished DataMigration race for an advisory lock; the holder starts the
backfill only once every live proxy has acknowledged this migration's DataMigration (before that, a write could
still go to the old store alone and the copy could miss it). When the leader dies its lock goes with its
connection, and the next heartbeat elsewhere takes it and continues from the checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from proxy.engine import phases
from proxy.engine.control import ControlStore, Fleet, Member, MigrationState
from proxy.engine.migration import MigrationEngine

log = logging.getLogger("memshift.fleet")


class SharedControl(ControlStore, Fleet, Protocol):
    """A control store a fleet shares (proxy.engine.control_pg.PostgresControlStore)."""


class FleetSync:
    def __init__(self, engine: MigrationEngine, control: SharedControl, node: str, address: str) -> None:
        self._engine = engine
        self._control = control
        self.node = node
        self._address = address
        self._interval = control.lease_seconds / 3
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.waiting_for: list[str] = []  # live proxies the backfill leader waits for
        self._acked: MigrationState | None = None  # the state this proxy acknowledges in its heartbeats
        self._acked_clock = 0  # this proxy's clock when it acknowledged: every write it stamped before is below
        self._ack_wait: asyncio.Future[None] | None = None  # wakes a round when the older writes have finished

    async def start(self) -> None:
        """One round before serving (writes are refused until it succeeds), then rounds in the background."""
        await self.sync()
        self._task = asyncio.create_task(self._loop(), name="fleet")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._engine.backfill.elect(False)
        with contextlib.suppress(Exception):
            await self._control.resign()
            await self._control.forget(self.node)

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the lease runs out on its own; the next round retries
                log.warning("fleet sync failed", extra={"error": repr(exc)})

    async def sync(self) -> None:
        started = time.monotonic()
        await self._control.listen(self._wake.set)
        await self._engine.adoption.adopt(await self._control.load())
        s = self._engine.state
        if self._acked is None or s.revision != self._acked.revision:
            # Acknowledge a dual-writing phase only once the writes that began before it have finished; the lease
            # is renewed meanwhile (those writes may wait on the embedder for a while).
            if self._engine.stores.secondary is None or self._engine.gate.solo_idle.is_set():
                self._acked, self._acked_clock = s, self._engine.clock.now()
            elif self._ack_wait is None or self._ack_wait.done():
                self._ack_wait = asyncio.ensure_future(self._engine.gate.solo_done())
                self._ack_wait.add_done_callback(lambda _: self._wake.set())
        acked = self._acked or s
        wants_backfill = phases.backfilling(s)
        if wants_backfill:
            leader = await self._control.try_lead()
        else:
            leader = False
            await self._control.resign()  # nothing to lead: hold no lock and no connection for it
        await self._control.heartbeat(self.node, self._address, acked, leader, self._acked_clock)
        self._engine.writer.lease_renewed(started + self._control.lease_seconds)
        if not leader:
            self.waiting_for = []
            self._engine.backfill.elect(False)
            return
        members = await self._control.members()
        self.waiting_for = [m.node for m in members
                            if m.live and (m.migration_id != s.migration_id or m.phase != s.phase)]
        if not self.waiting_for:
            # Every live proxy has acknowledged, each with its clock then: the backfill's watermark, taken from this
            # clock, is then above every write any of them made to the old store alone, whatever their skew.
            for m in members:
                if m.live and m.migration_id == s.migration_id:
                    self._engine.clock.observe(m.clock)
        if self.waiting_for and not self._engine.backfill.running:
            log.info("backfill waits for proxies to acknowledge DataMigration", extra={"waiting": self.waiting_for})
        self._engine.backfill.elect(not self.waiting_for or self._engine.backfill.running)

    async def members(self) -> list[Member]:
        return await self._control.members()
