"""Telling a record the new store refuses for good from a failure that passes by itself.

A migration must not retry forever a record the new store will never take (too large for it, a value it rejects),
nor give up on one because the store was briefly unreachable. `transient` says which failures pass by themselves;
`refused_twice` tries a unit of work twice before it counts as refused; `find_refusal` finds, by halving, the one
record of a refused batch that the store refuses on its own (apply-if-newer makes applying any part again harmless).
The engine pauses on such a record (the backfill) or keeps it in the repair queue (a dual write), naming its key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from adapters.base import Backend, VectorMap
from adapters.errors import Conflict, StoreUnavailable
from adapters.records import Record, RecordKey

T = TypeVar("T")


def transient(exc: BaseException) -> bool:
    """A failure that can pass by itself (the store unreachable, a timeout, a lost compare-and-set): retried. Any
    other failure of a store, repeated on one record alone, means the store refuses that record for good."""
    return isinstance(exc, StoreUnavailable | TimeoutError | ConnectionError | OSError | Conflict)


async def refused_twice(attempt: Callable[[], Awaitable[T]]) -> tuple[T | None, BaseException | None]:
    """Run `attempt`, once more if it fails: (its result, None) when either try went through, else (None, the store's
    refusal). An outage (`transient`) is raised at once: it is not the store refusing the record."""
    refused: BaseException | None = None
    for _ in range(2):
        try:
            return await attempt(), None
        except Exception as exc:
            if transient(exc):
                raise
            refused = exc
    return None, refused


async def find_refusal(store: Backend, records: Sequence[Record],
                       vectors: VectorMap | None) -> tuple[RecordKey, BaseException] | None:
    """The first record `store` refuses on its own, found by halving a batch it refused; None when every part went
    in. A single record is tried twice before it counts as refused. An outage on the way is raised, not mistaken for
    a refusal."""
    if len(records) == 1:
        _, refused = await refused_twice(lambda: store.apply(records, vectors))
        return None if refused is None else (records[0].key, refused)
    mid = len(records) // 2
    for half in (records[:mid], records[mid:]):
        try:
            await store.apply(half, vectors)
        except Exception as exc:
            if transient(exc):
                raise
            found = await find_refusal(store, half, vectors)
            if found is not None:
                return found
    return None
