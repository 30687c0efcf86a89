"""Start-up failures an operator can act on: a listener whose address is taken is one line naming the setting (the
process exits 1 and leaves nothing behind), and a store spec with a malformed address is the caller's error."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from adapters.embedder import BatchingEmbedder
from adapters.errors import ListenError
from memshift.v1 import admin_pb2 as apb
from proxy.cli.main import main
from proxy.runtime.config import Config
from proxy.transports.server import MemshiftServer
from tests.cluster import AUTH, Cluster
from tests.conftest import ADMIN_TOKEN

ROOT = Path(__file__).resolve().parent.parent
LISTENERS = ("listen", "admin_listen", "mcp_listen", "health_listen", "telemetry.prometheus_listen")


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("setting", LISTENERS)
def test_a_taken_address_is_one_line_naming_the_setting_and_nothing_is_left_behind(
        setting: str, taken: int, tmp_path: Path) -> None:
    config = {"store": f"sqlite:///{tmp_path}/memory.db", "control": f"sqlite:///{tmp_path}/control.db",
              "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "mcp_listen": "127.0.0.1:0"}
    address = f"127.0.0.1:{taken}"
    if setting.startswith("telemetry."):
        config["telemetry"] = {"prometheus_listen": address}  # type: ignore[assignment]
    else:
        config[setting] = address
    (tmp_path / "memshift.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(tmp_path / "memshift.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr  # no traceback, no "During handling of the above exception"
    assert lines[0].startswith(f"memshift: cannot serve: {setting} {address}: address already in use; "
                               f"set {setting} to another address"), lines[0]
    if setting == "mcp_listen":
        assert 'or "" to turn the MCP endpoint off' in lines[0]
    assert not (tmp_path / "control.db").exists() and not (tmp_path / "memory.db").exists()


async def test_a_port_taken_between_the_check_and_the_bind_stops_the_start_and_frees_every_other_port(
        embedder: BatchingEmbedder, tmp_path: Path, taken: int) -> None:
    """The race the up-front check cannot see: the server's own bind fails the same way, and what it had opened
    (control store, stores, the ports it had bound) is closed again, so the same settings start once the port is
    free."""
    listen, admin = free_port(), free_port()
    config = Config(listen=f"127.0.0.1:{listen}", admin_listen=f"127.0.0.1:{admin}", mcp_listen=f"127.0.0.1:{taken}",
                    store=f"sqlite:///{tmp_path}/memory.db", control=f"sqlite:///{tmp_path}/control.db",
                    admin_token=ADMIN_TOKEN, node_id=1)
    with pytest.raises(ListenError, match=rf"^mcp_listen 127\.0\.0\.1:{taken}: address already in use"):
        await MemshiftServer(config, embedder).start()
    for port in (listen, admin):  # released: a plain bind succeeds
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    server = MemshiftServer(dataclasses.replace(config, mcp_listen="127.0.0.1:0"), embedder)
    assert await server.start() == listen
    await server.stop(grace=0)


async def test_a_second_proxy_on_the_same_grpc_port_does_not_share_it(
        embedder: BatchingEmbedder, tmp_path: Path) -> None:
    """gRPC binds with SO_REUSEPORT by default, under which a second proxy would silently take half the agents'
    calls; here it is refused, naming the setting."""
    first = MemshiftServer(Config(listen="127.0.0.1:0", admin_listen="127.0.0.1:0", mcp_listen="",
                                  store=f"sqlite:///{tmp_path}/a.db", control=f"sqlite:///{tmp_path}/a-control.db",
                                  admin_token=ADMIN_TOKEN, node_id=1), embedder)
    port = await first.start()
    try:
        second = MemshiftServer(Config(listen=f"127.0.0.1:{port}", admin_listen="127.0.0.1:0", mcp_listen="",
                                       store=f"sqlite:///{tmp_path}/b.db",
                                       control=f"sqlite:///{tmp_path}/b-control.db", admin_token=ADMIN_TOKEN,
                                       node_id=2), embedder)
        with pytest.raises(ListenError, match=rf"^listen 127\.0\.0\.1:{port}: address already in use"):
            await second.start()
    finally:
        await first.stop(grace=0)


@pytest.mark.parametrize(("spec", "says"), [
    ("postgresql://u@127.0.0.1:notaport/db", "port 'notaport' is not a number from 1 to 65535"),
    ("postgresql://u:secret-pw@127.0.0.1:70000/db", "port '70000' is not a number from 1 to 65535"),
    ("bolt://:7687", "the host is missing before port 7687"),
    ("hybrid:?graph=bolt://h:x&vectors=qdrant+local:///:memory:", "port 'x' is not a number"),
])
async def test_a_spec_with_a_bad_address_is_invalid_argument_naming_the_part(
        cluster: Cluster, spec: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.admin.StartMigration(apb.StartMigrationRequest(target=spec), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (err.value.details() or "") and "secret-pw" not in (err.value.details() or "")
    code = await asyncio.to_thread(main, ["admin", "--admin-target", f"127.0.0.1:{cluster.server.admin_port}",
                                          "--token", ADMIN_TOKEN, "start", "--to", spec])
    err_text = capsys.readouterr().err
    assert code == 1 and "INVALID_ARGUMENT: store spec" in err_text and says in err_text, err_text
    status = await cluster.admin.GetStatus(apb.GetStatusRequest(), metadata=AUTH)
    assert status.phase == apb.NOT_STARTED  # nothing changed
