"""Memshift's public Python surface: the client for agents (`Client`, `AsyncClient`) and the generated gRPC stubs
(`memshift.v1`)."""

from memshift.client import (
    AsyncClient,
    Client,
    Entity,
    Graph,
    Hit,
    InvalidArgument,
    MemshiftError,
    NotFound,
    PermissionDenied,
    Relation,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

__all__ = ["AsyncClient", "Client", "Entity", "Graph", "Hit", "InvalidArgument", "MemshiftError", "NotFound",
           "PermissionDenied", "Relation", "TooLarge", "Unauthenticated", "Unavailable"]
