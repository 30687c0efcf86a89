"""Who may reach an agent's memory: bearer tokens bound to scopes, a health port for probes, TLS on the admin port."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapters.embedder import BatchingEmbedder
from adapters.errors import ConfigError
from memshift.v1 import admin_pb2 as apb
from memshift.v1 import admin_pb2_grpc, memory_pb2_grpc
from memshift.v1 import memory_pb2 as pb
from tests.cluster import AUTH, Cluster, boot, self_signed, shutdown

AGENT_A = "token-of-agent-a-0123456789"
OPERATOR = "token-of-the-operator-987654"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def guarded(embedder: BatchingEmbedder, tmp_path: Path) -> AsyncIterator[Cluster]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# agent A: its own memory and its team's\n{AGENT_A} agent-a,team-x/*\n{OPERATOR} *\n")
    c = await boot(embedder, tmp_path, memory_tokens_file=str(tokens), health_listen="127.0.0.1:0")
    yield c
    await shutdown(c)


async def _read(c: Cluster, scope: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    try:
        await c.memory.ReadGraph(pb.ReadGraphRequest(scope=scope), metadata=metadata)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_each_token_reaches_exactly_its_scopes(guarded: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert await _read(guarded, "agent-a") == grpc.StatusCode.UNAUTHENTICATED  # missing
    assert await _read(guarded, "agent-a", bearer("not-a-token-anyone-issued")) == grpc.StatusCode.UNAUTHENTICATED
    assert await _read(guarded, "agent-a", (("authorization", AGENT_A),)) == grpc.StatusCode.UNAUTHENTICATED
    assert await _read(guarded, "agent-a", bearer(AGENT_A)) == grpc.StatusCode.OK
    assert await _read(guarded, "team-x/notes", bearer(AGENT_A)) == grpc.StatusCode.OK
    assert await _read(guarded, "agent-b", bearer(AGENT_A)) == grpc.StatusCode.PERMISSION_DENIED
    assert await _read(guarded, "team-xy", bearer(AGENT_A)) == grpc.StatusCode.PERMISSION_DENIED
    assert await _read(guarded, "agent-b", bearer(OPERATOR)) == grpc.StatusCode.OK
    # Writes are guarded the same way, and a denied write stores nothing.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guarded.memory.CreateEntities(pb.CreateEntitiesRequest(scope="agent-b", entities=[
            pb.Entity(name="x", entity_type="t")]), metadata=bearer(AGENT_A))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "scope: this token may not touch scope 'agent-b'"
    graph = await guarded.memory.ReadGraph(pb.ReadGraphRequest(scope="agent-b"), metadata=bearer(OPERATOR))
    assert list(graph.entities) == []
    text = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    assert AGENT_A not in text and OPERATOR not in text


async def test_probes_need_no_token_on_the_health_port(guarded: Cluster) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded.server.health_port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the health port serves health and nothing else
            await memory_pb2_grpc.MemoryStub(channel).ReadGraph(pb.ReadGraphRequest(scope="agent-a"),
                                                               metadata=bearer(OPERATOR))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_tokens_rotate_without_a_restart(guarded: Cluster) -> None:
    tokens = guarded.dir / "tokens"
    fresh = "a-brand-new-token-for-agent-a"
    tokens.write_text(f"{fresh} agent-a\n")
    os.utime(tokens, (1, 1))  # a different modification time, whatever the clock's resolution
    for _ in range(40):
        if await _read(guarded, "agent-a", bearer(fresh)) == grpc.StatusCode.OK:
            break
        await asyncio.sleep(0.1)
    assert await _read(guarded, "agent-a", bearer(fresh)) == grpc.StatusCode.OK
    assert await _read(guarded, "agent-a", bearer(AGENT_A)) == grpc.StatusCode.UNAUTHENTICATED


async def test_the_cli_sends_its_token(guarded: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli.main import main
    base = ["--target", f"127.0.0.1:{guarded.server.port}", "--scope", "agent-a"]
    assert await asyncio.to_thread(main, ["remember", *base, "--token", AGENT_A, "alice", "person", "likes tea"]) == 0
    assert await asyncio.to_thread(main, ["find", *base, "--token", AGENT_A, "TEA"]) == 0
    assert "alice (person)" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["find", *base, "tea"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "says"), [
    ("short agent-a\n", ":1: the token is 5 characters; use at least 16"),
    (f"{AGENT_A}\n", ":1: expected '<token> <scope>"),
    (f"# nothing\n{AGENT_A} a\n{AGENT_A} b\n", ":3: the same token is granted twice"),
    ("# only comments\n", "grants no token"),
])
async def test_a_bad_tokens_file_stops_the_start_naming_the_line_not_the_token(
        embedder: BatchingEmbedder, tmp_path: Path, content: str, says: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(content)
    with pytest.raises(ConfigError) as err:
        await boot(embedder, tmp_path, memory_tokens_file=str(tokens))
    assert says in str(err.value) and AGENT_A not in str(err.value)


async def test_the_admin_port_alone_can_use_tls(embedder: BatchingEmbedder, tmp_path: Path) -> None:
    """The chart's layout: the agent's port in plain text on loopback, the admin port (which crosses the pod
    network, bearer token and all) over TLS from a Secret."""
    cert, key = await self_signed(tmp_path)
    c = await boot(embedder, tmp_path, admin_tls_cert_file=str(cert), admin_tls_key_file=str(key))
    try:
        await c.memory.ReadGraph(pb.ReadGraphRequest(scope="plain"))  # the memory port: plain text
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{c.server.admin_port}", creds) as ch:
            st = await admin_pb2_grpc.MigrationAdminStub(ch).GetStatus(apb.GetStatusRequest(), metadata=AUTH)
            assert st.phase == apb.NOT_STARTED
        with pytest.raises(grpc.aio.AioRpcError) as err:  # plain text on the admin port is refused
            await c.admin.GetStatus(apb.GetStatusRequest(), metadata=AUTH, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        from proxy.cli.main import main
        code = await asyncio.to_thread(main, ["admin", "--admin-target", f"localhost:{c.server.admin_port}",
                                              "--token", c.server.admin_token, "--tls-ca", str(cert), "status"])
        assert code == 0
    finally:
        await shutdown(c)
