"""The stores the migration state names, opened, and which of them serves a scope.

`OpenStores` opens each store once (in a fleet, refusing one several proxies cannot write at once), stands in for
one that cannot be reached at start (proxy.engine.outage.Unreachable) while it is opened again in the background, and
answers routing questions from the state: the store that serves a scope (by the placement), the decisive store of
the migration (`primary`), and the other store while it is written (`secondary`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from adapters.base import Backend, fleet_problem
from adapters.errors import FleetUnsafe
from adapters.specs import redact
from proxy.engine import phases
from proxy.engine.backends import system_of
from proxy.engine.keeper import StateKeeper
from proxy.engine.outage import Unreachable
from proxy.engine.refusals import transient
from proxy.runtime import heap

log = logging.getLogger("memshift.migration")

StoreOpener = Callable[[str], Awaitable[Backend]]


class OpenStores:
    """Every store this proxy has open, by spec, and the routing the state decides."""

    OPEN_TIMEOUT = 10.0  # seconds opening a store may take before it counts as unreachable
    START_TIMEOUT = 3.0  # the same at start, where the admin API and a healthy primary wait on it

    def __init__(self, keeper: StateKeeper, open_store: StoreOpener, fleet: bool = False) -> None:
        self._keeper = keeper
        self._open = open_store
        self._fleet = fleet
        self._stores: dict[str, Backend] = {}
        self._systems: dict[int, str] = {}  # id(store) -> db.system.name
        self._reconnects: dict[str, asyncio.Task[None]] = {}
        self._reachable: list[Callable[[], None]] = []
        # The default store is open: the proxy can serve (health SERVING). A store only some scopes are placed on
        # does not hold up the others: while it is out, calls in those scopes answer UNAVAILABLE.
        self.default_up = asyncio.Event()

    def when_reachable(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a store that could not be opened answers again."""
        self._reachable.append(callback)

    async def get(self, spec: str, tolerate: bool = False) -> Backend:
        """The open store of `spec`. With `tolerate` (at start), a store that cannot be reached now, or that takes
        longer than a few seconds to open, is stood in for by an Unreachable (every call fails as an outage) while
        the opening goes on in the background; the proxy does not wait on a host that does not answer."""
        store = self._stores.get(spec)
        if store is None:
            opening = asyncio.ensure_future(self._open_shareable(spec))
            if not tolerate:
                store = await asyncio.wait_for(opening, self.OPEN_TIMEOUT)
            else:
                await asyncio.wait({opening}, timeout=self.START_TIMEOUT)
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
            self._adopt(spec, store)
        elif spec == self._keeper.state.placement.default and not isinstance(store, Unreachable):
            self.default_up.set()
        return store

    async def _open_shareable(self, spec: str) -> Backend:
        """Open `spec`; in a fleet, refuse a store several proxies cannot write at once (FleetUnsafe)."""
        store = await self._open(spec)
        if self._fleet and (why := fleet_problem(store)) is not None:
            await store.close()
            raise FleetUnsafe(f"a fleet cannot share {redact(spec)}: {why}")
        return store

    def _adopt(self, spec: str, store: Backend) -> None:
        """`store` now serves `spec` (opened, or stood in for while it cannot be)."""
        self._stores[spec] = store
        self._systems[id(store)] = system_of(spec)
        if not isinstance(store, Unreachable):
            heap.freeze_new_modules()  # its client library's objects are as long-lived as the ones frozen at start
        if spec == self._keeper.state.placement.default and not isinstance(store, Unreachable):
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
                    store = await asyncio.wait_for(self._open_shareable(spec), self.OPEN_TIMEOUT)
            except Exception as exc:
                opening = None
                log.debug("store still unreachable", extra={"store": redact(spec), "error": repr(exc)})
                continue
            self._adopt(spec, store)
            self._reconnects.pop(spec, None)
            log.info("store reachable again", extra={"store": redact(spec)})
            for callback in self._reachable:
                callback()
            return

    @property
    def primary(self) -> Backend:
        """The store a migration moves scopes from (after cutover: to), which decides the answers for those scopes.
        Every other scope is served by its own store (`store_for`)."""
        return self._stores[self._keeper.state.primary]

    @property
    def secondary(self) -> Backend | None:
        """The store being written alongside the primary, or None."""
        s = self._keeper.state
        return self._stores.get(s.secondary) if phases.other_store_written(s) else None

    def opened(self, spec: str) -> Backend:
        """The open store of `spec` (every store the state names is opened at start and when adopted)."""
        return self._stores[spec]

    def store_for(self, scope: str) -> Backend:
        """The store that serves `scope` (proxy.engine.placement): the one its writes are answered by."""
        return self._stores[self._keeper.state.placement.store_of(scope)]

    def placed(self) -> list[Backend]:
        """Every open store the placement names."""
        return [self._stores[spec] for spec in self._keeper.state.placement.stores() if spec in self._stores]

    def system(self, store: Backend) -> str:
        return self._systems.get(id(store), "other")

    def reconnecting(self) -> list[asyncio.Task[None]]:
        return list(self._reconnects.values())

    async def close(self, within: float) -> None:
        """Close every store, each given at most `within` seconds (a store whose server is gone must not hold a
        SIGTERM past the grace period)."""
        for task in self._reconnects.values():
            task.cancel()
        for store in self._stores.values():
            try:
                await asyncio.wait_for(store.close(), within)
            except Exception as exc:
                log.warning("store did not close cleanly", extra={"store": store.name, "error": repr(exc)})
        self._stores.clear()
