"""Every store kind the conformance suite runs against. A new store adds one entry here."""

from __future__ import annotations

from pathlib import Path

from adapters.base import Backend
from adapters.embedded import EmbeddedBackend
from adapters.embedder import Embedder

STORE_KINDS = ["embedded"]


def make_store(kind: str, embedder: Embedder, workdir: Path) -> Backend:
    if kind == "embedded":
        return EmbeddedBackend(workdir / "memory.db", embedder)
    raise ValueError(f"unknown store kind {kind}")
