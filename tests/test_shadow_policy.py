"""Shadow reads, the read ramp and the rollback policy, end to end over real gRPC with real embedded stores.

The secondary is a real store behind a wrapper that can corrupt, stall or fail its reads, the way a store with a
broken index or a saturated disk would. Decisions are awaited through the admin API and ordered with events, never
with wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from adapters.base import Backend
from adapters.embedder import BatchingEmbedder
from adapters.errors import StoreUnavailable
from adapters.model import Entity, Graph, GraphPage, SearchResult
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import memory_pb2 as pb
from tests.cluster import AUTH, Cluster, boot, seed, shutdown, status, wait_for

READS = {"read_graph", "search_nodes", "open_nodes", "semantic_search"}


@dataclass
class ReadFaults:
    corrupt: bool = False  # drop every 4th entity (by name hash) from answers and alter the observations of another
    fail: bool = False  # reads raise an error: the store answers, wrongly
    out: bool = False  # reads find the store unreachable: an outage
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # cleared: reads wait (a stalled store)
    events: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gate.set()


def _bucket(name: str) -> int:
    return hashlib.sha1(name.encode()).digest()[0] % 4


def _corrupt_entities(es: tuple[Entity, ...]) -> tuple[Entity, ...]:
    kept = [e for e in es if _bucket(e.name) != 0]
    return tuple(replace(e, observations=(*e.observations, "bit rot")) if _bucket(e.name) == 1 else e for e in kept)


def _corrupt(answer: Any) -> Any:
    if isinstance(answer, Graph | GraphPage):
        return replace(answer, entities=_corrupt_entities(answer.entities))
    if isinstance(answer, SearchResult):
        hits = [h for h in answer.results if _bucket(h.entity.name) != 0]
        return replace(answer, results=tuple(hits))
    return answer


class FaultyReads:
    """A real store whose reads can be corrupted, stalled or failed; writes pass straight through."""

    def __init__(self, inner: Backend, faults: ReadFaults) -> None:
        self._inner, self._faults = inner, faults

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name == "get_records":  # what the outage probe asks: unreachable during an outage, like every call

            async def probe(*args: Any, **kwargs: Any) -> Any:
                if self._faults.out:
                    raise StoreUnavailable("injected outage: connection refused")
                return await attr(*args, **kwargs)

            return probe
        if name not in READS:
            return attr

        async def read(*args: Any, **kwargs: Any) -> Any:
            f = self._faults
            f.events.append("secondary-read-start")
            try:
                await f.gate.wait()
                if f.out:
                    raise StoreUnavailable("injected outage: connection refused")
                if f.fail:
                    raise RuntimeError("injected read failure")
                answer = await attr(*args, **kwargs)
                return _corrupt(answer) if f.corrupt else answer
            finally:
                f.events.append("secondary-read-end")

        return read


def policy_file(d: Path, action: str = "rollback", max_concurrency: int = 8) -> str:
    rules = [
        {"name": "mismatch-rate", "metric": "mismatch_rate", "threshold": 0.001, "window_seconds": 60,
         "min_samples": 20, "consecutive": 2, "action": action, "phases": ["DualWrite", "Completed"]},
        {"name": "secondary-error-rate", "metric": "error_rate", "threshold": 0.01, "window_seconds": 60,
         "min_samples": 20, "consecutive": 2, "action": action},
    ]
    path = d / "policy.yaml"
    path.write_text(yaml.safe_dump({
        "evaluate_every_seconds": 0.05, "shadow": {"max_concurrency": max_concurrency, "timeout_seconds": 30},
        "ramp": {"steps": [0.25, 0.5, 1.0], "interval_seconds": 0.2}, "rules": rules}))
    return str(path)


async def start(embedder: BatchingEmbedder, d: Path, faults: ReadFaults, **kw: Any) -> Cluster:
    def wrap(spec: str, store: Backend) -> Backend:
        return FaultyReads(store, faults) if spec.endswith("/new.db") else store  # type: ignore[return-value]

    return await boot(embedder, d, wrap_store=wrap, policy_file=policy_file(d, **kw))


async def to_dual_write(c: Cluster, shadow_rate: float = 1.0, entities: int = 40) -> None:
    await seed(c, entities)
    await c.admin.StartMigration(apb.StartMigrationRequest(target=c.target, batch_size=50), metadata=AUTH)
    await wait_for(c, lambda s: s.backfill.complete)
    await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
    await c.admin.SetReadRouting(apb.SetReadRoutingRequest(shadow_sample_rate=shadow_rate), metadata=AUTH)


async def read_each(c: Cluster, entities: int = 40) -> None:
    for i in range(entities):
        await c.memory.OpenNodes(pb.OpenNodesRequest(scope="seed", names=[f"s{i:04d}"]))


async def read_until(c: Cluster, done: Any, limit_s: float = 60) -> apb.MigrationStatus:
    """Keep agents reading until the status satisfies `done`."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        await read_each(c)
        st = await status(c)
        if done(st):
            return st
        assert asyncio.get_running_loop().time() < deadline, f"timed out; status: {st}"


def policy_entries(st: apb.MigrationStatus | apb.GetHistoryResponse) -> list[apb.PhaseChange]:
    changes = st.changes if isinstance(st, apb.GetHistoryResponse) else st.recent_history
    return [h for h in changes if h.actor == "memshift-policy"]


@pytest.fixture
def faults() -> ReadFaults:
    return ReadFaults()


@pytest.fixture
async def rollback_cluster(embedder: BatchingEmbedder, tmp_path: Path, faults: ReadFaults) -> AsyncIterator[Cluster]:
    c = await start(embedder, tmp_path, faults)
    yield c
    await shutdown(c)


async def test_corrupting_secondary_is_rolled_back_by_the_policy(rollback_cluster: Cluster,
                                                                 faults: ReadFaults) -> None:
    c = rollback_cluster
    await to_dual_write(c)
    faults.corrupt = True
    st = await read_until(c, lambda s: s.phase == apb.ROLLED_BACK)
    [entry] = [h for h in policy_entries(st) if h.to_phase == apb.ROLLED_BACK]
    assert entry.from_phase == apb.DUAL_WRITE and "mismatch-rate" in entry.reason
    assert float(entry.figures["value"]) > 0.001 and int(entry.figures["samples"]) >= 20
    assert entry.figures["window_seconds"] == "60.0"
    # The operator can see what differed: both answers, newest first.
    found = await c.admin.ListMismatches(apb.ListMismatchesRequest(limit=5, operation="OpenNodes"), metadata=AUTH)
    assert found.total_mismatches >= 2 and 1 <= len(found.samples) <= 5
    sample = found.samples[0]
    assert sample.scope == "seed" and sample.primary != sample.secondary and "only on the" in sample.detail
    # Back on the old primary, nothing lost, writes work.
    graph = await c.memory.ReadGraph(pb.ReadGraphRequest(scope="seed", page_size=1000))
    assert len(graph.entities) == 40 and all("bit rot" not in e.observations for e in graph.entities)
    await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope="seed", entities=[
        pb.Entity(name="n", entity_type="t")]))
    # What the operator sees first: the status leads with the rollback (when, by whom, the rule and its figures),
    # and a phase change that the rollback made impossible says why.
    st = await status(c)
    assert "by memshift-policy: rule mismatch-rate" in st.rolled_back
    from proxy.cli.admin import render
    assert render(st).startswith("ROLLED BACK ") and "rule mismatch-rate" in render(st).splitlines()[0]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DUAL_WRITE), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "(rolled back " in (err.value.details() or "") and "mismatch-rate" in (err.value.details() or "")


async def test_alert_only_policy_records_and_keeps_the_migration(embedder: BatchingEmbedder, tmp_path: Path) -> None:
    faults = ReadFaults()
    c = await start(embedder, tmp_path, faults, action="alert")
    try:
        await to_dual_write(c)
        faults.corrupt = True
        st = await read_until(c, lambda s: any("alert" in h.reason for h in policy_entries(s)))
        assert st.phase == apb.DUAL_WRITE
        [rule] = [r for r in st.policy if r.name == "mismatch-rate"]
        assert rule.verdict == "breach" and rule.action == "alert"
        alerts = [h for h in policy_entries(await c.admin.GetHistory(apb.GetHistoryRequest(), metadata=AUTH))
                  if "mismatch-rate" in h.reason]
        assert len(alerts) == 1, "one alert per breach episode, not one per evaluation"
        await read_each(c)
        assert (await status(c)).phase == apb.DUAL_WRITE
    finally:
        await shutdown(c)


async def test_without_traffic_nothing_fires(rollback_cluster: Cluster, faults: ReadFaults) -> None:
    c = rollback_cluster
    await to_dual_write(c)
    faults.corrupt = faults.fail = True  # a broken secondary, but nobody reads
    guard = c.server.guard
    target = guard.evaluations + 10
    st = await wait_for(c, lambda _: guard.evaluations >= target, 10)
    assert st.phase == apb.DUAL_WRITE and not policy_entries(st)
    assert {r.verdict for r in st.policy} == {"no-data"}


async def test_stalled_shadow_reads_never_delay_callers_and_saturation_drops_them(
        embedder: BatchingEmbedder, tmp_path: Path) -> None:
    faults = ReadFaults()
    c = await start(embedder, tmp_path, faults, max_concurrency=2)
    try:
        await to_dual_write(c)
        faults.events.clear()
        faults.gate.clear()  # the secondary stalls
        first = await c.memory.OpenNodes(pb.OpenNodesRequest(scope="seed", names=["s0001"]))
        faults.events.append("caller-answered")
        assert [e.name for e in first.entities] == ["s0001"]
        for i in range(2, 6):  # one more fills the bound; the other three are dropped
            await c.memory.OpenNodes(pb.OpenNodesRequest(scope="seed", names=[f"s{i:04d}"]))
        st = await wait_for(c, lambda s: s.shadow.started == 2 and s.shadow.dropped == 3, 10)
        assert faults.events.count("secondary-read-start") == 2
        assert "secondary-read-end" not in faults.events, "callers were answered while the shadow reads hung"
        faults.gate.set()
        st = await wait_for(c, lambda s: s.shadow.matched == 2, 10)
        assert faults.events.index("caller-answered") < faults.events.index("secondary-read-end")
        assert st.shadow.mismatched == 0 and st.shadow.errors == 0
    finally:
        faults.gate.set()
        await shutdown(c)


async def test_secondary_read_failures_fall_back_to_the_primary(embedder: BatchingEmbedder, tmp_path: Path) -> None:
    faults = ReadFaults()
    c = await start(embedder, tmp_path, faults, action="alert")
    try:
        await to_dual_write(c, shadow_rate=0.0)
        await c.admin.SetReadRouting(apb.SetReadRoutingRequest(read_fraction=1.0), metadata=AUTH)
        await read_each(c, 10)
        assert (await status(c)).reads.served_by_secondary == 10
        faults.fail = True
        for i in range(10):
            graph = await c.memory.OpenNodes(pb.OpenNodesRequest(scope="seed", names=[f"s{i:04d}"]))
            assert [e.name for e in graph.entities] == [f"s{i:04d}"]
        st = await status(c)
        assert st.reads.fallbacks == 10 and st.reads.served_by_secondary == 10
    finally:
        await shutdown(c)


async def test_an_unreachable_secondary_holds_reads_on_the_primary_without_counting_against_it(
        embedder: BatchingEmbedder, tmp_path: Path) -> None:
    """An outage is not a wrong answer: the first read that finds the new store unreachable falls back, and from then
    on reads and shadow reads stay on the primary, the error-rate rule sees nothing, until the store answers."""
    faults = ReadFaults()
    c = await start(embedder, tmp_path, faults, action="rollback")
    try:
        await to_dual_write(c, shadow_rate=1.0)
        await c.admin.SetReadRouting(apb.SetReadRoutingRequest(read_fraction=1.0, shadow_sample_rate=1.0),
                                     metadata=AUTH)
        faults.out = True
        for i in range(40):
            graph = await c.memory.OpenNodes(pb.OpenNodesRequest(scope="seed", names=[f"s{i % 10:04d}"]))
            assert [e.name for e in graph.entities] == [f"s{i % 10:04d}"]
        st = await status(c)
        assert st.reads.fallbacks == 1 and st.secondary_unreachable.startswith("StoreUnavailable: injected outage")
        assert st.phase == apb.DUAL_WRITE  # not rolled back: nothing was wrong, only unreachable
        await asyncio.sleep(0.3)  # several policy evaluations
        assert (await status(c)).phase == apb.DUAL_WRITE
        faults.out = False  # the probe (a real read of the store) answers again
        st = await read_until(c, lambda s: s.secondary_unreachable == "", 10)
        await read_each(c, 4)
        st = await status(c)
        assert st.reads.served_by_secondary >= 4 and st.phase == apb.DUAL_WRITE
        history = [h.reason for h in (await c.admin.GetHistory(apb.GetHistoryRequest(), metadata=AUTH)).changes]
        assert any(r.startswith("new store unreachable (StoreUnavailable: injected outage") for r in history)
        assert any(r.startswith("new store reachable again after") for r in history)
    finally:
        await shutdown(c)


async def test_ramp_steps_only_while_the_policy_passes_and_stops_on_a_breach(
        embedder: BatchingEmbedder, tmp_path: Path) -> None:
    faults = ReadFaults()
    c = await start(embedder, tmp_path, faults, action="pause")
    try:
        await to_dual_write(c)
        st = await c.admin.SetReadRouting(apb.SetReadRoutingRequest(ramp=True, shadow_sample_rate=1.0), metadata=AUTH)
        assert st.ramp.running and st.read_fraction == 0.25 and list(st.ramp.steps) == [0.25, 0.5, 1.0]
        # No traffic: the interval passes but nothing was judged, so the ramp holds.
        st = await wait_for(c, lambda s: "not enough samples" in s.ramp.note, 10)
        assert st.read_fraction == 0.25 and st.ramp.step == 0
        # Healthy traffic: every step passes.
        st = await read_until(c, lambda s: not s.ramp.running and "complete" in s.ramp.note)
        assert st.read_fraction == 1.0 and st.phase == apb.DUAL_WRITE
        steps = [h.reason for h in policy_entries(await c.admin.GetHistory(apb.GetHistoryRequest(), metadata=AUTH))]
        assert any("serving 50%" in r for r in steps) and any("serving 100%" in r for r in steps)
        # A new ramp, a breach: it stops where it is and the policy pauses.
        await c.admin.SetReadRouting(apb.SetReadRoutingRequest(ramp=True, ramp_steps=[0.1, 1.0],
                                                               ramp_interval_seconds=3600, shadow_sample_rate=1.0),
                                     metadata=AUTH)
        faults.corrupt = True
        st = await read_until(c, lambda s: any(h.reason.startswith("paused: rule mismatch-rate")
                                               for h in policy_entries(s)))
        assert not st.ramp.running and st.read_fraction == 0.1 and st.phase == apb.DUAL_WRITE
        assert "breached" in st.ramp.note or "stopped by policy" in st.ramp.note
    finally:
        await shutdown(c)


async def test_bad_ramp_and_routing_requests_are_refused(rollback_cluster: Cluster) -> None:
    import grpc
    c = rollback_cluster
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.admin.SetReadRouting(apb.SetReadRoutingRequest(ramp=True), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "NotStarted" in (err.value.details() or "")
    await to_dual_write(c)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.admin.SetReadRouting(apb.SetReadRoutingRequest(ramp_steps=[0.5, 0.2]), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ramp_steps" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.admin.ListMismatches(apb.ListMismatchesRequest(limit=-1), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await status(c)).read_fraction == 0.0


async def test_cli_ramps_shows_the_policy_and_lists_mismatches(rollback_cluster: Cluster, faults: ReadFaults,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli.main import main
    c = rollback_cluster
    base = ["admin", "--admin-target", f"127.0.0.1:{c.server.admin_port}", "--token", c.server.admin_token]
    await to_dual_write(c)

    async def cli(*args: str) -> tuple[int, str]:
        code = await asyncio.to_thread(main, [*base, *args])
        return code, capsys.readouterr().out

    code, out = await cli("route", "--ramp", "0.1,0.5,1", "--interval", "3600", "--shadow-rate", "1")
    assert code == 0 and "ramp       step 1/3  [10% → 50% → 100%]" in out
    assert "reads      10% from secondary" in out
    faults.corrupt = True
    await read_until(c, lambda s: s.phase == apb.ROLLED_BACK)
    code, out = await cli("mismatches", "--limit", "2")
    assert code == 0 and out.count("primary:   ") == 2 and "mismatches seen by this proxy" in out
    code, out = await cli("history")
    assert "DualWrite -> RolledBack  by memshift-policy: rule mismatch-rate" in out
    with pytest.raises(SystemExit, match="--ramp takes fractions"):
        await cli("route", "--ramp", "0.5,oops")
