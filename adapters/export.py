"""`Backend.export_page` from a store's own `list_records` and `get_vectors`, and which vectors a page carries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from adapters.base import Backend, ExportPage
from adapters.records import EntityRecord, ObservationRecord, Record, RecordKey


def vector_keys(records: Sequence[Record]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The (scope, entity) keys whose vectors a copied page carries, in record order: (live entities, whose vector
    counts only if they have no live observations; owners of live observations). Entities come before their
    observations in record order, so an entity record copied alone can only match the vector of a childless
    entity; the others get theirs with their observations' page."""
    ents = [(r.scope, r.name) for r in records if isinstance(r, EntityRecord) and not r.deleted]
    owners = list(dict.fromkeys((r.scope, r.entity) for r in records
                                if isinstance(r, ObservationRecord) and not r.deleted))
    return ents, owners


class ExportInParts:
    """`export_page` as the list and vector calls it is made of: one round trip each. Stores whose round trips
    cost little next to their writes (every networked one here) use it as it is."""

    async def export_page(self: Backend, after: RecordKey | None, limit: int, vectors: bool,
                          until: int = 0) -> ExportPage:
        page = await self.list_records(after, limit, tombstones=True, until=until)
        if not vectors:
            return ExportPage(page.records, page.next_after, None)
        ents, owners = vector_keys(page.records)
        found = {**(await self.get_vectors(ents, childless_only=True) if ents else {}),
                 **(await self.get_vectors(owners) if owners else {})}
        return ExportPage(page.records, page.next_after, found)


async def scope_counts(store: Backend, page: int = 5000) -> dict[str, int]:
    """Live records per scope. A store that can count by scope in its own query says so with a `scope_counts`
    method; any other is walked page by page (memory: one page and one counter per scope)."""
    own = getattr(store, "scope_counts", None)
    if callable(own):
        counted: dict[str, int] = await own()
        return counted
    counts: dict[str, int] = {}
    after: RecordKey | None = None
    while True:
        listed = await store.list_records(after, page)
        for r in listed.records:
            counts[r.scope] = counts.get(r.scope, 0) + 1
        if listed.next_after is None:
            return counts
        after = listed.next_after


async def export_pages(store: Backend, size: int, vectors: bool,
                       after: RecordKey | None = None) -> AsyncIterator[ExportPage]:
    """Every page of `store` from after `after` on, as a backfill reads them."""
    while True:
        page = await store.export_page(after, size, vectors)
        yield page
        if page.next_after is None:
            return
        after = page.next_after
