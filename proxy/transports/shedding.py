"""Load shedding: a bound on the work one service has in flight, so a flood is refused at once instead of queued.

Without it, 2,000 small calls and 50 large ones were all admitted and queued behind each other: small calls waited
4-6 s and nothing was refused. Each call is admitted against two budgets, calls in flight and request bytes in
flight; beyond either it is answered RESOURCE_EXHAUSTED at once (a client backs off and retries), before any of its
work starts. Health checks are not counted (they are registered apart), and the admin API has its own server and
its own budget, so both answer whatever agents send.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("memshift.shedding")


@dataclass
class Budget:
    max_calls: int
    max_bytes: int
    calls: int = 0
    bytes: int = 0
    shed: int = 0  # calls refused since start
    _warned: float = 0.0

    def admit(self, size: int) -> str | None:
        """Take room for a call of `size` request bytes; None when admitted, else why it is refused."""
        if self.calls >= self.max_calls:
            why = f"{self.calls} calls in flight, at most {self.max_calls}"
        elif self.calls > 0 and self.bytes + size > self.max_bytes:  # one call alone is always admitted
            why = f"{self.bytes + size} request bytes in flight, at most {self.max_bytes}"
        else:
            self.calls += 1
            self.bytes += size
            return None
        self.shed += 1
        now = time.monotonic()
        if now - self._warned > 1.0:  # a flood logs a line a second, not a line a call
            self._warned = now
            log.warning("shedding load", extra={"reason": why, "shed_total": self.shed})
        return f"server busy: {why}; retry with backoff"

    def release(self, size: int) -> None:
        self.calls -= 1
        self.bytes -= size
