"""The pause a refused record causes: a record the new store refuses for good pauses the migration instead of being
retried forever. The backfill stops at its checkpoint (it follows `paused`) and the read ramp stops; status, history
and log name the key and the store's reason. The backfill goes on when an operator resumes it (after fixing or
deleting the record through the API); a refused repair clears by itself once that key is repaired."""

from __future__ import annotations

import logging
from dataclasses import replace

from adapters.records import RecordKey, key_text
from adapters.specs import scrub
from proxy.engine import phases
from proxy.engine.keeper import StateKeeper

log = logging.getLogger("memshift.migration")


async def block(keeper: StateKeeper, key: RecordKey, exc: BaseException, during: str) -> None:
    shown = key_text(key)
    reason = f"the new store refuses {shown} ({during}): {type(exc).__name__}: {scrub(str(exc))[:300]}"
    async with keeper.lock:
        s = keeper.state
        if s.blocked == reason:
            return
        if s.blocked:  # the status keeps naming the first refused key; the history lists each of them
            await keeper.note_locked("memshift", f"also refused: {reason}", {"key": shown, "during": during})
        else:
            await keeper.save(replace(s, paused=s.paused or phases.backfilling(s), blocked_key=shown,
                                      blocked=reason, ramp_step=-1,
                                      ramp_note=f"stopped: {reason}" if s.ramp_step >= 0 else s.ramp_note))
            await keeper.note_locked("memshift", f"paused: {reason}", {"key": shown, "during": during})
    log.error("migration paused: the new store refuses a record", extra={"key": shown, "reason": reason})


async def unblock(keeper: StateKeeper, settled: set[str], actor: str) -> None:
    """The refused key is on the new store now (repaired): the pause it caused is lifted."""
    async with keeper.lock:
        s = keeper.state
        if s.blocked_key and s.blocked_key in settled:
            await keeper.save(replace(s, blocked_key="", blocked=""))
            await keeper.note_locked(actor, f"unblocked: {s.blocked_key} is on the new store now", {})
