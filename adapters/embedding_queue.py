"""Background embedding shared by the stores: writes are acknowledged once committed, vectors follow.

A write hands the texts of the entities it touched to `after_write`; they are embedded (in the embedder's micro-
batches) and stored by the store's own `store_vectors`, which keeps a vector only if the entity's text is still the
one it was computed from. A semantic search first waits for its scope's pending texts (`settled`), so an agent
always finds what it just wrote; beyond `max_pending` texts in flight, writers wait for their own (backpressure).
A vector handed in with the texts (a backfill copying vectors) is used when the hash of the text it was computed from
matches, instead of the model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

import numpy as np

from adapters.embedder import Embedder, Vector
from adapters.records import text_hash

log = logging.getLogger("memshift.store.embedding")
Key = tuple[str, str]  # (scope, entity name)
Ready = dict[Key, tuple[str, Vector]]


class PendingEmbeddings:
    def __init__(self, embedder: Embedder, store_vectors: Callable[[Ready], Awaitable[None]],
                 max_pending: int = 128) -> None:
        self._embedder = embedder
        self._store = store_vectors
        self._max_pending = max_pending
        self._pending: dict[asyncio.Task[None], frozenset[Key]] = {}  # task -> the entities it embeds

    async def after_write(self, texts: dict[Key, str],
                          vectors: Mapping[Key, tuple[str, Vector]] | None = None) -> None:
        if not texts:
            return
        task = asyncio.ensure_future(self.embed(texts, vectors))
        self._pending[task] = frozenset(texts)
        task.add_done_callback(self._done)
        if sum(len(keys) for keys in self._pending.values()) > self._max_pending:
            await asyncio.shield(task)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            # The committed rows keep a stale vector mark and are embedded again by the next embed_stale/start.
            log.error("embedding failed; vectors will be recomputed", exc_info=task.exception())

    async def settled(self, scope: str | None = None, keys: set[Key] | None = None) -> None:
        """Wait for pending embeddings: of one scope, of some entities, or all. A reader of some entities' vectors
        (a backfill's page) waits for those alone: waiting for every pending one would hold it behind every agent's
        writes, which under a steady stream of writes is always some."""
        waits = [t for t, pending in self._pending.items()
                 if (scope is None or any(s == scope for s, _ in pending))
                 and (keys is None or not pending.isdisjoint(keys))]
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)

    def pending(self, keys: set[Key]) -> bool:
        """Whether an embedding of one of these entities is still on its way."""
        return any(not pending.isdisjoint(keys) for pending in self._pending.values())

    async def embed(self, texts: dict[Key, str], vectors: Mapping[Key, tuple[str, Vector]] | None = None) -> None:
        """Embed and store now. With `vectors` (a backfill: text hash and vector per entity), only vectors of the
        entity's current text are stored: one that does not match yet has observations still to come, and the
        store's embed_stale settles it."""
        if not texts:
            return
        dim = self._embedder.info.dimension
        ready: Ready = {}
        missing: list[Key] = []
        for key, text in texts.items():
            given = vectors.get(key) if vectors is not None else None
            if given is not None and given[0] == text_hash(text) and len(given[1]) == dim:
                ready[key] = (text, np.asarray(given[1], dtype=np.float32))
            elif vectors is None:
                missing.append(key)
        if missing:
            computed = await self._embedder.embed([texts[k] for k in missing])
            for key, vec in zip(missing, computed, strict=True):
                ready[key] = (texts[key], vec)
        if ready:
            await self._store(ready)
