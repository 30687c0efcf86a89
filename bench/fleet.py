"""`make bench` (fourth table): how fast a phase change reaches a fleet, and how fast the backfill changes hands.

    python -m bench.fleet [--proxies 3] [--changes 40]

Three `memshift serve` processes share one PostgreSQL control store (started by the benchmark). Phase changes are
made through one proxy's admin API, alternating StartMigration and Rollback; each is timed from the admin call's reply
(the change is committed) until every proxy has acknowledged it in the control store. The baseline is the control
store's own round trip (one `load`) measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.__main__ import Table
from memshift.v1 import admin_pb2 as apb
from proxy.engine.control_pg import PostgresControlStore
from tests.fleet import AUTH, acknowledged, start_proxy, stop_all, wait_serving
from tests.servers import PostgresServer


async def main(n_proxies: int, changes: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="memshift-fbench-"))
    pg = PostgresServer().start()
    table = Table("fleet")
    old, new, spec = f"{pg.dsn}?schema=f_old", f"{pg.dsn}?schema=f_new", f"{pg.dsn}?schema=f_control"
    proxies = [start_proxy(i, work, old, spec, 5.0) for i in range(1, n_proxies + 1)]
    control = PostgresControlStore(spec, old)
    try:
        await wait_serving(proxies)
        await control.open()
        admin = proxies[0].admin
        delays: list[float] = []
        for i in range(changes):
            if i % 2 == 0:
                await admin.StartMigration(apb.StartMigrationRequest(target=new), metadata=AUTH)
            else:
                await admin.Rollback(apb.RollbackRequest(reason="bench"), metadata=AUTH)
            delays.append(await acknowledged(control, (await control.load()).revision, proxies))
        loads = []
        for _ in range(200):
            t = time.perf_counter()
            await control.load()
            loads.append(time.perf_counter() - t)
        table.add(f"control store round trip (one load), {len(loads)} samples (baseline)", loads)
        ratio = statistics.median(delays) / statistics.median(loads)
        table.add(f"phase change acknowledged by all {n_proxies} proxies, {changes} changes", delays,
                  note=f"{ratio:.0f} x a round trip; target p99 <= 1000 ms; max {max(delays) * 1000:.0f} ms")
    finally:
        await stop_all(proxies)
        await control.close()
        pg.stop()
    print()
    table.print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxies", type=int, default=3)
    parser.add_argument("--changes", type=int, default=40)
    ns = parser.parse_args()
    asyncio.run(main(ns.proxies, ns.changes))
