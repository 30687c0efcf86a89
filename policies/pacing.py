"""How many records the backfill's next page holds: sized by time, not by a fixed count.

A page is applied to the new store in one transaction that holds the locks of the scopes it touches; an agent's write
to one of those scopes waits for it. When that wait outlasts the dual write's grace, the agent's new-store half is
counted late and goes through the repair queue, and a write after it in the same scope waits for that repair too. So a
page should take a fraction of the grace, whatever the store's speed, the size of its tables or the load on the
machine: the size follows the time the last page took (as pt-online-schema-change sizes its chunks by a target time),
between a floor that keeps the per-page overhead small and the operator's `batch_size` as the ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOOR = 50  # records: below this a page's fixed costs (round trips, the checkpoint) dominate its records


@dataclass(frozen=True, slots=True)
class PageTiming:
    size: int  # records in the page just applied
    seconds: float  # how long its apply took
    target_seconds: float  # what a page should take
    ceiling: int  # the operator's batch_size


def next_page_size(t: PageTiming) -> int:
    """Proportional to how far the last page was from the target; at most double per page (a fast page on an idle
    store must not jump straight to a size that a busy moment makes slow), never below FLOOR or above `ceiling`."""
    floor = min(FLOOR, t.ceiling)
    most = 2 * max(t.size, 1)
    # Compared as floats first: a page timed at (nearly) zero seconds would ask for an infinite size.
    ratio = t.target_seconds / t.seconds if t.seconds > 0 else 2.0
    wanted = most if t.size * ratio >= most else int(t.size * ratio)
    return max(floor, min(t.ceiling, wanted))
