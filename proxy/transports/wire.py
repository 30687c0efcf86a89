"""Registering a servicer so that no request can crash its way past the status mapping.

grpc's generated `add_*Servicer_to_server` decodes each request with the message's `FromString`; bytes that do not
decode make grpc log a full traceback and answer UNKNOWN or INTERNAL, once per call. Here the generated handlers are
taken as they are and only their decoding is wrapped: a request that does not decode reaches no servicer code and
is answered INVALID_ARGUMENT naming the message it should have been, with one log line.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from proxy.transports.shedding import Budget

log = logging.getLogger("memshift.rpc")


class Garbled:
    """What a request that did not decode becomes; the handler wrapper answers it, no servicer sees it."""

    __slots__ = ("message", "problem")

    def __init__(self, message: str, problem: str) -> None:
        self.message = message
        self.problem = problem


def _safe(decode: Callable[[bytes], Any], message: str) -> Callable[[bytes], Any]:
    def decoder(raw: bytes) -> Any:
        try:
            return decode(raw)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:  # truncated, malformed, or invalid UTF-8
            return Garbled(message, str(exc) or type(exc).__name__)

    return decoder


async def _refuse(garbled: Garbled, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    log.warning("undecodable request refused", extra={"rpc": method, "problem": garbled.problem})
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"request: not a valid {garbled.message} message ({garbled.problem})")


def _guard(name: str, handler: Any, message: str, budget: Budget | None) -> Any:
    decode = _safe(handler.request_deserializer, message)
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Garbled):
                await _refuse(request, context, name)
            if budget is None:
                return await inner(request, context)
            size = request.ByteSize()
            refused = budget.admit(size)
            if refused is not None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
            try:
                return await inner(request, context)
            finally:
                budget.release(size)

        return handler._replace(request_deserializer=decode, unary_unary=unary)
    inner_stream = handler.unary_stream

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        if isinstance(request, Garbled):
            await _refuse(request, context, name)
        async for item in inner_stream(request, context):
            yield item

    return handler._replace(request_deserializer=decode, unary_stream=stream)


class _Capture:
    """Stands in for the server while a generated `add_*_to_server` runs, keeping the handlers it registers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers arrive through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def add_servicer(server: grpc.aio.Server, add: Callable[[Any, Any], None], servicer: Any,
                 service: Any, budget: Budget | None = None) -> None:
    """`add(servicer, server)` (a generated `add_*Servicer_to_server`), with every request's decoding guarded and,
    with a `budget`, every unary call admitted against it (proxy.transports.shedding). `service` is the protobuf service
    descriptor, for the names of the request messages."""
    capture = _Capture()
    add(servicer, capture)
    guarded = {name: _guard(name, h, service.methods_by_name[name].input_type.full_name, budget)
               for name, h in capture.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, guarded),))
    server.add_registered_method_handlers(capture.service, guarded)
