"""The control store: the migration's durable state, shared by everything that must survive a restart.

It holds the phase (changed only by compare-and-set), the phase history with who, why and the figures, the
backfill and verify checkpoints, and the repair queue. `SqliteControlStore` is the single-proxy default; a fleet
uses a PostgreSQL implementation of the same `ControlStore` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from adapters.errors import Conflict, UnreadableState
from adapters.records import Kind, RecordKey
from proxy.engine.placement import Placement, Selection


class Phase(StrEnum):
    NOT_STARTED = "NotStarted"
    DATA_MIGRATION = "DataMigration"
    DUAL_WRITE = "DualWrite"
    COMPLETED = "Completed"
    ROLLED_BACK = "RolledBack"


@dataclass(frozen=True, slots=True)
class MigrationOptions:
    batch_size: int = 500
    rate_limit: float = 0.0  # records per second; 0 = unlimited
    workers: int = 1
    reembed: bool = False  # re-embed even when model and dimension match
    mirror_seconds: float = 3600.0  # after Completed, keep writing the old store this long so Rollback stays possible
    require_verify: bool = False  # DataMigration -> DualWrite only after a Verify with zero differences
    full_copy: bool = False  # copy everything even to a target that already holds what it had at a rollback


@dataclass(frozen=True, slots=True)
class MigrationState:
    phase: Phase = Phase.NOT_STARTED
    primary: str = ""  # store spec serving reads and deciding answers
    secondary: str = ""  # the other store during a migration ("" when none)
    migration_id: int = 0
    options: MigrationOptions = field(default_factory=MigrationOptions)
    read_fraction: float = 0.0
    shadow_rate: float = 0.0
    paused: bool = False
    backfill_cursor: RecordKey | None = None
    backfill_done: int = 0
    backfill_total: int = 0
    backfill_complete: bool = False
    # Seconds spent copying: pauses, restarts and a fleet's hand-overs between leaders are not counted, so the rate
    # (done / this) stays true after the copy ends or while it is paused, instead of decaying with the wall clock.
    backfill_seconds: float = 0.0
    verify_cursor: RecordKey | None = None
    last_verify_differences: int = -1  # -1: never verified in this migration
    mirror_until: float = 0.0  # Completed: wall-clock end of the rollback window
    ramp_steps: tuple[float, ...] = ()  # the read ramp being followed; () = none
    ramp_interval: float = 0.0  # seconds each step is analysed before the next
    ramp_step: int = -1  # index into ramp_steps being served; -1 = no ramp running
    ramp_step_started_at: float = 0.0
    ramp_note: str = ""  # why the ramp holds, stopped or finished
    # A record the new store refuses for good (not an outage): the migration pauses, and this says which and why.
    blocked_key: str = ""
    blocked: str = ""
    rolled_back: str = ""  # the last rollback: when, by whom and why, for status and refused phase changes
    # After a rollback from a target that had the whole copy: that target, and a version below which everything it
    # should hold reached it (or is owed through the repair queue, carried into the next migration). Going back to
    # the same target copies only records newer than that.
    resync_target: str = ""
    resync_version: int = 0
    copy_since: int = 0  # this migration's backfill copies only records newer than this (0: every record)
    # ... and only records stamped at or before this: fixed once, when the copy first starts (after every write to the
    # old store alone has finished), so what agents write later, which dual write carries, is never copied again and
    # the copy cannot chase them (0: not fixed yet). docs/design.md, "Why the copy skips what is newer".
    copy_until: int = 0
    backfill_copied: int = 0  # records the backfill wrote (`backfill_done` counts records read)
    # After the last page, until the copy is complete: "settling" (the texts and vectors the loads left to the end),
    # then "indexing" (the indexes the new store builds once after a bulk copy); "" otherwise.
    backfill_step: str = ""
    # Which store serves each scope (proxy.engine.placement). Changed only with the phase: at cutover, and back on a
    # rollback from the rollback window, so a placement change is a compare-and-set broadcast like any phase change.
    placement: Placement = field(default_factory=Placement)
    # The migration's selection, the store it moves those scopes from, and the placement it started from: together
    # they fix which scopes it moves (`proxy.engine.placement.moves`) for its whole life, cutover included.
    selection: Selection = field(default_factory=Selection)
    source: str = ""
    start_placement: Placement = field(default_factory=Placement)
    revision: int = 0  # bumped on every change; the compare-and-set token

    def __post_init__(self) -> None:
        # A state written before placement existed (or a fresh one): one store served everything, and a migration
        # moved everything from the store it started on (the primary, or after cutover the secondary).
        if not self.placement.default and self.primary:
            object.__setattr__(self, "placement", Placement(self.primary))
        if not self.source and self.secondary:
            object.__setattr__(self, "source", self.secondary if self.phase == Phase.COMPLETED else self.primary)
        if not self.start_placement.default and self.source:
            object.__setattr__(self, "start_placement", Placement(self.source))

    def named_stores(self) -> list[str]:
        """Every store this state names, each once: every store scopes are placed on (the default first), then the
        migration's two (the source is one of them)."""
        return [s for s in dict.fromkeys([*self.placement.stores(), self.primary, self.secondary]) if s]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    at: float
    from_phase: Phase
    to_phase: Phase
    actor: str
    reason: str
    figures: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RepairItem:
    id: int
    key: RecordKey
    attempts: int
    last_error: str


@dataclass(frozen=True, slots=True)
class Member:
    """One proxy of a fleet as the control store sees it."""

    node: str
    address: str
    phase: Phase  # the phase it has applied (its acknowledgement)
    migration_id: int
    revision: int
    leader: bool  # runs the backfill
    heartbeat_age: float  # seconds since its last heartbeat
    live: bool  # heartbeat within the lease
    clock: int = 0  # its clock when it acknowledged: above every version it stamped before (0: not reported)




class ControlStore(Protocol):
    async def load(self) -> MigrationState: ...

    async def save(self, state: MigrationState, expected_revision: int, durable: bool = True) -> MigrationState:
        """Write `state` if the stored revision is `expected_revision`; raises Conflict otherwise. Not `durable`
        (a checkpoint the next batch will pass anyway): the write survives a crash of the process but may be lost
        with the machine's power, and then only together with the non-durable writes after the last durable one
        (each durable write flushes the log they are in). Losing a checkpoint means copying a few batches again,
        which apply-if-newer makes harmless; it saves a disk flush per batch."""
        ...

    async def record(self, entry: HistoryEntry) -> None: ...

    async def history(self, limit: int = 100) -> list[HistoryEntry]: ...

    async def enqueue_repairs(self, migration_id: int, keys: list[RecordKey]) -> None: ...

    async def due_repairs(self, migration_id: int, limit: int) -> list[RepairItem]: ...

    async def repaired(self, ids: list[int]) -> None: ...

    async def carry_over_repairs(self, migration_id: int) -> None:
        """Move every pending repair of earlier migrations to this one."""
        ...

    async def repair_failed(self, item: RepairItem, error: str, retry_in: float) -> None: ...

    async def repair_depth(self, migration_id: int) -> int: ...

    async def repair_scopes(self, migration_id: int) -> set[str]:
        """Scopes with at least one pending repair: reads of these stay on the primary."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Fleet(Protocol):
    """What a control store shared by several proxies adds (PostgreSQL): broadcast, leases, one backfill leader."""

    lease_seconds: float

    async def listen(self, on_change: Callable[[], None]) -> None: ...

    async def heartbeat(self, node: str, address: str, state: MigrationState, leader: bool,
                        clock: int = 0) -> None: ...

    async def members(self) -> list[Member]: ...

    async def forget(self, node: str) -> None: ...

    async def try_lead(self) -> bool: ...

    async def resign(self) -> None: ...


def key_json(key: RecordKey | None) -> str | None:
    return None if key is None else json.dumps([int(key[0]), key[1], list(key[2])])


def key_load(raw: str | None) -> RecordKey | None:
    if raw is None:
        return None
    kind, scope, parts = json.loads(raw)
    return (Kind(kind), scope, tuple(parts))


def _non_finite(data: Any, path: str = "") -> str | None:
    """The path of the first number in `data` that is NaN or infinite (which JSON cannot hold), if any."""
    if isinstance(data, float) and not math.isfinite(data):
        return path or "state"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list | tuple) else ()
    for k, v in items:
        found = _non_finite(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def state_json(state: MigrationState) -> str:
    """The state as stored. Refuses (ValueError naming the field) a state no later load could read back, so a bad
    number fails the one call that carried it instead of every call after it."""
    data = asdict(state)
    if bad := _non_finite(data):
        raise ValueError(f"control state: {bad} is not a finite number; nothing was written")
    data["phase"] = state.phase.value
    data["backfill_cursor"] = key_json(state.backfill_cursor)
    data["verify_cursor"] = key_json(state.verify_cursor)
    return json.dumps(data, allow_nan=False)


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The fields of `cls` in `data`. A field written by a newer Memshift is left out rather than refused, so a
    fleet mid-upgrade keeps running on the state its newer members write."""
    names = _field_names(cls)
    return {k: v for k, v in data.items() if k in names}


def state_load(raw: str, where: str = "the control store") -> MigrationState:
    """The stored state; UnreadableState saying what is wrong and where when it cannot be read back."""
    try:
        data = _known(MigrationState, json.loads(raw, parse_constant=_refuse_constant))
        data["phase"] = Phase(data["phase"])
        data["options"] = MigrationOptions(**_known(MigrationOptions, data["options"]))
        data["backfill_cursor"] = key_load(data["backfill_cursor"])
        data["verify_cursor"] = key_load(data["verify_cursor"])
        data["ramp_steps"] = tuple(data.get("ramp_steps", ()))
        for name in ("placement", "start_placement"):
            data[name] = Placement.from_json(data.get(name) or {})
        data["selection"] = Selection.from_json(data.get("selection") or {})
        state = MigrationState(**data)
        if bad := _non_finite(asdict(state)):
            raise ValueError(f"{bad} is not a finite number")
        return state
    except Exception as exc:
        raise UnreadableState(f"the migration state in {where} cannot be read ({type(exc).__name__}: {exc}); "
                              "fix or restore that row (table `state`) before starting the proxy") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"the number {name} (JSON holds only finite numbers)")


class SqliteControlStore:
    """Control state in one SQLite file. Calls are short; one worker thread owns the connection, so calls stay
    serialised even when a waiting coroutine is cancelled mid-call."""

    def __init__(self, path: str | Path, initial_primary: str) -> None:
        self._path = str(path)
        self._initial_primary = initial_primary
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns (NORMAL: see save)
        self._conn.executescript("""
            CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY CHECK (id = 1), body TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS history (id INTEGER PRIMARY KEY, at REAL, from_phase TEXT, to_phase TEXT,
                actor TEXT, reason TEXT, figures TEXT);
            CREATE TABLE IF NOT EXISTS repairs (id INTEGER PRIMARY KEY, migration_id INTEGER NOT NULL,
                key TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL DEFAULT 0,
                last_error TEXT NOT NULL DEFAULT '', UNIQUE (migration_id, key));
        """)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="control")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception: a transaction left open after a failed statement
        would make every later call of this connection fail."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _exec(self, sql: str, params: Any, many: bool = False) -> None:
        """Run a statement in the worker thread and drop its cursor there: a cursor finalised later on another
        thread resets its statement concurrently with the next call (SQLITE_MISUSE)."""
        (self._conn.executemany if many else self._conn.execute)(sql, params).close()

    async def load(self) -> MigrationState:
        def run() -> MigrationState:
            rows = self._conn.execute("SELECT body FROM state WHERE id=1").fetchall()
            row = rows[0] if rows else None
            if row is None:
                return MigrationState(primary=self._initial_primary)
            return state_load(row[0], self._path)

        state: MigrationState = await self._run(run)
        return state

    async def save(self, state: MigrationState, expected_revision: int, durable: bool = True) -> MigrationState:
        new = replace(state, revision=expected_revision + 1)

        def run() -> None:
            # In WAL mode NORMAL syncs the log only at its checkpoints and at the next FULL commit.
            body = state_json(new)  # refuses a state that could not be read back, before any transaction
            self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            try:
                with self._transaction():
                    rows = self._conn.execute("SELECT json_extract(body, '$.revision') FROM state WHERE id=1"
                                              ).fetchall()
                    current = int(rows[0][0]) if rows else 0  # the revision alone, not the whole state parsed
                    if current != expected_revision:
                        raise Conflict(f"state is at revision {current}, expected {expected_revision}")
                    self._conn.execute("INSERT OR REPLACE INTO state VALUES (1, ?)", (body,))
            finally:
                self._conn.execute("PRAGMA synchronous=FULL")  # every other write of this store is flushed

        await self._run(run)
        return new

    async def record(self, entry: HistoryEntry) -> None:
        await self._run(
            self._exec, "INSERT INTO history (at, from_phase, to_phase, actor, reason, figures) VALUES (?,?,?,?,?,?)",
            (entry.at, entry.from_phase.value, entry.to_phase.value, entry.actor, entry.reason,
             json.dumps(entry.figures, default=str)))

    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        rows = await self._run(lambda: self._conn.execute(
            "SELECT at, from_phase, to_phase, actor, reason, figures FROM history ORDER BY id DESC LIMIT ?",
            (limit,)).fetchall())
        return [HistoryEntry(a, Phase(f), Phase(t), who, why, json.loads(fig)) for a, f, t, who, why, fig in
                reversed(rows)]

    async def enqueue_repairs(self, migration_id: int, keys: list[RecordKey]) -> None:
        if keys:
            await self._run(
                self._exec, "INSERT INTO repairs (migration_id, key) VALUES (?, ?) ON CONFLICT DO UPDATE SET next_at=0",
                [(migration_id, key_json(k)) for k in keys], True)

    async def due_repairs(self, migration_id: int, limit: int) -> list[RepairItem]:
        rows = await self._run(lambda: self._conn.execute(
            "SELECT id, key, attempts, last_error FROM repairs WHERE migration_id=? AND next_at<=? ORDER BY id"
            " LIMIT ?", (migration_id, time.time(), limit)).fetchall())
        out = []
        for i, k, a, e in rows:
            key = key_load(k)
            assert key is not None
            out.append(RepairItem(i, key, a, e))
        return out

    async def repaired(self, ids: list[int]) -> None:
        if ids:
            await self._run(self._exec, "DELETE FROM repairs WHERE id=?", [(i,) for i in ids], True)

    async def carry_over_repairs(self, migration_id: int) -> None:
        def run() -> None:
            with self._transaction():
                self._conn.execute("INSERT OR IGNORE INTO repairs (migration_id, key) SELECT ?, key FROM repairs"
                                   " WHERE migration_id<>?", (migration_id, migration_id))
                self._conn.execute("DELETE FROM repairs WHERE migration_id<>?", (migration_id,))

        await self._run(run)

    async def repair_failed(self, item: RepairItem, error: str, retry_in: float) -> None:
        await self._run(self._exec, "UPDATE repairs SET attempts=attempts+1, next_at=?, last_error=? WHERE id=?",
                        (time.time() + retry_in, error[:500], item.id))

    async def repair_depth(self, migration_id: int) -> int:
        row = await self._run(lambda: self._conn.execute(
            "SELECT count(*) FROM repairs WHERE migration_id=?", (migration_id,)).fetchall()[0])
        return int(row[0])

    async def repair_scopes(self, migration_id: int) -> set[str]:
        rows = await self._run(lambda: self._conn.execute(
            "SELECT DISTINCT json_extract(key, '$[1]') FROM repairs WHERE migration_id=?", (migration_id,)).fetchall())
        return {str(r[0]) for r in rows}

    async def close(self) -> None:
        await self._run(self._conn.close)
        self._executor.shutdown(wait=True)
