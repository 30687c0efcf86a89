"""Where each read goes (docs/design.md, Phases and Shadow reads).

A scope's reads go to the store it is placed on (proxy.engine.placement). For the scopes a migration moves: before
DualWrite they go to the primary (the store that decides their answers); in DualWrite a fraction of reads (chosen by a
hash of scope and request) is served by the secondary, except in scopes with a pending repair, where the secondary
may still lack one of the caller's acknowledged writes. A secondary that fails a read is counted and the primary
answers instead. Any read may also be shadowed on the other store (`ShadowReader`), after the caller has its answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TypeVar

from adapters.base import Backend
from adapters.errors import StoreUnavailable
from policies.rules import Observations
from proxy.engine import phases
from proxy.engine.control import Phase
from proxy.engine.migration import MigrationEngine
from proxy.routing.reads import ReadOp
from proxy.routing.shadow import ShadowReader, sampled

T = TypeVar("T")


@dataclass(slots=True)
class ReadCounters:
    served_by_secondary: int = 0
    fallbacks: int = 0  # secondary failed, primary answered


class ReadRouting:
    def __init__(self, engine: MigrationEngine, shadow: ShadowReader, observations: Observations) -> None:
        self._engine = engine
        self._shadow = shadow
        self._observations = observations
        self.counters = ReadCounters()

    async def _call(self, op: ReadOp[T], store: Backend, role: str) -> tuple[T, float]:
        """The store's answer (traced and timed as `role`) and how long it took."""
        start = time.perf_counter()
        with self._engine.telemetry.store_call(role, self._engine.stores.system(store), op.operation):
            answer = await op.run(store)
        return answer, time.perf_counter() - start

    async def read(self, op: ReadOp[T]) -> T:
        engine, state = self._engine, self._engine.state
        # Scopes the migration does not move are read from their own store alone; an unreachable new store gets none.
        primary = engine.stores.store_for(op.scope)
        other = engine.secondary_reachable if phases.moves(state, op.scope) else None
        if other is None:
            return (await self._call(op, primary, "primary"))[0]
        identity = op.identity()
        shadowed = sampled(op.scope, identity, state.shadow_rate, "shadow")
        if (state.phase == Phase.DUAL_WRITE and state.read_fraction > 0 and not engine.repairs.scope_pending(op.scope)
                and sampled(op.scope, identity, state.read_fraction, "route")):
            answer = await self._from_secondary(op, other)
            if answer is not None:
                if shadowed:
                    self._shadow.schedule(op, answer[0], False, answer[1], primary, engine.stores.system(primary))
                return answer[0]
        result, took = await self._call(op, primary, "primary")
        if shadowed:
            self._shadow.schedule(op, result, True, took, other, engine.stores.system(other))
        return result

    async def _from_secondary(self, op: ReadOp[T], store: Backend) -> tuple[T, float] | None:
        """The secondary's answer and how long it took, or None (counted) when it failed."""
        try:
            answer = await self._call(op, store, "secondary")
        except ValueError:
            raise  # the request itself is bad (a foreign page token): the primary would refuse it too
        except Exception as exc:
            if isinstance(exc, StoreUnavailable):
                self._engine.outage.report(exc)  # an outage, not a wrong answer: not counted against the store
            else:
                self._observations.secondary_call(time.time(), error=True)
            self.counters.fallbacks += 1
            self._engine.telemetry.read_fallbacks.add(1, {"rpc.method": op.operation})
            return None
        self._observations.secondary_call(time.time(), error=False)
        self.counters.served_by_secondary += 1
        return answer
