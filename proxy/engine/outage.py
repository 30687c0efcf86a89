"""Stores that cannot be reached, without taking agents down (docs/migration.md, "When a store is unreachable").

- `Unreachable` stands in for a store that could not be opened at start: every call raises StoreUnavailable, so the
  paths that already handle a failing store (dual write, repair queue, read fallback) handle it too, while the
  engine keeps trying to open the real one in the background.
- `OutageWatch` tells an outage of the new store (unreachable: connection refused, timeouts) from a store that
  answers wrongly. An outage is not a failure of the migration: while it lasts, writes skip the new store and queue
  their keys for repair, reads and shadow reads stay on the primary, the backfill and the read ramp hold, and the
  rollback policy does not count it. A probe asks the store again every second; when it answers, the migration goes
  on by itself. Both ends are recorded in the phase history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from adapters.errors import StoreUnavailable

log = logging.getLogger("memshift.outage")


class Unreachable:
    """A store that could not be opened (yet). Every call raises StoreUnavailable naming it and the cause."""

    def __init__(self, label: str, cause: str) -> None:
        self._label = label
        self.cause = cause

    @property
    def name(self) -> str:
        return self._label

    @property
    def embedding(self) -> Any:
        raise StoreUnavailable(f"{self._label} is unreachable ({self.cause}); reconnecting")

    def __getattr__(self, attr: str) -> Callable[..., Awaitable[Any]]:
        async def unreachable(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable(f"{self._label} is unreachable ({self.cause}); reconnecting")

        return unreachable

    async def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Outage:
    since: float  # wall-clock seconds
    reason: str


class OutageWatch:
    """Whether the secondary is reachable. `report` starts an outage (idempotent); a probe every `interval` seconds
    ends it. `on_change(started, ended)` runs at each end of an outage, in order."""

    def __init__(self, probe: Callable[[], Awaitable[object]],
                 on_change: Callable[[Outage | None, Outage | None], Awaitable[None]], interval: float = 1.0) -> None:
        self._probe = probe
        self._on_change = on_change
        self._interval = interval
        self.current: Outage | None = None
        self.recovered = asyncio.Event()
        self.recovered.set()
        self._task: asyncio.Task[None] | None = None

    def report(self, exc: BaseException) -> None:
        if self.current is not None:
            return
        self.current = Outage(time.time(), f"{type(exc).__name__}: {exc}"[:300])
        self.recovered.clear()
        self._task = asyncio.ensure_future(self._watch(self.current))

    async def _watch(self, outage: Outage) -> None:
        try:
            await self._on_change(outage, None)
        except Exception:
            log.exception("recording the outage failed")
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._probe()
            except Exception as exc:  # still out (or the probe itself failed): ask again
                log.debug("new store still unreachable", extra={"error": repr(exc)})
                continue
            break
        self.current = None
        self.recovered.set()
        try:
            await self._on_change(None, outage)
        except Exception:
            log.exception("recording the recovery failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def reset(self) -> None:
        """No secondary any more (rollback, a new migration): whatever was out is no longer watched."""
        if self._task is not None:
            self._task.cancel()
        self.current = None
        self.recovered.set()
