"""Errors raised above the stores, each naming what was wrong; the servicer maps them to gRPC statuses."""

from __future__ import annotations


class InvalidInput(ValueError):
    """Bad input: INVALID_ARGUMENT. `field` is the path of the offending field, e.g. `entities[2].name`."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class TooLarge(InvalidInput):
    """A request over a size limit: RESOURCE_EXHAUSTED."""


class IllegalTransition(Exception):
    """A phase change that is not allowed now: FAILED_PRECONDITION, saying which phase it is in and what is allowed."""


class FleetUnsafe(IllegalTransition):
    """A store a fleet of proxies would share, though it cannot be written by several at once: FAILED_PRECONDITION
    (a refused start, a refused migration target), naming the store and why."""


class LeaseLapsed(Exception):
    """A fleet proxy that lost touch with the control store refuses writes until it has caught up: UNAVAILABLE."""


class Unauthenticated(Exception):
    """No credential, or one nobody issued: UNAUTHENTICATED."""


class PermissionDenied(Exception):
    """A known credential asking for something it was not granted (a scope outside its token's): PERMISSION_DENIED."""
