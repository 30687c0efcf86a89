"""An in-memory exact cosine index per scope, for stores without a vector index of their own (SQLite).

Rows are L2-normalised, so cosine similarity is one matrix-vector product per block. Rows live in fixed-size blocks
rather than one matrix that doubles: growing never copies the index, so memory follows the row count (a doubling
matrix briefly holds the old and the new copy — about 1.3 x the final index at 200k rows). Deleted rows are swapped
with the last row, so blocks stay dense and a search never skips holes. Not thread-safe: its owner serialises access.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from adapters.embedder import Vector

BLOCK_ROWS = 4096


@dataclass
class _ScopeIndex:
    dim: int
    names: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    blocks: list[Vector] = field(default_factory=list)

    def slot(self, row: int) -> tuple[Vector, int]:
        block, offset = divmod(row, BLOCK_ROWS)
        if block == len(self.blocks):
            # A scope's first block starts small: most scopes (one agent's memory) hold a few hundred entities.
            size = BLOCK_ROWS if block else min(64, BLOCK_ROWS)
            self.blocks.append(np.zeros((size, self.dim), dtype=np.float32))
        elif block == 0 and offset >= self.blocks[0].shape[0]:
            grown = np.zeros((min(BLOCK_ROWS, self.blocks[0].shape[0] * 4), self.dim), dtype=np.float32)
            grown[: self.blocks[0].shape[0]] = self.blocks[0]
            self.blocks[0] = grown
        return self.blocks[block], offset

    def scores(self, query: Vector) -> Vector:
        n = len(self.names)
        parts = [b @ query for b in self.blocks]
        return (np.concatenate(parts) if len(parts) > 1 else parts[0])[:n]


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
            idx.names.append(name)
            idx.types.append(entity_type)
            idx.rows[name] = row
        else:
            idx.types[row] = entity_type
        block, offset = idx.slot(row)
        block[offset] = vector

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
            dst, d = idx.slot(row)
            src, o = idx.slot(last)
            dst[d] = src[o]
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
        scores = idx.scores(query.astype(np.float32))
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

    def scope_size(self, scope: str) -> int:
        idx = self._scopes.get(scope)
        return len(idx.names) if idx else 0

    def __len__(self) -> int:
        return sum(len(i.names) for i in self._scopes.values())
