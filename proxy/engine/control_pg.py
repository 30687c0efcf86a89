"""The control store on PostgreSQL: one migration shared by a fleet of proxies (docs/design.md, Fleet).

Everything the SQLite store holds, plus what a fleet needs:
- Phase changes stay compare-and-set on the state's revision, and each one is broadcast with `pg_notify` in the same
  transaction (delivered only if it commits). Proxies LISTEN on a connection of their own; a notification only
  wakes them to re-read, and they re-read on a timer anyway, so a missed one heals within a heartbeat.
- `proxies` has one row per proxy: the phase, migration and revision it has applied (its acknowledgement) and its
  last heartbeat. A row whose heartbeat is older than the lease is not live.
- The backfill leader holds a session-level advisory lock on a connection of its own: when its process dies,
  PostgreSQL drops the connection and the lock with it, and the next proxy to try takes over from the checkpoint.
- Repairs are claimed with `FOR UPDATE SKIP LOCKED`, and a claim pushes the item's next attempt out by a lease, so
  two proxies never work the same key at once and a dead proxy's claims come due again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import asyncpg

from adapters.errors import Conflict
from adapters.postgres import connection
from adapters.records import RecordKey
from adapters.specs import StoreSpec, redact
from proxy.engine.control import (
    HistoryEntry,
    Member,
    MigrationState,
    Phase,
    RepairItem,
    key_json,
    key_load,
    state_json,
    state_load,
)

log = logging.getLogger("memshift.control")
CHANNEL = "memshift_control"
_LEADER_LOCK = 0x6D656D7368696674  # "memshift": the backfill leader's advisory lock

_DDL = """
CREATE TABLE IF NOT EXISTS state (id int PRIMARY KEY CHECK (id = 1), revision bigint NOT NULL, body text NOT NULL);
CREATE TABLE IF NOT EXISTS history (id bigserial PRIMARY KEY, at double precision, from_phase text, to_phase text,
    actor text, reason text, figures text);
CREATE TABLE IF NOT EXISTS repairs (id bigserial PRIMARY KEY, migration_id bigint NOT NULL, key text NOT NULL,
    attempts int NOT NULL DEFAULT 0, next_at double precision NOT NULL DEFAULT 0, last_error text NOT NULL DEFAULT '',
    scope text NOT NULL, UNIQUE (migration_id, key));
CREATE TABLE IF NOT EXISTS proxies (node text PRIMARY KEY, address text NOT NULL, phase text NOT NULL,
    migration_id bigint NOT NULL, revision bigint NOT NULL, leader boolean NOT NULL,
    heartbeat_at timestamptz NOT NULL DEFAULT now());
ALTER TABLE proxies ADD COLUMN IF NOT EXISTS clock bigint NOT NULL DEFAULT 0;
"""


class PostgresControlStore:
    def __init__(self, spec: StoreSpec | str, initial_primary: str, lease_seconds: float = 5.0) -> None:
        # The same spec syntax as the PostgreSQL store (password_file, $PGPASSWORD), in a schema of its own.
        self._dsn, self._schema = connection(spec, default_schema="memshift_control")
        self._initial_primary = initial_primary
        self.lease_seconds = lease_seconds
        self._pool: Any = None
        self._listener: Any = None
        self._leader: Any = None  # the connection that asks for, and once taken holds, the leader's lock
        self._leading = False

    async def open(self) -> None:
        # Commits wait for their WAL flush whatever the server's default: a phase change or a queued repair lost with
        # the server's power would be a lost write. Only checkpoints opt out, one transaction at a time (save).
        settings = {"search_path": f'"{self._schema}"', "synchronous_commit": "on"}
        conn = await asyncpg.connect(self._dsn)
        try:
            async with conn.transaction():
                # Proxies starting together race on `IF NOT EXISTS` (a unique violation on pg_namespace): one at a time.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('memshift-control-schema'))")
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
                await conn.execute(f'SET search_path TO "{self._schema}"')
                await conn.execute(_DDL)
                first = MigrationState(primary=self._initial_primary)
                await conn.execute("INSERT INTO state VALUES (1, 0, $1) ON CONFLICT (id) DO NOTHING", state_json(first))
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4, server_settings=settings)

    def _p(self) -> Any:
        if self._pool is None:
            raise RuntimeError("control store is not open")
        return self._pool

    # --- the ControlStore protocol ----------------------------------------------------------------------------------
    async def load(self) -> MigrationState:
        body = await self._p().fetchval("SELECT body FROM state WHERE id = 1")
        return state_load(cast(str, body), f"{redact(self._dsn)} (schema {self._schema})")

    async def save(self, state: MigrationState, expected_revision: int, durable: bool = True) -> MigrationState:
        new = replace(state, revision=expected_revision + 1)
        async with self._p().acquire() as conn, conn.transaction():
            if not durable:  # the commit returns before its WAL is flushed; a later durable commit flushes it
                await conn.execute("SET LOCAL synchronous_commit TO OFF")
            status = await conn.execute("UPDATE state SET revision = $1, body = $2 WHERE id = 1 AND revision = $3",
                                        new.revision, state_json(new), expected_revision)
            if status != "UPDATE 1":
                current = await conn.fetchval("SELECT revision FROM state WHERE id = 1")
                raise Conflict(f"state is at revision {current}, expected {expected_revision}")
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(new.revision))
        return new

    async def record(self, entry: HistoryEntry) -> None:
        await self._p().execute(
            "INSERT INTO history (at, from_phase, to_phase, actor, reason, figures) VALUES ($1, $2, $3, $4, $5, $6)",
            entry.at, entry.from_phase.value, entry.to_phase.value, entry.actor, entry.reason,
            json.dumps(entry.figures, default=str))

    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        rows = await self._p().fetch("SELECT at, from_phase, to_phase, actor, reason, figures FROM history"
                                     " ORDER BY id DESC LIMIT $1", limit)
        return [HistoryEntry(r["at"], Phase(r["from_phase"]), Phase(r["to_phase"]), r["actor"], r["reason"],
                             json.loads(r["figures"])) for r in reversed(rows)]

    async def enqueue_repairs(self, migration_id: int, keys: list[RecordKey]) -> None:
        if keys:
            await self._p().executemany(
                "INSERT INTO repairs (migration_id, key, scope) VALUES ($1, $2, $3)"
                " ON CONFLICT (migration_id, key) DO UPDATE SET next_at = 0",
                [(migration_id, key_json(k), k[1]) for k in keys])

    async def due_repairs(self, migration_id: int, limit: int) -> list[RepairItem]:
        now = time.time()
        rows = await self._p().fetch(
            "UPDATE repairs SET next_at = $3 WHERE id IN (SELECT id FROM repairs WHERE migration_id = $1"
            " AND next_at <= $2 ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)"
            " RETURNING id, key, attempts, last_error", migration_id, now, now + self.lease_seconds, limit)
        out = []
        for r in sorted(rows, key=lambda r: int(r["id"])):
            key = key_load(r["key"])
            assert key is not None
            out.append(RepairItem(int(r["id"]), key, int(r["attempts"]), str(r["last_error"])))
        return out

    async def repaired(self, ids: list[int]) -> None:
        if ids:
            await self._p().execute("DELETE FROM repairs WHERE id = ANY($1::bigint[])", ids)

    async def carry_over_repairs(self, migration_id: int) -> None:
        async with self._p().acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO repairs (migration_id, key, scope) SELECT $1, key, scope FROM repairs"
                               " WHERE migration_id <> $1 ON CONFLICT DO NOTHING", migration_id)
            await conn.execute("DELETE FROM repairs WHERE migration_id <> $1", migration_id)

    async def repair_failed(self, item: RepairItem, error: str, retry_in: float) -> None:
        await self._p().execute("UPDATE repairs SET attempts = attempts + 1, next_at = $1, last_error = $2"
                                " WHERE id = $3", time.time() + retry_in, error[:500], item.id)

    async def repair_depth(self, migration_id: int) -> int:
        return int(await self._p().fetchval("SELECT count(*) FROM repairs WHERE migration_id = $1", migration_id))

    async def repair_scopes(self, migration_id: int) -> set[str]:
        rows = await self._p().fetch("SELECT DISTINCT scope FROM repairs WHERE migration_id = $1", migration_id)
        return {str(r["scope"]) for r in rows}

    # --- the fleet -------------------------------------------------------------------------------------------------
    async def listen(self, on_change: Callable[[], None]) -> None:
        """Call `on_change` on every broadcast phase change (re-connecting if the listening connection died)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listener = await asyncpg.connect(self._dsn)
        await self._listener.add_listener(CHANNEL, lambda *_: on_change())

    async def heartbeat(self, node: str, address: str, state: MigrationState, leader: bool, clock: int = 0) -> None:
        """This proxy is alive and has applied `state` (its acknowledgement); `clock` is its clock's reading when
        it acknowledged, above every version it stamped before."""
        await self._p().execute(
            "INSERT INTO proxies (node, address, phase, migration_id, revision, leader, clock, heartbeat_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, now()) ON CONFLICT (node) DO UPDATE SET address = $2, phase = $3,"
            " migration_id = $4, revision = $5, leader = $6, clock = $7, heartbeat_at = now()",
            node, address, state.phase.value, state.migration_id, state.revision, leader, clock)

    async def members(self) -> list[Member]:
        rows = await self._p().fetch(
            "SELECT node, address, phase, migration_id, revision, leader, clock,"
            " extract(epoch FROM now() - heartbeat_at)::float8 AS age FROM proxies ORDER BY node")
        out = []
        for r in rows:
            age = float(r["age"])
            live = age < self.lease_seconds
            out.append(Member(r["node"], r["address"], Phase(r["phase"]), int(r["migration_id"]),
                              int(r["revision"]), bool(r["leader"]) and live, age, live, int(r["clock"])))
        return out

    async def forget(self, node: str) -> None:
        """A proxy shutting down cleanly leaves the fleet at once instead of waiting out its lease."""
        await self._p().execute("DELETE FROM proxies WHERE node = $1", node)

    async def try_lead(self) -> bool:
        """Hold (or take) the backfill leader's lock; False while another live proxy holds it. One connection asks
        each round and, once it has the lock, keeps it: a session lock goes with its connection."""
        if self._leader is None or self._leader.is_closed():
            self._leading = False
            self._leader = await asyncpg.connect(self._dsn)
        if not self._leading:
            self._leading = bool(await self._leader.fetchval("SELECT pg_try_advisory_lock($1)", _LEADER_LOCK))
        return self._leading

    async def resign(self) -> None:
        """Give up the lock (closing its connection releases it), or stop asking for it."""
        if self._leader is not None:
            leader, self._leader, self._leading = self._leader, None, False
            with contextlib.suppress(Exception):
                await leader.close()

    async def close(self) -> None:
        await self.resign()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.wait_for(pool.close(), 10)
