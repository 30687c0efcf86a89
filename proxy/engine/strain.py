"""How much bulk work weighs on the agents: their writes' latency while a backfill or a Verify runs, against while
none does, and the rest bulk work takes between pages because of it (`policies.pacing.next_pause`).

Every write the proxy serves is timed whole, as the agent waits for it (a dual write: both halves, the new store's
up to the grace); bulk work marks the time it runs (`bulk`). The quiet figure is the p99 of the last writes made
while nothing bulk ran (the agents' own latency on this machine, under their own load), the busy one the p99 of the
writes of the last seconds made while something did. Part of the difference is writing two stores instead of one,
which no rest takes away: the rest is bounded by the page's own time (`policies.pacing.REST_PER_WORK`), so bulk
work never drops below a third of its speed for it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from policies import pacing

QUIET_KEPT = 1000  # writes
BUSY_WINDOW = 2.0  # seconds


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class WriteStrain:
    def __init__(self, target: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.target = target  # the agents' p99 bulk work may cost, as a multiple of it without; 0: no rest
        self._clock = clock
        self._bulk = 0  # bulk jobs running
        self._quiet: deque[float] = deque(maxlen=QUIET_KEPT)
        self._busy: deque[tuple[float, float]] = deque()  # (when, seconds)
        self.pause = 0.0  # seconds: the rest bulk work takes before its next page

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """Around bulk work: the writes made meanwhile count as busy."""
        self._bulk += 1
        try:
            yield
        finally:
            self._bulk -= 1

    def record(self, seconds: float) -> None:
        """One write served, in `seconds`."""
        if self._bulk:
            self._busy.append((self._clock(), seconds))
        else:
            self._quiet.append(seconds)

    def strain(self) -> pacing.Strain:
        since = self._clock() - BUSY_WINDOW
        while self._busy and self._busy[0][0] < since:
            self._busy.popleft()
        busy = [s for _, s in self._busy]
        return pacing.Strain(_p99(list(self._quiet)), len(self._quiet), _p99(busy), len(busy))

    def next_pause(self, work_seconds: float) -> float:
        """The rest before bulk work's next page, the last having taken `work_seconds`, decided from the writes so
        far (and kept as `pause`)."""
        self.pause = pacing.next_pause(self.pause, self.strain(), self.target, work_seconds)
        return self.pause
