"""No single record can wedge a migration: a record the new store refuses for good pauses it, naming the key and
the store's reason in the status, the history and the log, instead of retrying forever."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapters.base import Backend, VectorMap
from adapters.embedded import EmbeddedBackend
from adapters.embedder import BatchingEmbedder
from adapters.model import Entity
from adapters.records import Record
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import memory_pb2 as pb
from tests.cluster import AUTH, boot, run_verify, shutdown, status, wait_for


async def test_a_record_postgresql_cannot_hold_pauses_the_backfill_with_its_key_and_reason(
        embedder: BatchingEmbedder, tmp_path: Path, servers: dict[str, str],
        caplog: pytest.LogCaptureFixture) -> None:
    """The embedded store holds a NUL character written before the API refused it; PostgreSQL's text type cannot
    hold one. The copy used to retry that batch every second, forever."""
    legacy = EmbeddedBackend(tmp_path / "old.db", embedder)
    await legacy.open()
    await legacy.create_entities("legacy", [Entity(f"e{i:03d}", "note", (f"fact {i}",)) for i in range(120)], 1)
    await legacy.create_entities("legacy", [Entity("bad", "note", ("nul \x00 inside",))], 2)
    await legacy.close()
    caplog.set_level(logging.INFO)
    c = await boot(embedder, tmp_path)
    try:
        target = f"{servers['postgres']}?schema=refused_{tmp_path.name[-6:]}"
        await c.admin.StartMigration(apb.StartMigrationRequest(target=target, batch_size=50), metadata=AUTH)
        st = await wait_for(c, lambda s: s.blocked != "", 60)
        assert st.backfill.paused and not st.backfill.complete
        assert st.blocked_key == "observation:legacy:bad/nul \\x00 inside"
        assert "the new store refuses observation:legacy:bad/nul \\x00 inside (backfill)" in st.blocked
        assert "0x00" in st.blocked or "\\u0000" in st.blocked or "NUL" in st.blocked.upper(), st.blocked
        history = await c.admin.GetHistory(apb.GetHistoryRequest(), metadata=AUTH)
        assert any(h.reason == f"paused: {st.blocked}" for h in history.changes)
        assert any(r.getMessage() == "migration paused: the new store refuses a record" for r in caplog.records)
        done = st.backfill.done
        await asyncio.sleep(1.5)  # paused means paused: no retry loop behind it
        again = await status(c)
        assert again.backfill.done == done and again.blocked == st.blocked
        # The operator's fix goes through the API. It cannot even name the NUL observation (the API refuses the
        # value), so the entity goes, its observations with it; then the backfill is resumed.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.memory.DeleteObservations(pb.DeleteObservationsRequest(scope="legacy", deletions=[
                pb.ObservationDeletion(entity_name="bad", observations=["nul \x00 inside"])]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await c.memory.DeleteEntities(pb.DeleteEntitiesRequest(scope="legacy", entity_names=["bad"]))
        st = await c.admin.ResumeBackfill(apb.ResumeBackfillRequest(), metadata=AUTH)
        assert st.blocked == "" and not st.backfill.paused
        st = await wait_for(c, lambda s: s.backfill.complete or s.blocked != "", 60)
        assert st.backfill.complete, st.blocked
        result = await run_verify(c)
        assert result.differences == 0, list(result.samples)
    finally:
        await shutdown(c)


class Refusing:
    """A real store that refuses, for good, any write touching one entity name (as a store refuses a value it
    cannot hold); everything else goes through to the store."""

    def __init__(self, store: Backend, name: str) -> None:
        self._store = store
        self.name_refused = name
        self.refusing = True

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._store, attr)

    def _check(self, text: str) -> None:
        if self.refusing and self.name_refused in text:
            raise ValueError(f"value out of range for this store: {self.name_refused!r}")

    async def create_entities(self, scope: str, entities: Sequence[Entity], version: int) -> Any:
        self._check(repr([e.name for e in entities]))
        return await self._store.create_entities(scope, entities, version)

    async def apply(self, records: Sequence[Record], vectors: VectorMap | None = None) -> int:
        self._check(repr(records))
        return await self._store.apply(records, vectors)

    async def load(self, records: Sequence[Record], vectors: VectorMap | None = None) -> int:
        self._check(repr(records))
        return await self._store.load(records, vectors)

    async def replace_if(self, fixes: Any) -> Any:
        self._check(repr(fixes))
        return await self._store.replace_if(fixes)


async def test_a_refused_repair_pauses_with_its_key_and_clears_once_repaired(
        embedder: BatchingEmbedder, tmp_path: Path) -> None:
    wrapped: dict[str, Refusing] = {}

    def wrap(spec: str, store: Backend) -> Backend:
        if spec.endswith("new.db"):
            wrapped["new"] = Refusing(store, "poison")
            return wrapped["new"]  # type: ignore[return-value]
        return store

    c = await boot(embedder, tmp_path, wrap_store=wrap)
    try:
        await c.admin.StartMigration(apb.StartMigrationRequest(target=c.target), metadata=AUTH)
        await wait_for(c, lambda s: s.backfill.complete, 30)
        await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DATA_MIGRATION), metadata=AUTH)
        for name in ("fine-1", "poison", "fine-2"):  # acknowledged: the primary took them
            await c.memory.CreateEntities(pb.CreateEntitiesRequest(scope="s", entities=[
                pb.Entity(name=name, entity_type="t", observations=["x"])]))
        st = await wait_for(c, lambda s: s.blocked != "", 30)
        assert st.blocked_key == "entity:s:poison" and "ValueError: value out of range" in st.blocked
        assert "(repair)" in st.blocked
        st = await wait_for(c, lambda s: s.repair_queue_depth <= 2, 30)  # the others were repaired meanwhile
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.admin.Advance(apb.AdvanceRequest(expected_phase=apb.DUAL_WRITE), metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # nothing is cut over with a key owed
        wrapped["new"].refusing = False  # the store is fixed (or the record made acceptable)
        result = await run_verify(c, repair=True)  # queues the differing keys again, due at once, and waits
        assert result.repaired == 2 and result.differences == 0
        st = await wait_for(c, lambda s: s.blocked == "" and s.repair_queue_depth == 0, 30)
        assert (await run_verify(c)).differences == 0
        history = await c.admin.GetHistory(apb.GetHistoryRequest(), metadata=AUTH)
        assert any(h.reason.startswith("unblocked: ") and ":s:poison" in h.reason for h in history.changes)
    finally:
        await shutdown(c)
