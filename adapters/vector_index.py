"""An in-memory exact cosine index per scope, for stores without a vector index of their own (SQLite).

Rows are L2-normalised, so cosine similarity is one matrix-vector product. Deleted rows are swapped with the last
row, so the matrix stays dense and a search never skips holes. Not thread-safe: its owner serialises access.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from adapters.embedder import Vector


@dataclass
class _ScopeIndex:
    dim: int
    names: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    matrix: Vector = field(init=False)

    def __post_init__(self) -> None:
        self.matrix = np.zeros((16, self.dim), dtype=np.float32)


class VectorIndex:
    def __init__(self, dim: int) -> None:
        self._dim = dim
        self._scopes: dict[str, _ScopeIndex] = {}

    def upsert(self, scope: str, name: str, entity_type: str, vector: Vector) -> None:
        idx = self._scopes.get(scope)
        if idx is None:
            idx = self._scopes[scope] = _ScopeIndex(self._dim)
        row = idx.rows.get(name)
        if row is None:
            row = len(idx.names)
            if row == idx.matrix.shape[0]:
                grown = np.zeros((row * 2, self._dim), dtype=np.float32)
                grown[:row] = idx.matrix
                idx.matrix = grown
            idx.names.append(name)
            idx.types.append(entity_type)
            idx.rows[name] = row
        else:
            idx.types[row] = entity_type
        idx.matrix[row] = vector

    def remove(self, scope: str, name: str) -> None:
        idx = self._scopes.get(scope)
        if idx is None or name not in idx.rows:
            return
        row = idx.rows.pop(name)
        last = len(idx.names) - 1
        if row != last:
            moved = idx.names[last]
            idx.names[row] = moved
            idx.types[row] = idx.types[last]
            idx.matrix[row] = idx.matrix[last]
            idx.rows[moved] = row
        idx.names.pop()
        idx.types.pop()

    def search(
        self, scope: str, query: Vector, limit: int, min_score: float | None, entity_types: Sequence[str]
    ) -> list[tuple[str, float]]:
        idx = self._scopes.get(scope)
        if idx is None or not idx.names:
            return []
        n = len(idx.names)
        scores = idx.matrix[:n] @ query.astype(np.float32)
        if entity_types:
            wanted = set(entity_types)
            mask = np.fromiter((t in wanted for t in idx.types), dtype=bool, count=n)
            scores = np.where(mask, scores, -np.inf)
        k = min(limit, n)
        top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
        # Ties broken by name, so every store ranks near-equal scores the same way.
        ranked = sorted(top.tolist(), key=lambda i: (-float(scores[i]), idx.names[i]))
        out: list[tuple[str, float]] = []
        for i in ranked:
            score = float(scores[i])
            if score == -np.inf or (min_score is not None and score < min_score):
                continue
            out.append((idx.names[i], score))
        return out

    def __len__(self) -> int:
        return sum(len(i.names) for i in self._scopes.values())
