"""Every error Memshift raises on purpose, in one tree, each class naming once the status it means.

Each class says what went wrong in words a caller can act on (`told`: the message, in the class's own framing) and
carries `code`, the canonical status name (`INVALID_ARGUMENT`, `NOT_FOUND`, ...; the vocabulary gRPC uses) that the
proxy turns into a gRPC status in one place (`proxy.transports.servicer.status_for`); the MCP door reports the same
name.
Stores raise these without knowing any transport. Anything else that escapes a call is a bug: logged, and answered
INTERNAL without details.

The root is `ProxyError`. The Python client (`memshift`) has exceptions of its own, named after the status a call
ended with (`memshift.NotFound`, ...); no class here shares a name with one of them.
"""

from __future__ import annotations

import errno
from typing import ClassVar


class ProxyError(Exception):
    code: ClassVar[str] = "INTERNAL"  # a subclass that means something to the caller names its own
    told: ClassVar[str] = "{}"  # how the caller is told: the message in its class's own words

    def detail(self) -> str:
        return self.told.format(self)


# --- the caller's input ---------------------------------------------------------------------------------------------
class InvalidInput(ProxyError, ValueError):
    """Bad input: INVALID_ARGUMENT. `field` is the path of the offending field, e.g. `entities[2].name`."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class OverLimit(InvalidInput):
    """A request over a size limit: RESOURCE_EXHAUSTED."""

    code = "RESOURCE_EXHAUSTED"


class JsonlError(InvalidInput):
    """A line of a file that cannot be taken: INVALID_ARGUMENT, naming the line's number and the field."""

    def __init__(self, line: int, problem: str) -> None:
        self.line = line
        super().__init__(f"line {line}", problem)


class StoreSpecError(ProxyError, ValueError):
    """A store or control spec that cannot be used (unknown scheme, bad option, bad address): INVALID_ARGUMENT,
    naming the part to fix, the spec shown redacted."""

    code = "INVALID_ARGUMENT"


# --- credentials ----------------------------------------------------------------------------------------------------
class NoCredential(ProxyError):
    """No credential, or one nobody issued: UNAUTHENTICATED."""

    code = "UNAUTHENTICATED"


class NotGranted(ProxyError):
    """A known credential asking for something it was not granted (a scope outside its token's): PERMISSION_DENIED."""

    code = "PERMISSION_DENIED"


# --- the migration's state ------------------------------------------------------------------------------------------
class IllegalTransition(ProxyError):
    """A phase change that is not allowed now: FAILED_PRECONDITION, saying which phase it is in and what is allowed."""

    code = "FAILED_PRECONDITION"


class FleetUnsafe(IllegalTransition):
    """A store a fleet of proxies would share, though it cannot be written by several at once: FAILED_PRECONDITION
    (a refused start, a refused migration target), naming the store and why."""


class Conflict(ProxyError):
    """The state changed since it was read (compare-and-set lost): ABORTED, worth a retry."""

    code = "ABORTED"
    told = "the migration state changed meanwhile (another proxy acted): {}; retry"


class LeaseLapsed(ProxyError):
    """A fleet proxy that lost touch with the control store refuses writes until it has caught up: UNAVAILABLE."""

    code = "UNAVAILABLE"


class RepairNotRecorded(ProxyError):
    """A dual write reached the decisive store, but the control store could not record that the new store still owes
    it: UNAVAILABLE. The proxy keeps the keys in memory and records them as soon as the control store answers; the
    caller is not told "done" because a proxy that died before then would leave the new store without the write.
    Every memory write is safe to retry (creates skip what exists, deletes of what is gone do nothing)."""

    code = "UNAVAILABLE"
    told = ("the write reached the store, but the control store could not record its copy owed to the new store "
            "({}); it is kept and retried in memory; retry the write to be sure of it")


class PhaseUnknown(ProxyError):
    """A change of the migration state was sent but its answer was lost with the control store, so this proxy cannot
    tell which phase holds: UNAVAILABLE. Writes are refused (before touching any store) until the control store
    answers and the proxy has read the state again."""

    code = "UNAVAILABLE"
    told = "{}; retry shortly"


class UnreadableState(ProxyError):
    """The stored control state cannot be loaded (a hand edit, a bug of an older version): the proxy refuses to start
    and says what and where, instead of serving on a guess."""


# --- the stores -----------------------------------------------------------------------------------------------------
class StoreError(ProxyError):
    """Base of the errors a store reports."""


class EntityNotFound(StoreError):
    code = "NOT_FOUND"
    told = "{}; nothing of this call was stored"

    def __init__(self, names: list[str]) -> None:
        self.names = names
        super().__init__(f"entity not found: {', '.join(names)}")


class StoreUnavailable(StoreError):
    """The store cannot be reached or refused to work; nothing of the call was applied."""

    code = "UNAVAILABLE"
    told = "store unavailable: {}"


class EmbeddingMismatch(StoreError):
    """The store's data was embedded with another model or dimension than the one configured: the store cannot
    serve this proxy (UNAVAILABLE), though it is reachable, so it is not an outage."""

    code, told = StoreUnavailable.code, StoreUnavailable.told


# --- start-up: settings and files an operator wrote -----------------------------------------------------------------
class ConfigError(ProxyError, ValueError):
    """A setting that cannot be used: the start stops with a message naming it."""

    code = "INVALID_ARGUMENT"


class PolicyError(ConfigError):
    """The policy file is unreadable or says something invalid."""


class TokensFileError(ConfigError):
    """The tokens file cannot be read or says something invalid; the message names the line, never the token."""


# What turning each listener off looks like, where it can be turned off.
_OFF = {"mcp_listen": 'or "" to turn the MCP endpoint off', "health_listen": "or leave it unset",
        "telemetry.prometheus_listen": "or leave it unset"}


class ListenError(ConfigError):
    """An address a listener cannot take: names the setting, the address and what to do."""

    def __init__(self, setting: str, address: str, cause: OSError | str) -> None:
        reason = (cause if isinstance(cause, str) else
                  "address already in use" if cause.errno == errno.EADDRINUSE else
                  f"cannot listen there ({cause.strerror or cause})")
        fix = f"set {setting} to another address" + (f", {_OFF[setting]}" if setting in _OFF else "")
        super().__init__(f"{setting} {address}: {reason}; {fix}")
        self.setting, self.address = setting, address
