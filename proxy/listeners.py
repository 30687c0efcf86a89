"""Every address the proxy listens on, by the setting that names it, and the one message a taken address gets.

A second proxy started with the same settings on one machine must fail at once with a line that says which setting
to change, not with a server library's traceback after half of its ports are open. So the addresses are tried before
anything is opened or loaded (`check`), and a bind that still fails later (another process took the port in between)
is reported the same way (`ListenError`).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

from proxy.config import Config, ConfigError

# What turning each listener off looks like, where it can be turned off.
_OFF = {"mcp_listen": 'or "" to turn the MCP endpoint off', "health_listen": "or leave it unset",
        "telemetry.prometheus_listen": "or leave it unset"}


class ListenError(ConfigError):
    """An address a listener cannot take: names the setting, the address and what to do."""

    def __init__(self, setting: str, address: str, cause: OSError | str) -> None:
        reason = (cause if isinstance(cause, str) else
                  "address already in use" if cause.errno == errno.EADDRINUSE else
                  f"cannot listen there ({cause.strerror or cause})")
        fix = f"set {setting} to another address" + (f", {_OFF[setting]}" if setting in _OFF else "")
        super().__init__(f"{setting} {address}: {reason}; {fix}")
        self.setting, self.address = setting, address


def configured(config: Config) -> Iterator[tuple[str, str]]:
    """(setting, address) of every listener the config turns on."""
    yield "listen", config.listen
    yield "admin_listen", config.admin_listen
    for setting, address in (("mcp_listen", config.mcp_listen), ("health_listen", config.health_listen),
                             ("telemetry.prometheus_listen", config.telemetry.prometheus_listen)):
        if address:
            yield setting, address


def host_port(setting: str, address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` split; an empty host is every interface."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ListenError(setting, address, "expected host:port, for example 127.0.0.1:50051")
    return host.strip("[]") or "0.0.0.0", int(port)


def bound_socket(setting: str, address: str) -> socket.socket:
    """A socket bound to `address` (SO_REUSEADDR, as servers bind), or the one-line error."""
    host, port = host_port(setting, address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ListenError(setting, address, f"cannot resolve {host!r}") from exc
    family, kind, proto, _, where = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
    except OSError as exc:
        sock.close()
        raise ListenError(setting, address, exc) from None
    return sock


def check(config: Config) -> None:
    """Every configured address can be taken now (port 0, any free port, always can)."""
    for setting, address in configured(config):
        if host_port(setting, address)[1]:
            bound_socket(setting, address).close()
