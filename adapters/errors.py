"""The root of every error Memshift raises on purpose, with the status it means, named once here per class.

Each error class says what went wrong in words a caller can act on (`told`: the message, in the class's own framing)
and carries `code`, the canonical status name (`INVALID_ARGUMENT`, `NOT_FOUND`, ...; the vocabulary gRPC uses) that
the proxy turns into a gRPC status in one place (`proxy.servicer.status_for`); the MCP door reports the same name.
Stores raise these without knowing any transport. Anything else that escapes a call is a bug: logged, and answered
INTERNAL without details.
"""

from __future__ import annotations

from typing import ClassVar


class MemshiftError(Exception):
    code: ClassVar[str] = "INTERNAL"  # a subclass that means something to the caller names its own
    told: ClassVar[str] = "{}"  # how the caller is told: the message in its class's own words

    def detail(self) -> str:
        return self.told.format(self)
