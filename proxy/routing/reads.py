"""One typed input per read call (as `ops` has for writes): each runs itself on a store, compares two answers with
its comparator from `policies`, and names itself for sampling, metrics and mismatch samples."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from adapters.base import Backend
from adapters.embedder import Vector
from adapters.model import Graph, GraphPage, SearchResult
from policies.comparators import CompareSettings, Comparison, compare_graph, compare_page, compare_search

T = TypeVar("T")


class ReadOp(Protocol[T]):
    @property
    def scope(self) -> str: ...

    @property
    def operation(self) -> str:
        """The RPC name, for metrics and mismatch samples."""
        ...

    def identity(self) -> str:
        """What the caller asked, as stable text: the same request is always sampled the same way."""
        ...

    async def run(self, store: Backend) -> T: ...

    def compare(self, primary: T, secondary: T, settings: CompareSettings) -> Comparison: ...


def answer_text(answer: Any, limit: int = 8192) -> str:
    """An answer as JSON for a mismatch sample, cut at `limit` characters."""
    text = json.dumps(asdict(answer), default=str, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(frozen=True, slots=True)
class ReadGraph:
    scope: str
    page_token: str | None
    page_size: int
    operation: str = "ReadGraph"

    def identity(self) -> str:
        return f"{self.page_token or ''}|{self.page_size}"

    async def run(self, store: Backend) -> GraphPage:
        return await store.read_graph(self.scope, self.page_token, self.page_size)

    def compare(self, primary: GraphPage, secondary: GraphPage, settings: CompareSettings) -> Comparison:
        return compare_page(primary, secondary, settings)


@dataclass(frozen=True, slots=True)
class SearchNodes:
    scope: str
    query: str
    operation: str = "SearchNodes"

    def identity(self) -> str:
        return self.query

    async def run(self, store: Backend) -> Graph:
        return await store.search_nodes(self.scope, self.query)

    def compare(self, primary: Graph, secondary: Graph, settings: CompareSettings) -> Comparison:
        return compare_graph(primary, secondary, settings)


@dataclass(frozen=True, slots=True)
class OpenNodes:
    scope: str
    names: Sequence[str]
    operation: str = "OpenNodes"

    def identity(self) -> str:
        return "\x1f".join(self.names)

    async def run(self, store: Backend) -> Graph:
        return await store.open_nodes(self.scope, self.names)

    def compare(self, primary: Graph, secondary: Graph, settings: CompareSettings) -> Comparison:
        return compare_graph(primary, secondary, settings)


@dataclass(frozen=True, slots=True)
class SemanticSearch:
    scope: str
    query: str  # for identity only: the vector is computed once, before any store is asked
    vector: Vector
    limit: int
    min_score: float | None
    entity_types: Sequence[str]
    operation: str = "SemanticSearch"

    def identity(self) -> str:
        return f"{self.query}|{self.limit}|{self.min_score}|{','.join(self.entity_types)}"

    async def run(self, store: Backend) -> SearchResult:
        return await store.semantic_search(self.scope, self.vector, self.limit, self.min_score, self.entity_types)

    def compare(self, primary: SearchResult, secondary: SearchResult, settings: CompareSettings) -> Comparison:
        return compare_search(primary, secondary, settings)
