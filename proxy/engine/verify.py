"""Verify: a full, streaming diff of two stores — counts and per-record digests, per scope, with samples.

Both stores list their live records in the same key order, so one merge-walk compares them in constant memory.
Progress is yielded after every batch with the cursor reached, which is what makes a verify resumable.

Under live writes a key can differ only because a write was touching it while the walk passed (its two halves not
both landed, or its repair still queued). Such keys are suspects, not findings: at the end of the pass the walk waits
for writes and repairs in their scopes to settle (`settle`, from the engine), reads each suspect again from both
stores, and reports the ones that now agree as `in_flight`. Only the differences that persist count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from adapters.base import Backend
from adapters.records import Record, RecordKey, parents_of, same_content
from proxy.engine.placement import Moved
from proxy.runtime.eager import consume


@dataclass(frozen=True, slots=True)
class Difference:
    key: RecordKey
    primary: Record | None
    secondary: Record | None


@dataclass
class VerifyReport:
    compared: int = 0
    differences: int = 0
    primary_records: int = 0
    secondary_records: int = 0
    per_scope: dict[str, list[int]] = field(default_factory=dict)  # scope -> [primary, secondary, differences]
    samples: list[Difference] = field(default_factory=list)
    cursor: RecordKey | None = None
    done: bool = False
    in_flight: int = 0  # differed during the pass, agreed once the writes touching them settled
    repaired: int = 0  # persistent differences that a repair then fixed (Verify --repair)

    def _scope(self, scope: str) -> list[int]:
        return self.per_scope.setdefault(scope, [0, 0, 0])


async def _walk(store: Backend, after: RecordKey | None, batch: int,
                only: Moved | None = None) -> AsyncIterator[Record]:
    """The store's live records in key order, of the scopes `only` holds; a run of scopes outside it is jumped over, not
    read, as the backfill does (`Moved.resume`; None from it: nothing selected follows). The next page is read while
    this one is compared (and each store's walk reads on its own), so the comparison waits for neither store: Verify ran
    at the sum of two stores' page times plus its own, one after the other."""
    start = only.resume(after) if only is not None else after
    if after is not None and start is None:
        return
    reading = asyncio.ensure_future(store.list_records(start, batch))
    try:
        while True:
            page = await reading
            following = page.next_after
            if following is not None and only is not None:
                following = only.resume(following)
            if following is not None:
                reading = asyncio.ensure_future(store.list_records(following, batch))
            for rec in page.records:
                if only is None or only(rec.scope):
                    yield rec
            if following is None:
                return
    finally:
        if not reading.done():
            reading.cancel()
            reading.add_done_callback(consume)


Settle = Callable[[Sequence[RecordKey]], Awaitable[None]]
MAX_SUSPECTS = 100_000  # differences kept for the re-check; beyond, they count as found (bounded memory)


def _live(key: RecordKey, records: dict[RecordKey, Record]) -> Record | None:
    """The record as `list_records` shows it: live, and a child only under live entities."""
    rec = records.get(key)
    if rec is None or rec.deleted:
        return None
    for parent in parents_of(key):
        owner = records.get(parent)
        if owner is None or owner.deleted:
            return None
    return rec


def _agree(a: Record | None, b: Record | None) -> bool:
    """The same live record on both sides, or live on neither."""
    if a is None or b is None:
        return a is b
    return same_content(a, b)


async def still_differing(keys: Sequence[RecordKey], primary: Backend, secondary: Backend,
                          chunk: int = 500) -> list[Difference]:
    """The keys that differ between the stores now, read again from both, each seen as the walk sees it."""
    out: list[Difference] = []
    for i in range(0, len(keys), chunk):
        part = keys[i:i + chunk]
        wanted = list(dict.fromkeys([*part, *(p for k in part for p in parents_of(k))]))
        mine = {r.key: r for r in await primary.get_records(wanted)}
        theirs = {r.key: r for r in await secondary.get_records(wanted)}
        for k in part:
            a, b = _live(k, mine), _live(k, theirs)
            if not _agree(a, b):
                out.append(Difference(k, a, b))
    return out


# Records compared between two looks at the agents' latency (and a rest, when it says so): 1,000 held agents' writes at
# 3.6 to 4.4 times their p99 while Verify ran; 200 with rests, at 1.4 times (docs/benchmarks.md, 2026-12-08).
VERIFY_BATCH = 200


async def verify(primary: Backend, secondary: Backend, *, start_after: RecordKey | None = None,
                 batch: int = VERIFY_BATCH, max_samples: int = 20, settle: Settle | None = None,
                 repair: Callable[[list[RecordKey]], Awaitable[None]] | None = None,
                 only: Moved | None = None,
                 rest: Callable[[float], float] = lambda _: 0.0) -> AsyncIterator[VerifyReport]:
    """Compares the records of the scopes `only` holds (every scope without it): a migration of a selection verifies the
    scopes it moves, and what else either store holds is not its business, nor read (see `_walk`). Yields the running
    report every `batch` comparisons (differences so far are suspects) and once at the end (`done=True`), where
    `differences` counts only what persisted after `settle`. With `repair`, the persistent keys are handed to it (queued
    for repair), settled again and re-checked: `repaired` says how many it fixed. After each batch it rests for
    `rest(seconds the batch took)` seconds."""
    report = VerifyReport(cursor=start_after)
    batch_began = time.monotonic()
    suspects: list[Difference] = []
    a_iter, b_iter = _walk(primary, start_after, batch, only), _walk(secondary, start_after, batch, only)
    a = await anext(a_iter, None)
    b = await anext(b_iter, None)
    while a is not None or b is not None:
        diff: Difference | None
        if a is not None and (b is None or a.key < b.key):
            key, diff = a.key, Difference(a.key, a, None)
            a = await anext(a_iter, None)
        elif b is not None and (a is None or b.key < a.key):
            key, diff = b.key, Difference(b.key, None, b)
            b = await anext(b_iter, None)
        else:
            assert a is not None and b is not None
            key = a.key
            diff = None if same_content(a, b) else Difference(key, a, b)
            a, b = await anext(a_iter, None), await anext(b_iter, None)
        scope = report._scope(key[1])
        if diff is None or diff.primary is not None:
            report.primary_records += 1
            scope[0] += 1
        if diff is None or diff.secondary is not None:
            report.secondary_records += 1
            scope[1] += 1
        report.compared += 1
        report.cursor = key
        if diff is not None:
            report.differences += 1
            scope[2] += 1
            if len(suspects) < MAX_SUSPECTS:
                suspects.append(diff)
            if len(report.samples) < max_samples:
                report.samples.append(diff)
        if report.compared % batch == 0:
            yield report
            if (pause := rest(time.monotonic() - batch_began)) > 0:  # agents' latency says so (proxy.engine.strain)
                await asyncio.sleep(pause)
            batch_began = time.monotonic()
    if settle is not None and suspects:
        await _confirm(report, suspects, primary, secondary, settle, repair, max_samples)
    report.done = True
    report.cursor = None
    yield report


async def _confirm(report: VerifyReport, suspects: list[Difference], primary: Backend, secondary: Backend,
                   settle: Settle, repair: Callable[[list[RecordKey]], Awaitable[None]] | None,
                   max_samples: int) -> None:
    keys = [d.key for d in suspects]
    await settle(keys)
    persistent = await still_differing(keys, primary, secondary)
    report.in_flight = len(suspects) - len(persistent)
    if repair is not None and persistent:
        await repair([d.key for d in persistent])
        await settle([d.key for d in persistent])
        left = await still_differing([d.key for d in persistent], primary, secondary)
        report.repaired = len(persistent) - len(left)
        persistent = left
    unconfirmed = report.differences - len(suspects)  # beyond MAX_SUSPECTS: counted as found
    report.differences = len(persistent) + unconfirmed
    for counts in report.per_scope.values():
        counts[2] = 0
    for d in persistent:
        report._scope(d.key[1])[2] += 1
    report.samples = persistent[:max_samples]
