"""Registering the generated servicer so that undecodable requests become INVALID_ARGUMENT.

grpcio turns a request that fails to parse into an UNKNOWN status before any servicer code runs. Here
the generated handlers get a tolerant deserializer that yields a `Malformed` marker instead; unary
handlers abort on it with INVALID_ARGUMENT, and the Stream servicer checks for it in its iterator.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError


class Malformed:
    """Stands for a request message that could not be decoded."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error

    def __str__(self) -> str:
        return f"request: malformed message: {self.error}"


def _tolerant(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Malformed(exc)
    return parse


def _guard_unary(behavior):
    async def handler(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        return await behavior(request, context)
    return handler


class _Collector:
    """Stands in for the server while the generated add_*_to_server function registers handlers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def add_servicer(add_to_server, servicer, server: grpc.aio.Server) -> None:
    """Like the generated `add_XServicer_to_server(servicer, server)`, with tolerant request parsing."""
    collector = _Collector()
    add_to_server(servicer, collector)
    handlers = {}
    for method, handler in collector.handlers.items():
        handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_unary is not None:
            handler = handler._replace(unary_unary=_guard_unary(handler.unary_unary))
        handlers[method] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(collector.service, handlers),))
    server.add_registered_method_handlers(collector.service, handlers)
