"""A hybrid logical clock: one version orders every write across the whole fleet.

A version is one signed 64-bit integer, so every store keeps it in a plain integer column:
    (milliseconds since 2025-01-01) << 22 | counter << 10 | node id
41 bits of milliseconds last until 2094; 12 bits of counter allow 4096 versions per millisecond per node before
the clock borrows the next millisecond; 10 bits of node id tell up to 1024 proxies apart, so two proxies never mint
the same version.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

EPOCH_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
NODE_BITS = 10
COUNTER_BITS = 12
MAX_NODE = (1 << NODE_BITS) - 1
MAX_COUNTER = (1 << COUNTER_BITS) - 1


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000 - EPOCH_MS


def unpack(version: int) -> tuple[int, int, int]:
    """(milliseconds since the epoch, counter, node id)."""
    return version >> (COUNTER_BITS + NODE_BITS), (version >> NODE_BITS) & MAX_COUNTER, version & MAX_NODE


def earlier(version: int, ms: int) -> int:
    """The version `ms` milliseconds of wall time before `version` (counter and node zero)."""
    wall = max(0, unpack(version)[0] - ms)
    return wall << (COUNTER_BITS + NODE_BITS)


def later(version: int, ms: int) -> int:
    """The version `ms` milliseconds of wall time after `version` (counter and node at their highest)."""
    wall = unpack(version)[0] + ms
    return (wall << (COUNTER_BITS + NODE_BITS)) | (MAX_COUNTER << NODE_BITS) | MAX_NODE


def unix_seconds(version: int) -> float:
    """When `version` was stamped, as unix seconds."""
    return (unpack(version)[0] + EPOCH_MS) / 1000


class HybridClock:
    def __init__(self, node_id: int, wall_ms: Callable[[], int] = _wall_ms) -> None:
        if not 0 <= node_id <= MAX_NODE:
            raise ValueError(f"node_id must be in 0..{MAX_NODE}, got {node_id}")
        self._node = node_id
        self._wall = wall_ms
        self._ms = 0
        self._counter = 0
        self._lock = threading.Lock()

    @property
    def node_id(self) -> int:
        return self._node

    def now(self) -> int:
        """A version higher than every version this clock has issued or observed."""
        with self._lock:
            wall = self._wall()
            if wall > self._ms:
                self._ms, self._counter = wall, 0
            elif self._counter < MAX_COUNTER:
                self._counter += 1
            else:  # counter exhausted within one millisecond: borrow the next one
                self._ms, self._counter = self._ms + 1, 0
            return (self._ms << (COUNTER_BITS + NODE_BITS)) | (self._counter << NODE_BITS) | self._node

    def observe(self, version: int) -> None:
        """Move past a version seen elsewhere (another proxy, a store), so later versions order after it."""
        ms, counter, _ = unpack(version)
        with self._lock:
            if (ms, counter) > (self._ms, self._counter):
                self._ms, self._counter = ms, counter
