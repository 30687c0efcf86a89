"""The one owner of the migration state: the lock, the compare-and-set save, the history, and the steps.

Every part of the engine reads the state here and changes it only through this object: `save` for what stays in the
same phase (a checkpoint, a pause, a ramp step), `apply` for a step, which asks the phase table (proxy.engine.phases)
for the next state, so the table writes the phase and nothing else does. Another proxy's save arrives through
`adopt`. Parts that follow the state (the backfill's pause) `watch` it instead of being told by every caller."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from adapters.errors import Conflict, PhaseUnknown
from adapters.specs import scrub
from proxy.engine import phases
from proxy.engine.control import ControlStore, HistoryEntry, MigrationState, Phase
from proxy.engine.phases import Stage, Step

log = logging.getLogger("memshift.migration")

Watcher = Callable[[MigrationState], None]


class StateKeeper:
    """The migration state of this proxy, saved to the control store by compare-and-set."""

    def __init__(self, control: ControlStore, fleet: bool = False) -> None:
        self.control = control
        self.fleet = fleet  # a shared control store: act on the latest state (`fresh`)
        self.lock = asyncio.Lock()  # serialises state changes within this proxy; CAS guards across proxies
        self.state = MigrationState()
        self._watchers: list[Watcher] = []
        # A save whose outcome is unknown (it failed, or its answer was lost: it may have landed): the stored state
        # must be read again before this proxy acts on its own copy (`certain`).
        self.uncertain = False
        self._reread: Callable[[], Awaitable[None]] | None = None

    def reread_with(self, reread: Callable[[], Awaitable[None]]) -> None:
        """How the state is read again after an uncertain save (the engine's: it opens the stores it names)."""
        self._reread = reread

    async def certain(self) -> None:
        """Return once this proxy acts on the stored state: after an uncertain save, read it again first; raises
        PhaseUnknown while the control store cannot answer."""
        if not self.uncertain:
            return
        try:
            if self._reread is not None:
                await self._reread()
            else:
                self._take(await self.control.load())
                self.uncertain = False
        except Exception as exc:
            raise PhaseUnknown("this proxy cannot tell the migration's current phase: a change was sent to the "
                               f"control store, which then failed ({type(exc).__name__}); writes are refused until "
                               "it answers") from exc

    def watch(self, watcher: Watcher) -> None:
        """Call `watcher` with every state this proxy takes on (loaded, saved, adopted)."""
        self._watchers.append(watcher)
        watcher(self.state)

    def _take(self, state: MigrationState) -> None:
        self.state = state
        for watcher in self._watchers:
            watcher(state)

    async def load(self) -> MigrationState:
        self._take(await self.control.load())
        return self.state

    async def save(self, new: MigrationState, durable: bool = True) -> None:
        """Save `new` if nobody saved since this proxy read the state (Conflict otherwise, with the winner loaded).

        A save that has started finishes, and this proxy adopts what it wrote, even when the caller is cancelled
        meanwhile (a backfill cancelled during its checkpoint): the control store's worker thread completes the
        write anyway, and a state in memory one revision behind the store would fail the next change. The cancelled
        caller also waits for that write before it lets go of the lock: otherwise the next change would read the
        revision from before it and fail with a Conflict against this proxy's own write."""
        saving = asyncio.ensure_future(self.control.save(new, self.state.revision, durable))
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
                self._take(await self.control.load())
                if cancelled:
                    break
                raise
            except Exception:
                self.uncertain = True  # it may have landed all the same (an answer lost with a connection)
                if cancelled:  # the save failed: the caller's cancellation still stands, and is what it gets
                    raise asyncio.CancelledError from None
                raise
        if cancelled:
            raise asyncio.CancelledError

    def _saved(self, saving: asyncio.Future[MigrationState]) -> None:
        if not saving.cancelled() and saving.exception() is None and saving.result().revision > self.state.revision:
            self._take(saving.result())

    def adopt(self, state: MigrationState) -> bool:
        """Take on a state another proxy saved; False (and nothing changes) when it is not newer."""
        if state.revision <= self.state.revision:
            return False
        self._take(state)
        return True

    def check(self, step: Step) -> Stage:
        """Where `step` leads from the current state (proxy.engine.phases.TABLE), or IllegalTransition."""
        return phases.check(self.state.phase, self.state.secondary, step, self.shown())

    def shown(self) -> str:
        """The phase for an error message; after a rollback, with when, by whom and why it happened."""
        s = self.state
        return s.phase.value + (f" (rolled back {s.rolled_back})" if s.phase == Phase.ROLLED_BACK else "")

    def next(self, step: Step, **changes: Any) -> MigrationState:
        """The state `step` leads to, with `changes` (the table writes the phase)."""
        return phases.apply(self.state, step, self.shown(), **changes)

    async def apply(self, step: Step, actor: str, reason: str, figures: dict[str, Any], **changes: Any) -> None:
        """Take `step` (under the lock): save the state the table leads to and record it in the history."""
        await self.change(self.next(step, **changes), actor, reason, figures)

    async def change(self, to: MigrationState, actor: str, reason: str, figures: dict[str, Any]) -> None:
        """Save `to` (made by `next`) and record the change in the history, under the lock."""
        before = self.state.phase
        await self.save(to)
        entry = history_entry(before, to.phase, actor, reason, figures)
        await self.control.record(entry)
        log.info("phase change", extra={"from": before.value, "to": to.phase.value, "actor": entry.actor,
                                        "reason": entry.reason, **entry.figures})

    async def note(self, actor: str, reason: str, figures: dict[str, Any]) -> None:
        """Record an action that does not change the phase (an alert, a ramp step) in the phase history."""
        async with self.lock:
            await self.note_locked(actor, reason, figures)

    async def note_locked(self, actor: str, reason: str, figures: dict[str, Any]) -> None:
        phase = self.state.phase
        await self.control.record(history_entry(phase, phase, actor, reason, figures))

    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        return await self.control.history(limit)


def history_entry(before: Phase, after: Phase, actor: str, reason: str, figures: dict[str, Any]) -> HistoryEntry:
    """A history entry as it may be kept: every text in it scrubbed of credentials (a reason naming a store spec,
    typed by an operator or written by the engine), since the history outlives every log."""
    return HistoryEntry(time.time(), before, after, scrub(actor), scrub(reason),
                        {k: scrub(v) if isinstance(v, str) else v for k, v in figures.items()})
