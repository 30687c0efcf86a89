"""Stores filled with generated vectors: unit length, the model's dimension, recorded under the model's name.

A copy that keeps vectors never recomputes them, so their values change no figure a benchmark reports, and filling
a store through the model would take hours at the sizes measured. `load` writes through the store's own `apply`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from adapters.base import Backend
from adapters.embedder import DEFAULT_MODEL, EmbeddingInfo
from adapters.model import Entity, Relation
from adapters.records import EntityRecord, ObservationRecord, Record, RelationRecord, embedding_text, text_hash

DIM = 384
PAGE = 2000  # entities applied at a time


class GeneratedVectorsOnly:
    """The model's name and dimension for stores that are only ever handed vectors: a call here says the data was
    not built the way this module builds it."""

    info = EmbeddingInfo(DEFAULT_MODEL, DIM)

    async def embed(self, texts: object, urgent: bool = False) -> npt.NDArray[np.float32]:
        raise RuntimeError("this store is filled with generated vectors only")


def unit_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> npt.NDArray[np.float32]:
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


async def load(store: Backend, scope: str, entities: Sequence[Entity], relations: Iterable[Relation] = (),
               seed: int = 7) -> None:
    """`entities` (entity i at version 1 + i, its observations created in order) and `relations`, each entity's
    vector generated for exactly its text, applied a page at a time."""
    rng = np.random.default_rng(seed)
    dim = store.embedding.dimension
    rels = list(relations)
    for start in range(0, len(entities), PAGE):
        page = entities[start:start + PAGE]
        recs: list[Record] = []
        vectors: dict[tuple[str, str], tuple[str, npt.NDArray[np.float32]]] = {}
        for i, (e, vec) in enumerate(zip(page, unit_vectors(rng, len(page), dim), strict=True), start=1 + start):
            recs.append(EntityRecord(scope, e.name, e.entity_type, i, i))
            recs += [ObservationRecord(scope, e.name, o, i, i + k) for k, o in enumerate(e.observations)]
            vectors[(scope, e.name)] = (text_hash(embedding_text(e.name, e.entity_type, e.observations)), vec)
        recs += [RelationRecord(scope, r.source, r.relation_type, r.target, start + 1 + k)
                 for k, r in enumerate(rels[start:start + PAGE])]
        await store.apply(recs, vectors)
