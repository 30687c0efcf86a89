"""The grpc.aio servers: Memory (with health checking and reflection) and, on its own port, MigrationAdmin.

Shutdown follows grpc's graceful-shutdown example: on SIGTERM or SIGINT the health status turns NOT_SERVING (so
load balancers and Kubernetes stop sending), the servers stop taking new calls, in-flight calls get `grace_seconds`
to finish, then the migration engine and the stores close; the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapters.base import Backend
from adapters.embedder import BatchingEmbedder, SentenceTransformerModel
from adapters.errors import ConfigError, ListenError, PolicyError, TokensFileError
from adapters.specs import parse as parse_spec
from adapters.specs import read_secret_file
from memshift.v1 import admin_pb2, admin_pb2_grpc, memory_pb2, memory_pb2_grpc
from policies.loader import load as load_policy
from policies.rules import Observations
from proxy.engine.backends import backend_for, redact
from proxy.engine.clock import HybridClock
from proxy.engine.control import ControlStore, SqliteControlStore
from proxy.engine.control_pg import PostgresControlStore
from proxy.engine.fleet import FleetSync
from proxy.engine.migration import MigrationEngine
from proxy.routing.guard import PolicyGuard
from proxy.routing.read_routing import ReadRouting
from proxy.routing.router import Router
from proxy.routing.shadow import ShadowReader
from proxy.runtime import heap
from proxy.runtime.config import Config, EmbeddingConfig
from proxy.runtime.telemetry import Gauges, Telemetry
from proxy.runtime.telemetry import build as build_telemetry
from proxy.transports import listeners
from proxy.transports.admin import AdminServicer, BearerTokenInterceptor, Watchers
from proxy.transports.auth import ScopeTokens
from proxy.transports.mcp_server import MemoryTools
from proxy.transports.servicer import MemoryServicer
from proxy.transports.shedding import Budget
from proxy.transports.wire import add_servicer

log = logging.getLogger("memshift.server")
MEMORY_DESCRIPTOR = memory_pb2.DESCRIPTOR.services_by_name["Memory"]
ADMIN_DESCRIPTOR = admin_pb2.DESCRIPTOR.services_by_name["MigrationAdmin"]
MEMORY_SERVICE = MEMORY_DESCRIPTOR.full_name


def build_embedder(config: EmbeddingConfig) -> BatchingEmbedder:
    started = time.monotonic()
    log.info("loading the embedding model", extra={"model": config.model_name})
    model = SentenceTransformerModel(config.model_path, config.model_name)
    log.info("embedding model loaded", extra={"model": config.model_name, "dimension": model.info.dimension,
                                              "seconds": round(time.monotonic() - started, 2)})
    return BatchingEmbedder(model, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000)


def admin_token(config: Config) -> str:
    """The configured admin token; without one, a random token kept next to the control store (mode 0600)."""
    token = config.resolved_admin_token()
    if token:
        return token
    control_spec = parse_spec(config.control)
    if control_spec.kind != "sqlite":
        raise ConfigError("a shared control store (a fleet) needs admin_token_file or admin_token: every proxy of "
                          "the fleet must accept the same token")
    control = control_spec.path
    token = secrets.token_urlsafe(24)
    if control == ":memory:":
        log.warning("no admin token configured; generated one for this run only")
        return token
    path = Path(control).parent / "admin.token"
    if path.exists():
        return read_secret_file(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("generated admin token", extra={"token_file": str(path)})
    return token


@dataclass
class MemshiftServer:
    """One running proxy. `start()` returns the Memory port; `admin_port` is set too (port 0 picks free ones).
    `telemetry` defaults to what `config.telemetry` asks for; tests pass one built on in-memory readers."""

    config: Config
    embedder: BatchingEmbedder
    telemetry: Telemetry | None = None
    # Wraps each store as it is opened (spec, store) -> store; tests use it to inject faults into a real store.
    wrap_store: Callable[[str, Backend], Backend] | None = None
    engine: MigrationEngine = field(init=False)

    async def _open_store(self, spec: str) -> Backend:
        store = backend_for(spec, self.embedder)
        await store.open()
        return self.wrap_store(spec, store) if self.wrap_store else store

    def _bind(self, server: grpc.aio.Server, setting: str, address: str,
              tls: tuple[str | None, str | None] | None = None) -> int:
        cert, key = tls if tls and all(tls) else (self.config.tls_cert_file, self.config.tls_key_file)
        listeners.host_port(setting, address)
        try:
            if cert and key:
                creds = grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:  # grpc's "failed to bind": the address is taken (or not ours to take)
            port = 0
        if port == 0:
            raise ListenError(setting, address, OSError(errno.EADDRINUSE, "address already in use"))
        return int(port)

    async def start(self) -> int:
        """Open everything and take every port; if any step fails, what was opened is closed again before the error
        propagates, so a failed start leaves nothing half-started behind."""
        self._stopping = False
        self._begun: list[str] = []  # the ports taken so far
        # What was opened behind the ports, each with how it closes: closed in reverse order, by a stop or by a
        # start that failed half way.
        self._closing: list[Callable[[float], Awaitable[None]]] = []
        try:
            return await self._start()
        except BaseException:
            await self._abandon_start()
            raise

    async def _abandon_start(self) -> None:
        if "mcp" in self._begun:
            self._uvicorn.should_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._uvicorn_task, 2.0)
        for name in ("_server", "_admin", "_health_server"):
            server = getattr(self, name, None)
            if server is not None:
                # A grpc server that bound its port but never started keeps the port until it has started and
                # stopped; without this, the same settings could not start again in this process.
                if name not in self._begun:
                    with contextlib.suppress(BaseException):
                        await server.start()
                with contextlib.suppress(BaseException):
                    await server.stop(0)
        await self._stop_behind_the_ports(within=1.0, tolerant=True)
        with contextlib.suppress(Exception):
            self._telemetry_shutdown()

    async def _start(self) -> int:
        cfg = self.config
        try:
            policy = load_policy(cfg.policy_file)
        except PolicyError as exc:
            raise ConfigError(f"policy_file: {exc}") from None
        try:
            tokens = ScopeTokens(cfg.memory_tokens_file) if cfg.memory_tokens_file else None
        except TokensFileError as exc:  # before anything is opened: a bad file stops the start at once
            raise ConfigError(f"memory_tokens_file: {exc}") from None
        self._telemetry_shutdown: Callable[[], None] = lambda: None
        if self.telemetry is None:
            try:
                self.telemetry, self._telemetry_shutdown = build_telemetry(cfg.telemetry)
            except OSError as exc:  # only the Prometheus endpoint binds here
                raise ListenError("telemetry.prometheus_listen", str(cfg.telemetry.prometheus_listen),
                                            exc) from None
        self.observations = Observations(keep_seconds=policy.policy.longest_window())
        shared = None
        log.info("opening the control store", extra={"control": redact(cfg.control)})
        control_spec = parse_spec(cfg.control)
        if control_spec.kind == "postgresql":
            shared = PostgresControlStore(control_spec, initial_primary=cfg.store, lease_seconds=cfg.lease_seconds)
            await shared.open()
            self.control: ControlStore = shared
        elif control_spec.kind == "sqlite":
            self.control = SqliteControlStore(control_spec.path, initial_primary=cfg.store)
        else:
            raise ConfigError(f"control: {control_spec.shown} names a {control_spec.kind} store; the control store "
                              "is sqlite:///FILE (one proxy) or postgresql://... (a fleet)")
        self._closing.append(lambda _: self.control.close())
        self.engine = MigrationEngine(self.control, self._open_store, HybridClock(cfg.resolved_node_id()),
                                      telemetry=self.telemetry, observations=self.observations,
                                      fleet=shared is not None,
                                      resync_margin_ms=int(cfg.resync_margin_seconds * 1000),
                                      clock_margin_ms=int(cfg.clock_margin_seconds * 1000) if shared else 0,
                                      latency_target=cfg.agent_latency_target)
        self._closing.append(lambda within: self.engine.stop(within=within))
        await self.engine.start()
        log.info("migration state read and stores opened", extra={"phase": self.engine.state.phase.value})
        self.fleet: FleetSync | None = None
        if shared is not None:
            node = f"{socket.gethostname()}-{cfg.resolved_node_id()}"
            self.fleet = FleetSync(self.engine, shared, node, cfg.listen)
            fleet = self.fleet
            self._closing.append(lambda _: fleet.stop())
            await fleet.start()
        self.shadow = ShadowReader(policy.shadow, policy.compare, self.observations, self.telemetry,
                                   unreachable=self.engine.outage.report)
        self.reads = ReadRouting(self.engine, self.shadow, self.observations)
        self.guard = PolicyGuard(self.engine, policy, self.observations)
        self._closing.append(lambda _: self.shadow.close())
        self._closing.append(lambda _: self.guard.stop())
        self.guard.start()
        self.telemetry.gauges_from(self._gauges)
        self.router = Router(self.engine, self.reads, self.embedder, cfg.limits)
        limit = cfg.limits.max_message_bytes
        # No SO_REUSEPORT: a second proxy on the same port must fail to start, not silently share the agents' calls.
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                   ("grpc.so_reuseport", 0)]
        self._server = grpc.aio.server(options=options)
        self.budget = Budget(cfg.limits.max_inflight_calls, cfg.limits.max_inflight_bytes)
        add_servicer(self._server, memory_pb2_grpc.add_MemoryServicer_to_server,
                     MemoryServicer(self.router, self.telemetry, cfg.limits, tokens), MEMORY_DESCRIPTOR, self.budget)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (MEMORY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self.port = self._bind(self._server, "listen", cfg.listen)

        self.admin_token = admin_token(cfg)
        self._admin = grpc.aio.server(interceptors=[BearerTokenInterceptor(self.admin_token)], options=options)
        admin = AdminServicer(self.engine, Watchers(self.shadow, self.reads, self.guard, self.fleet, self.budget),
                              cfg.limits)
        add_servicer(self._admin, admin_pb2_grpc.add_MigrationAdminServicer_to_server, admin, ADMIN_DESCRIPTOR)
        self.admin_port = self._bind(self._admin, "admin_listen", cfg.admin_listen,
                                     (cfg.admin_tls_cert_file, cfg.admin_tls_key_file))
        # Probes reach the pod's address, not its loopback: with `listen` on loopback, health alone is served here.
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        if cfg.health_listen:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            self.health_port = self._bind(self._health_server, "health_listen", cfg.health_listen)

        # Before the gRPC ports open: a failure here leaves nothing serving.
        self.mcp_port = await self._start_mcp(tokens) if cfg.mcp_listen else 0
        for name, server in (("_server", self._server), ("_admin", self._admin),
                             ("_health_server", self._health_server)):
            if server is not None:
                await server.start()
                self._begun.append(name)
        log.info("listening", extra={"listen": cfg.listen, "port": self.port, "admin_port": self.admin_port,
                                     "mcp_port": self.mcp_port,
                                     "health_port": self.health_port, "primary": redact(self.engine.state.primary),
                                     "phase": self.engine.state.phase.value, "node_id": cfg.resolved_node_id()})
        # Health says whether agents can be served: the default store is open (a store only some scopes are placed on
        # holds up only those). The admin API serves either way.
        self._serving_task: asyncio.Future[None] | None = None
        if not self.engine.stores.default_up.is_set():
            for service in ("", MEMORY_SERVICE):
                await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            log.warning("default store unreachable: health NOT_SERVING until it answers; the admin API serves",
                        extra={"store": redact(self.engine.state.placement.default)})
            self._serving_task = asyncio.ensure_future(self._serve_when_default_up())
        else:
            await self._serve_when_default_up()
        return self.port

    async def _serve_when_default_up(self) -> None:
        await self.engine.stores.default_up.wait()
        if self._stopping:
            return
        for service in ("", MEMORY_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"primary": redact(self.engine.state.primary)})

    async def _start_mcp(self, tokens: ScopeTokens | None) -> int:
        """The MCP endpoint (proxy.transports.mcp_server) on `mcp_listen`, served by uvicorn on this event loop."""
        cfg = self.config
        assert cfg.mcp_listen
        host, port = listeners.host_port("mcp_listen", cfg.mcp_listen)
        # Bound here, not by uvicorn: a taken port is then the same one line as every other listener's, where
        # uvicorn would log its traceback and exit the process.
        sock = listeners.bound_socket("mcp_listen", cfg.mcp_listen)
        self.mcp = MemoryTools(self.router, cfg.limits, tokens, cfg.mcp_default_scope)
        # Answers as JSON bodies, not server-sent events: the official Python client refuses an event over 1 MiB,
        # so a whole-graph `read_graph` of a few thousand entities failed over SSE; no tool here streams progress.
        app = self.mcp.server.streamable_http_app(streamable_http_path="/mcp", host=host, json_response=True)
        self._uvicorn = _EmbeddedUvicorn(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                        lifespan="on", log_config=None))
        self._uvicorn_task = asyncio.ensure_future(self._uvicorn.serve(sockets=[sock]))
        self._begun.append("mcp")
        while not self._uvicorn.started:
            if self._uvicorn_task.done():  # it could not bind, or the app failed to start
                self._uvicorn_task.result()
                raise OSError(f"cannot serve MCP on {cfg.mcp_listen}")
            await asyncio.sleep(0.01)
        sockets = [s for server in self._uvicorn.servers for s in server.sockets]
        return int(sockets[0].getsockname()[1])

    def _gauges(self) -> Gauges:
        s, p = self.engine.state, self.engine.progress()
        return Gauges(s.phase.value, s.read_fraction, s.shadow_rate, self.engine.repairs.last_depth, p.done, p.total,
                      p.rate)

    async def stop(self, grace: float | None = None) -> None:
        self._stopping = True
        if self._serving_task is not None:
            self._serving_task.cancel()
        await self._health.enter_graceful_shutdown()
        wait = self.config.grace_seconds if grace is None else grace
        if self.config.mcp_listen:
            self._uvicorn.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._uvicorn_task, max(1.0, wait))
        await asyncio.gather(self._server.stop(wait), self._admin.stop(min(wait, 1.0)),
                             *([self._health_server.stop(wait)] if self._health_server else []))
        await self._stop_behind_the_ports(within=max(1.0, wait))
        self._telemetry_shutdown()
        log.info("stopped")

    async def _stop_behind_the_ports(self, within: float, tolerant: bool = False) -> None:
        """What was opened behind the ports, last first: the policy, shadow reads, the fleet's sync, the engine with
        its stores, the control store. `tolerant` (a failed start): each is closed whatever the others did."""
        for close in reversed(self._closing):
            if tolerant:
                with contextlib.suppress(Exception):
                    await close(within)
            else:
                await close(within)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside the proxy's own event loop: the proxy handles SIGTERM (graceful shutdown of every port), so
    uvicorn must not take the signal handlers over."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(config: Config) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    listeners.check(config)  # a taken port fails here, before the model loads or a store opens
    embedder = build_embedder(config.embedding)
    server = MemshiftServer(config, embedder)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    heap.freeze_long_lived()  # the model, the stores, the libraries: out of every full collection from now on
    try:
        await stop.wait()
        log.info("shutting down", extra={"grace_seconds": config.grace_seconds})
    finally:
        await server.stop()
        with contextlib.suppress(Exception):
            await embedder.close()
