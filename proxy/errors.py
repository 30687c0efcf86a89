"""Errors raised above the stores, each naming what was wrong and the status it means (`adapters.errors`)."""

from __future__ import annotations

from adapters.errors import MemshiftError


class InvalidInput(MemshiftError, ValueError):
    """Bad input: INVALID_ARGUMENT. `field` is the path of the offending field, e.g. `entities[2].name`."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class TooLarge(InvalidInput):
    """A request over a size limit: RESOURCE_EXHAUSTED."""

    code = "RESOURCE_EXHAUSTED"


class IllegalTransition(MemshiftError):
    """A phase change that is not allowed now: FAILED_PRECONDITION, saying which phase it is in and what is allowed."""

    code = "FAILED_PRECONDITION"


class FleetUnsafe(IllegalTransition):
    """A store a fleet of proxies would share, though it cannot be written by several at once: FAILED_PRECONDITION
    (a refused start, a refused migration target), naming the store and why."""


class LeaseLapsed(MemshiftError):
    """A fleet proxy that lost touch with the control store refuses writes until it has caught up: UNAVAILABLE."""

    code = "UNAVAILABLE"


class Unauthenticated(MemshiftError):
    """No credential, or one nobody issued: UNAUTHENTICATED."""

    code = "UNAUTHENTICATED"


class PermissionDenied(MemshiftError):
    """A known credential asking for something it was not granted (a scope outside its token's): PERMISSION_DENIED."""

    code = "PERMISSION_DENIED"
