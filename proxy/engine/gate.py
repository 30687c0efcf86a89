"""Who is writing where: the one coordination the dual writer, the repair queue and the backfill share.

A repair reads the primary, then the secondary, then copies. A dual write whose secondary half lands before that read
and whose primary half lands after the first would have the primary's older record copied over the newer one, and
nothing would queue the key again. So dual writes share their scopes and a repair holds its scopes alone: it waits
for the writes in flight there, and new ones wait for it (a few milliseconds). Writes to one store alone are counted
too: the backfill starts only once those that began before dual-writing have finished.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager


class ScopeGate:
    def __init__(self) -> None:
        self._gate = asyncio.Condition()
        self._writing: Counter[str] = Counter()
        self._repairing: Counter[str] = Counter()  # both hold only scopes in use: empty means none
        self._solo = 0
        self.solo_idle = asyncio.Event()  # no write to one store alone is in flight
        self.writes_held = 0  # dual writes that waited for a repair in their scopes
        self.solo_idle.set()

    async def solo_done(self) -> None:
        """Wait until no write to one store alone is in flight."""
        await self.solo_idle.wait()

    @contextmanager
    def solo(self) -> Iterator[None]:
        """A write to its scope's store alone."""
        self._solo += 1
        self.solo_idle.clear()
        try:
            yield
        finally:
            self._solo -= 1
            if self._solo == 0:
                self.solo_idle.set()

    @asynccontextmanager
    async def writing(self, scopes: set[str]) -> AsyncIterator[None]:
        """A dual write in `scopes`: waits for repairs there, and holds them off until it is done."""
        # With no repair running anywhere, nobody waits on the gate and nobody needs waking: the write goes through
        # without its lock (the check and the count happen with no await between them, so no repair can slip in).
        if self._repairing:
            async with self._gate:
                if any(self._repairing[s] for s in scopes):
                    self.writes_held += 1
                    await self._gate.wait_for(lambda: not any(self._repairing[s] for s in scopes))
                self._writing.update(scopes)
        else:
            self._writing.update(scopes)
        try:
            yield
        finally:
            _release(self._writing, scopes)
            if self._repairing:
                async with self._gate:
                    self._gate.notify_all()

    @asynccontextmanager
    async def repairing(self, scopes: set[str], wait: float) -> AsyncIterator[None]:
        """A repair in `scopes`: waits (at most `wait` seconds, TimeoutError) for the writes in flight there, and
        holds new ones off until it is done."""
        registered = False  # undo only what was done: counting out scopes never counted in would free others'
        try:
            async with self._gate:
                self._repairing.update(scopes)
                registered = True
                # Bounded: a primary that hangs holds its caller anyway; the repair comes back to these keys later.
                await asyncio.wait_for(self._gate.wait_for(lambda: not self.busy(scopes)), wait)
            yield
        finally:
            if registered:
                async with self._gate:
                    _release(self._repairing, scopes)
                    self._gate.notify_all()

    def busy(self, scopes: set[str]) -> bool:
        """A dual write is in flight in one of `scopes`."""
        return any(self._writing[s] for s in scopes)


def _release(held: Counter[str], scopes: set[str]) -> None:
    """Count `scopes` out of `held`, dropping those no longer held: an empty counter then means nothing is held, and
    it does not keep an entry for every scope ever written."""
    for scope in scopes:
        if held[scope] > 1:
            held[scope] -= 1
        else:
            held.pop(scope, None)
