"""Verify: a full, streaming diff of two stores — counts and per-record digests, per scope, with samples.

Both stores list their live records in the same key order, so one merge-walk compares them in constant memory.
Progress is yielded after every batch with the cursor reached, which is what makes a verify resumable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from adapters.base import Backend
from adapters.records import Record, RecordKey, record_digest


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

    def _scope(self, scope: str) -> list[int]:
        return self.per_scope.setdefault(scope, [0, 0, 0])


async def _walk(store: Backend, after: RecordKey | None, batch: int) -> AsyncIterator[Record]:
    while True:
        page = await store.list_records(after, batch)
        for rec in page.records:
            yield rec
        if page.next_after is None:
            return
        after = page.next_after


async def verify(primary: Backend, secondary: Backend, *, start_after: RecordKey | None = None,
                 batch: int = 1000, max_samples: int = 20,
                 differing: list[RecordKey] | None = None) -> AsyncIterator[VerifyReport]:
    """Yields the running report every `batch` comparisons and once at the end (`done=True`). Keys that differ are
    appended to `differing` when given (for queueing repairs)."""
    report = VerifyReport(cursor=start_after)
    a_iter, b_iter = _walk(primary, start_after, batch), _walk(secondary, start_after, batch)
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
            diff = Difference(key, a, b) if record_digest(a) != record_digest(b) else None
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
            if len(report.samples) < max_samples:
                report.samples.append(diff)
            if differing is not None:
                differing.append(key)
        if report.compared % batch == 0:
            yield report
    report.done = True
    report.cursor = None
    yield report
