"""ChromaDB: the memory store as points (adapters.points) in four collections, through the official `chromadb`
client.

- `chroma+local:///path` runs `PersistentClient` in-process; `chroma://host:8000` (`chromas://host` for TLS) talks to
  a server through `HttpClient`. Query parameters: `tenant`, `database` (both must exist; Chroma's defaults
  otherwise), `prefix` (collection names, default `memshift`), `token_file` (else $CHROMA_TOKEN), sent as a bearer
  token and never logged.
- `<prefix>_vectors` holds one point per embedded entity, in cosine space, with the scope, name and type it is
  searched by and the text it was computed from; the model and dimension are that collection's metadata, checked
  at open. The vectors are Memshift's own: no collection has an embedding function, so Chroma never embeds (its
  default one would try to download a model). Chroma wants a vector on every record, so the payload-only points
  (entities, observations, relations, scopes) carry a one-number placeholder. Keeping entity records apart from
  their vectors matters for speed: a vector updated in place, or thousands of identical placeholders in one HNSW
  index, made the copy several times slower than the client's own upserts.
- Chroma's metadata holds flat values: an entity's or relation's own metadata is stored as a JSON string.
- The client is synchronous; its calls run one at a time on a thread of their own, so the event loop never waits.
- One writer per collection prefix: Chroma has no conditional writes, so two proxies writing one server's
  collections could apply an older record over a newer one. A fleet shares a PostgreSQL store instead.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from adapters.embedder import Embedder, EmbeddingInfo, Vector
from adapters.errors import EmbeddingMismatch, StoreUnavailable
from adapters.points import Payload, PointsBackend, Where, scope_id
from adapters.records import Kind
from adapters.specs import StoreSpec, parse

T = TypeVar("T")
_FLAT = [1.0]  # the vector of a payload-only point: Chroma needs one


def parse_spec(spec: StoreSpec | str) -> dict[str, Any]:
    """Client arguments, collection prefix and a label without secrets, from a `chroma...` spec."""
    spec = parse(spec) if isinstance(spec, str) else spec
    prefix = spec.options.get("prefix", "memshift")
    where: dict[str, Any] = {k: spec.options[k] for k in ("tenant", "database") if k in spec.options}
    if spec.local:
        return {"local": True, "args": {"path": spec.path, **where}, "prefix": prefix,
                "label": f"chroma:{spec.path}/{prefix}"}
    token = spec.secret.read()
    tls = spec.scheme == "chromas"
    port = spec.port or (443 if tls else 8000)
    args = {"host": spec.host or "localhost", "port": port, "ssl": tls,
            "headers": {"Authorization": f"Bearer {token}"} if token else None, **where}
    return {"local": False, "args": args, "prefix": prefix, "label": f"chroma:{spec.host}:{port}/{prefix}"}


def _where(w: Where | None) -> dict[str, Any] | None:
    if w is None:
        return None
    conds: list[dict[str, Any]] = [{k: {"$in": v} if isinstance(v, list) else {"$eq": v}} for k, v in w.equal.items()]
    if w.version_below is not None:
        conds.append({"version": {"$lt": w.version_below}})
    either = [{k: {"$eq": v}} for k, v in w.any_of.items()]
    if either:
        conds.append(either[0] if len(either) == 1 else {"$or": either})
    if not conds:
        return None
    return conds[0] if len(conds) == 1 else {"$and": conds}


def _stored(p: Payload) -> dict[str, Any]:
    """A payload as Chroma metadata: flat values only."""
    out = dict(p)
    if "metadata" in out:
        out["metadata"] = json.dumps(out["metadata"], ensure_ascii=False, sort_keys=True)
    return out


def _payload(m: dict[str, Any] | None) -> Payload:
    out = dict(m or {})
    if isinstance(out.get("metadata"), str):
        out["metadata"] = json.loads(out["metadata"])
    return out


class ChromaPoints:
    """adapters.points' driver for ChromaDB."""

    conditional = False

    def fleet_problem(self) -> str | None:
        return (f"{self.label}: ChromaDB has no conditional writes, so proxies sharing it could overwrite a newer "
                "record with an older one; one proxy per ChromaDB store (a fleet shares PostgreSQL, Neo4j or a "
                "Qdrant server)")

    def __init__(self, spec: StoreSpec | str) -> None:
        parsed = parse_spec(spec)
        self._local: bool = parsed["local"]
        self._args: dict[str, Any] = parsed["args"]
        p = parsed["prefix"]
        self._names = {Kind.ENTITY: f"{p}_entities", Kind.OBSERVATION: f"{p}_observations",
                       Kind.RELATION: f"{p}_relations"}
        self._scopes_name, self._vectors_name = f"{p}_scopes", f"{p}_vectors"
        self.label: str = parsed["label"]
        self._client: Any = None
        self._c: dict[Kind, Any] = {}
        self._scopes_c: Any = None
        self._vectors_c: Any = None
        self._batch = 1000
        self._executor: ThreadPoolExecutor | None = None

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._executor is None:
            raise StoreUnavailable(f"{self.label} is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args, **kwargs))
        except (ConnectionError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{self.label}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # the HTTP client's own transport errors, without importing httpx here
            if type(exc).__module__.startswith("httpx"):
                raise StoreUnavailable(f"{self.label}: {type(exc).__name__}: {exc}") from exc
            raise

    async def open(self, info: EmbeddingInfo) -> None:
        import chromadb  # heavy (onnxruntime and more): paid only by a proxy that uses ChromaDB
        from chromadb.errors import NotFoundError

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chroma")
        make = chromadb.PersistentClient if self._local else chromadb.HttpClient
        try:
            self._client = await self._call(make, **self._args)
        except StoreUnavailable:
            raise
        except Exception as exc:  # a server that does not answer as Chroma, a tenant that does not exist
            raise StoreUnavailable(f"{self.label}: cannot open: {exc}") from exc
        self._batch = max(1, min(1000, int(await self._call(self._client.get_max_batch_size))))
        space = {"hnsw": {"space": "cosine"}}

        def collection(name: str, configuration: dict[str, Any] | None, meta: dict[str, Any] | None) -> Any:
            try:
                return self._client.get_collection(name, embedding_function=None)
            except NotFoundError:
                return self._client.create_collection(name, embedding_function=None, configuration=configuration,
                                                      metadata=meta)

        vectors = await self._call(collection, self._vectors_name, space,
                                   {"embedding_model": info.model, "embedding_dim": info.dimension})
        meta = vectors.metadata or {}
        if (meta.get("embedding_model"), meta.get("embedding_dim")) != (info.model, info.dimension):
            raise EmbeddingMismatch(f"{self.label} was written with embedding model {meta.get('embedding_model')!r}"
                                    f" (dimension {meta.get('embedding_dim')}), but the configured model is "
                                    f"{info.model!r} (dimension {info.dimension}); migrate with re-embedding")
        self._vectors_c = vectors
        self._c = {kind: await self._call(collection, self._names[kind], None, None) for kind in Kind}
        self._scopes_c = await self._call(collection, self._scopes_name, None, None)

    async def close(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=True)
        self._client, self._c = None, {}

    def _chunks(self, n: int) -> range:
        return range(0, n, self._batch)

    async def get(self, kind: Kind, ids: Sequence[str]) -> list[Payload]:
        if not ids:
            return []
        got = await self._call(self._c[kind].get, ids=list(dict.fromkeys(ids)), include=["metadatas"])
        return [_payload(m) for m in got["metadatas"]]

    async def find(self, kind: Kind, where: Where) -> list[Payload]:
        got = await self._call(self._c[kind].get, where=_where(where), include=["metadatas"])
        return [_payload(m) for m in got["metadatas"]]

    async def put(self, kind: Kind, rows: Sequence[tuple[str, Payload]]) -> None:
        for i in self._chunks(len(rows)):
            part = rows[i:i + self._batch]
            await self._call(self._c[kind].upsert, ids=[r[0] for r in part], embeddings=[_FLAT] * len(part),
                             metadatas=[_stored(r[1]) for r in part])
        if kind == Kind.ENTITY:  # an entity written loses its vector: its text or type may have changed
            await self.drop_vectors([r[0] for r in rows])

    async def remove(self, kind: Kind, where: Where | None = None, ids: Sequence[str] = ()) -> None:
        if ids:
            await self._call(self._c[kind].delete, ids=list(ids))
            if kind == Kind.ENTITY:
                await self.drop_vectors(ids)
        if where is not None:  # by filter only tombstones and purged children go: none has a vector
            await self._call(self._c[kind].delete, where=_where(where))

    async def count(self, kind: Kind, where: Where) -> int:
        return len((await self._call(self._c[kind].get, where=_where(where), include=[]))["ids"])

    async def set_vectors(self, rows: Sequence[tuple[str, str, Vector]]) -> None:
        if not rows:
            return
        got = await self._call(self._c[Kind.ENTITY].get, ids=[r[0] for r in rows], include=["metadatas"])
        held = dict(zip(got["ids"], got["metadatas"], strict=True))
        live = [r for r in rows if r[0] in held and not held[r[0]]["deleted"]]
        for i in self._chunks(len(live)):
            part = live[i:i + self._batch]
            await self._call(self._vectors_c.upsert, ids=[r[0] for r in part],
                             embeddings=[np.asarray(r[2], dtype=np.float32).tolist() for r in part],
                             metadatas=[{"scope": held[r[0]]["scope"], "name": held[r[0]]["name"],
                                         "entity_type": held[r[0]]["entity_type"], "vector_text": r[1]}
                                        for r in part])

    async def drop_vectors(self, ids: Sequence[str]) -> None:
        for i in self._chunks(len(ids)):
            await self._call(self._vectors_c.delete, ids=list(ids[i:i + self._batch]))

    async def with_vectors(self, ids: Sequence[str] | None, where: Where | None) -> list[tuple[Payload, Vector | None]]:
        if ids is not None:
            if not ids:
                return []
            got = await self._call(self._c[Kind.ENTITY].get, ids=list(ids), include=["metadatas"])
        else:
            got = await self._call(self._c[Kind.ENTITY].get, where=_where(where), include=["metadatas"])
        if not got["ids"]:
            return []
        vecs = await self._call(self._vectors_c.get, ids=got["ids"], include=["metadatas", "embeddings"])
        found = {i: (m["vector_text"], np.asarray(v, dtype=np.float32)) for i, m, v in zip(
            vecs["ids"], vecs["metadatas"], vecs["embeddings"] if vecs["embeddings"] is not None else [],
            strict=True)}
        out: list[tuple[Payload, Vector | None]] = []
        for i, m in zip(got["ids"], got["metadatas"], strict=True):
            pl = _payload(m)
            text, vector = found.get(i, ("", None))
            if vector is not None:
                pl["vector_text"] = text
            out.append((pl, vector))
        return out

    async def nearest(self, vector: Vector, where: Where, limit: int,
                      min_score: float | None) -> list[tuple[Payload, float]]:
        # Only live entities have vectors (a write or a removal of an entity drops its own), so the vectors'
        # scope and type are all a search filters on.
        searched = Where({k: v for k, v in where.equal.items() if k != "deleted"}, where.version_below, where.any_of)
        got = await self._call(self._vectors_c.query, query_embeddings=[np.asarray(vector, np.float32).tolist()],
                               n_results=limit, where=_where(searched), include=["metadatas", "distances"])
        hits = [(_payload(m), 1.0 - float(d)) for m, d in zip(got["metadatas"][0], got["distances"][0], strict=True)]
        return [h for h in hits if min_score is None or h[1] >= min_score]

    async def scopes(self) -> list[str]:
        got = await self._call(self._scopes_c.get, include=["metadatas"])
        return sorted(m["scope"] for m in got["metadatas"])

    async def add_scopes(self, scopes: set[str]) -> None:
        ordered = sorted(scopes)
        await self._call(self._scopes_c.upsert, ids=[scope_id(s) for s in ordered], embeddings=[_FLAT] * len(ordered),
                         metadatas=[{"scope": s} for s in ordered])


class ChromaBackend(PointsBackend):
    def __init__(self, spec: StoreSpec | str, embedder: Embedder, max_pending_texts: int = 128) -> None:
        super().__init__(ChromaPoints(spec), embedder, max_pending_texts)
