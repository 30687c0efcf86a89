"""Shadow reads: the same read on the other store, compared in the background (docs/design.md, Shadow reads).

A shadow read never delays its caller. It is registered with `after_reply` and launched only once gRPC reports the
RPC finished (its answer and status sent), runs under a concurrency bound and a timeout, and is dropped and counted
when the bound is reached rather than queued. Which reads are shadowed is decided by a hash of scope and request, so
the same request is sampled the same way on every proxy and every retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context

from adapters.base import BACKGROUND, Backend
from adapters.errors import StoreUnavailable
from policies.comparators import CompareSettings
from policies.loader import ShadowSettings
from policies.rules import Observations
from proxy.routing.reads import ReadOp, answer_text
from proxy.runtime.telemetry import Telemetry

log = logging.getLogger("memshift.shadow")

_after_reply: ContextVar[list[Callable[[], None]] | None] = ContextVar("memshift_after_reply", default=None)


def collect_after_reply() -> tuple[list[Callable[[], None]], Any]:
    """Called by the RPC layer before a handler runs: what the handler registers lands in the returned list, to be
    run when the RPC has finished. Returns the list and the token to reset the context variable with."""
    hooks: list[Callable[[], None]] = []
    return hooks, _after_reply.set(hooks)


def reset_after_reply(token: Any) -> None:
    _after_reply.reset(token)


def after_reply(fn: Callable[[], None]) -> None:
    """Run `fn` once the caller has its answer; outside an RPC (direct use), on the next loop iteration."""
    hooks = _after_reply.get()
    if hooks is None:
        asyncio.get_running_loop().call_soon(fn)
    else:
        hooks.append(fn)


def sampled(scope: str, identity: str, rate: float, salt: str) -> bool:
    """Deterministic sampling: the same scope and request always fall on the same side of `rate`."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(f"{salt}\x1f{scope}\x1f{identity}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


@dataclass(frozen=True, slots=True)
class MismatchSample:
    at: float
    operation: str
    scope: str
    request: str
    primary: str  # the primary's answer as JSON (cut at 8 KiB)
    secondary: str
    detail: str


@dataclass(frozen=True, slots=True)
class _ShadowJob:
    op: ReadOp[Any]
    answer: Any  # what the caller got
    served_by_primary: bool  # True: the shadow runs on the secondary; False: on the primary
    served_seconds: float  # how long the caller's store took, for the added-latency rule
    other: Backend
    other_system: str
    parent: Any  # the RPC's trace context: the shadow span is its child though it runs after the reply


@dataclass(slots=True)
class ShadowCounters:
    started: int = 0
    matched: int = 0
    mismatched: int = 0
    errors: int = 0
    timeouts: int = 0
    dropped: int = 0


class ShadowReader:
    def __init__(self, settings: ShadowSettings, compare: CompareSettings, observations: Observations,
                 telemetry: Telemetry, max_samples: int = 200,
                 unreachable: Callable[[BaseException], None] | None = None) -> None:
        self._settings = settings
        self._unreachable = unreachable  # told when the new store is out (proxy.engine.outage), instead of an error
        self._compare = compare
        self._observations = observations
        self._telemetry = telemetry
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.samples: deque[MismatchSample] = deque(maxlen=max_samples)
        self.counters = ShadowCounters()

    def schedule(self, op: ReadOp[Any], answer: Any, served_by_primary: bool, served_seconds: float,
                 other: Backend, other_system: str) -> None:
        """After the reply, read `op` from `other` and compare with `answer` (what the caller got)."""
        job = _ShadowJob(op, answer, served_by_primary, served_seconds, other, other_system,
                         otel_context.get_current())
        after_reply(lambda: self._launch(job))

    def _launch(self, job: _ShadowJob) -> None:
        op = job.op
        if self._running >= self._settings.max_concurrency:
            self.counters.dropped += 1
            self._telemetry.shadow_reads.add(1, {"rpc.method": op.operation, "memshift.outcome": "dropped"})
            return
        self._running += 1
        self.counters.started += 1
        task = asyncio.ensure_future(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running -= 1
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("shadow read crashed", exc_info=task.exception())

    async def _run(self, job: _ShadowJob) -> None:
        op, answer, served_by_primary, served_seconds = job.op, job.answer, job.served_by_primary, job.served_seconds
        BACKGROUND.set(True)  # this task's own context: the store keeps the read off the event loop
        outcome = "match"
        start = time.perf_counter()
        try:
            with self._telemetry.store_call("shadow", job.other_system, op.operation, parent=job.parent):
                async with asyncio.timeout(self._settings.timeout_seconds):  # no extra task, unlike wait_for
                    theirs = await op.run(job.other)
        except TimeoutError:
            outcome = "timeout"
        except StoreUnavailable as exc:
            outcome = "unreachable"
            if served_by_primary and self._unreachable is not None:
                self._unreachable(exc)
        except Exception as exc:
            outcome = "error"
            log.debug("shadow read failed", extra={"rpc": op.operation, "error": repr(exc)})
        took = time.perf_counter() - start
        now = time.time()
        if outcome == "unreachable":
            self.counters.errors += 1  # an outage: not held against the store by the rollback policy
        elif outcome != "match":
            if outcome == "timeout":
                self.counters.timeouts += 1
            else:
                self.counters.errors += 1
            if served_by_primary:  # the shadow ran on the secondary: its failure is the secondary's
                self._observations.secondary_call(now, error=True)
        else:
            if served_by_primary:
                self._observations.secondary_call(now, error=False)
                self._observations.latency_pair(now, served_seconds, took)
            else:
                self._observations.latency_pair(now, took, served_seconds)
            primary, secondary = (answer, theirs) if served_by_primary else (theirs, answer)
            result = op.compare(primary, secondary, self._compare)
            self._observations.comparison(now, mismatch=not result.match)
            if result.match:
                self.counters.matched += 1
            else:
                outcome = "mismatch"
                self.counters.mismatched += 1
                self._telemetry.shadow_mismatches.add(1, {"rpc.method": op.operation})
                self.samples.append(MismatchSample(now, op.operation, op.scope, op.identity(),
                                                   answer_text(primary), answer_text(secondary), result.detail))
        self._telemetry.shadow_reads.add(1, {"rpc.method": op.operation, "memshift.outcome": outcome})

    async def drain(self, within: float = 5.0) -> None:
        """Wait for running shadow reads (tests, shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.drain(1.0)
