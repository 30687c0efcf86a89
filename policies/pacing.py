"""How many records the backfill's next page holds: sized by time, not by a fixed count.

A page is applied to the new store in one transaction that holds the locks of the scopes it touches; an agent's write
to one of those scopes waits for it. When that wait outlasts the dual write's grace, the agent's new-store half is
counted late and goes through the repair queue, and a write after it in the same scope waits for that repair too. So a
page should take a fraction of the grace, whatever the store's speed, the size of its tables or the load on the
machine: the size follows the time the last page took (as pt-online-schema-change sizes its chunks by a target time),
between a floor that keeps the per-page overhead small and the operator's `batch_size` as the ceiling.

And how long bulk work (the backfill's pages, Verify's batches) rests between pages so agents keep their latency: a
page sized by time still takes cores the agents' calls need, and on a small machine a copy at full speed held their
writes at 2.6 to 9.9 times their p99 (Verify: 4.4 times), where dual-writing alone cost nothing. The rest follows
the agents' own writes, as gh-ost throttles on its replica's lag: longer while their p99 is above a target times what
it is with no bulk work running, shorter while it is below.
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


PAUSE_STEP = 0.01  # seconds: the first pause, and below half of it no pause at all
PAUSE_MAX = 2.0  # seconds: bulk work always moves on
# At most this many times the page's own time: bulk work keeps a third of its speed whatever the agents' latency
# does, since some of what they feel (writing two stores instead of one) no rest can take away.
REST_PER_WORK = 2.0
MIN_QUIET = 30  # writes with no bulk work running: fewer, and there is nothing to compare with
MIN_BUSY = 8  # writes in the recent window: fewer, and agents are nearly idle (nobody to leave room for)


@dataclass(frozen=True, slots=True)
class Strain:
    """Agents' write latency with bulk work running against without."""

    quiet_p99: float  # seconds: over the last writes made while no bulk work ran
    quiet_writes: int
    busy_p99: float  # seconds: over the last seconds of writes, made while bulk work ran
    busy_writes: int


def next_pause(pause: float, strain: Strain, target: float, work_seconds: float) -> float:
    """The rest before bulk work's next page, the last one having taken `work_seconds`: doubled (from PAUSE_STEP, up
    to PAUSE_MAX and to REST_PER_WORK times the page) while the agents' p99 is above `target` times their p99 with no
    bulk work; cut by a quarter while it is not, or while either figure rests on too few writes; none at all with
    `target` 0 (the operator turned it off)."""
    if target <= 0:
        return 0.0
    if strain.quiet_writes >= MIN_QUIET and strain.busy_writes >= MIN_BUSY \
            and strain.busy_p99 > target * strain.quiet_p99:
        return min(PAUSE_MAX, max(PAUSE_STEP, REST_PER_WORK * work_seconds), max(PAUSE_STEP, 2 * pause))
    shorter = 0.75 * pause
    return shorter if shorter >= PAUSE_STEP / 2 else 0.0
