"""The `memshift.v1.Memory` servicer: wire messages in, domain calls to the router, wire messages out.

Each error becomes the status docs/design.md names for it, with a message that says what to fix.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from adapters.errors import ProxyError
from adapters.specs import scrub
from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc as pb_grpc
from proxy.routing.router import Router
from proxy.routing.shadow import collect_after_reply, reset_after_reply
from proxy.runtime.config import Limits
from proxy.runtime.telemetry import Telemetry
from proxy.transports import convert
from proxy.transports.auth import ScopeTokens

log = logging.getLogger("memshift.rpc")
T = TypeVar("T")
Req = TypeVar("Req")
_INLINE_BYTES = 256 * 1024  # requests smaller than this are converted on the event loop: a thread costs more
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status and details a deliberate error means (`adapters.errors`: each class names its code); None for
    anything else, which is a bug."""
    if isinstance(exc, ProxyError) and exc.code != "INTERNAL":
        return grpc.StatusCode[exc.code], exc.detail()
    return None


async def abort_for(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, name: str) -> None:
    """End the call with the status `exc` maps to (anything unexpected logged and INTERNAL); for unary handlers
    through `rpc`, and for streaming ones, which call it from their own `except`."""
    mapped = status_for(exc)
    if mapped is None:
        log.exception("internal error", extra={"rpc": name})
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}; see proxy logs")
        return
    detail = scrub(mapped[1])  # a store's error may quote a spec; the caller never sees its secrets
    log.debug("rejected", extra={"rpc": name, "status": mapped[0].name, "detail": detail})
    await context.abort(mapped[0], detail)


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Wraps a handler of the Memory or MigrationAdmin servicer: a server span (the servicer's `telemetry`), domain
    errors mapped to their status (`status_for`, anything else logged and INTERNAL), and the work the handler left
    for after the reply (shadow reads) started once gRPC has sent the answer."""
    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        telemetry: Telemetry = self.telemetry
        hooks, token = collect_after_reply()
        with telemetry.rpc(self.SERVICE, method.__name__) as call:
            try:
                authorize = getattr(self, "authorize", None)
                if authorize is not None:
                    authorize(request, context)
                response = await method(self, request, context)
            except Exception as exc:
                call.status = (status_for(exc) or (grpc.StatusCode.INTERNAL, ""))[0].name
                await abort_for(context, exc, method.__name__)
                raise  # unreachable: abort raises
            finally:
                reset_after_reply(token)
        if hooks:
            context.add_done_callback(lambda _: _run_hooks(hooks))
        return response

    return wrapper


def _run_hooks(hooks: list[Callable[[], None]]) -> None:
    for hook in hooks:
        try:
            hook()
        except Exception:
            log.exception("after-reply hook failed")


class MemoryServicer(pb_grpc.MemoryServicer):
    SERVICE = "memshift.v1.Memory"

    def __init__(self, router: Router, telemetry: Telemetry, limits: Limits,
                 tokens: ScopeTokens | None = None) -> None:
        self._router = router
        self.telemetry = telemetry
        self._limits = limits
        self._tokens = tokens

    def authorize(self, request: Any, context: Any) -> None:
        """With a tokens file, the caller's bearer token must grant the request's scope (proxy.transports.auth)."""
        if self._tokens is not None:
            metadata = dict(context.invocation_metadata() or ())
            self._tokens.check(metadata.get("authorization"), request.scope)

    async def _convert(self, request: Message, convert_it: Callable[[], T]) -> T:
        """Counts checked on the wire message before anything is converted, so an over-count request costs a few
        `len` calls; a large request is then converted on a worker thread, so health checks and other callers are
        not held behind one caller's input."""
        convert.check_counts(request, self._limits)
        if request.ByteSize() < _INLINE_BYTES:
            return convert_it()
        return await asyncio.to_thread(convert_it)

    @rpc
    async def CreateEntities(self, request: pb.CreateEntitiesRequest, context: Any) -> pb.CreateEntitiesResponse:
        entities = await self._convert(request, lambda: [convert.entity_in(e) for e in request.entities])
        created = await self._router.create_entities(request.scope, entities)
        return pb.CreateEntitiesResponse(created=[convert.entity_out(e) for e in created])

    @rpc
    async def CreateRelations(self, request: pb.CreateRelationsRequest, context: Any) -> pb.CreateRelationsResponse:
        relations = await self._convert(request, lambda: [convert.relation_in(r) for r in request.relations])
        created = await self._router.create_relations(request.scope, relations)
        return pb.CreateRelationsResponse(created=[convert.relation_out(r) for r in created])

    @rpc
    async def AddObservations(self, request: pb.AddObservationsRequest, context: Any) -> pb.AddObservationsResponse:
        additions = await self._convert(request, lambda: [convert.addition_in(a) for a in request.observations])
        results = await self._router.add_observations(request.scope, additions)
        return pb.AddObservationsResponse(results=[
            pb.ObservationResult(entity_name=r.entity_name, added_observations=r.contents) for r in results])

    @rpc
    async def DeleteEntities(self, request: pb.DeleteEntitiesRequest, context: Any) -> pb.DeleteEntitiesResponse:
        names = await self._convert(request, lambda: list(request.entity_names))
        await self._router.delete_entities(request.scope, names)
        return pb.DeleteEntitiesResponse()

    @rpc
    async def DeleteObservations(
        self, request: pb.DeleteObservationsRequest, context: Any
    ) -> pb.DeleteObservationsResponse:
        deletions = await self._convert(request, lambda: [convert.deletion_in(d) for d in request.deletions])
        await self._router.delete_observations(request.scope, deletions)
        return pb.DeleteObservationsResponse()

    @rpc
    async def DeleteRelations(self, request: pb.DeleteRelationsRequest, context: Any) -> pb.DeleteRelationsResponse:
        relations = await self._convert(request, lambda: [convert.relation_in(r) for r in request.relations])
        await self._router.delete_relations(request.scope, relations)
        return pb.DeleteRelationsResponse()

    @rpc
    async def ReadGraph(self, request: pb.ReadGraphRequest, context: Any) -> pb.ReadGraphResponse:
        page = await self._router.read_graph(request.scope, request.page_size, request.page_token)
        return pb.ReadGraphResponse(
            entities=[convert.entity_out(e) for e in page.entities],
            relations=[convert.relation_out(r) for r in page.relations],
            next_page_token=page.next_cursor or "", truncated=page.truncated)

    @rpc
    async def SearchNodes(self, request: pb.SearchNodesRequest, context: Any) -> pb.Graph:
        return convert.graph_out(await self._router.search_nodes(request.scope, request.query))

    @rpc
    async def OpenNodes(self, request: pb.OpenNodesRequest, context: Any) -> pb.Graph:
        names = await self._convert(request, lambda: list(request.names))
        return convert.graph_out(await self._router.open_nodes(request.scope, names))

    @rpc
    async def SemanticSearch(self, request: pb.SemanticSearchRequest, context: Any) -> pb.SemanticSearchResponse:
        convert.check_counts(request, self._limits)
        result = await self._router.semantic_search(
            request.scope, request.query, request.limit,
            request.min_score if request.HasField("min_score") else None, list(request.entity_types))
        return pb.SemanticSearchResponse(
            results=[pb.ScoredEntity(entity=convert.entity_out(r.entity), score=r.score) for r in result.results],
            relations=[convert.relation_out(r) for r in result.relations], truncated=result.truncated)
