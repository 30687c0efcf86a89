"""Every address the proxy listens on, by the setting that names it, and the one message a taken address gets.

A second proxy started with the same settings on one machine must fail at once with a line that says which setting
to change, not with a server library's traceback after half of its ports are open. So the addresses are tried before
anything is opened or loaded (`check`), and a bind that still fails later (another process took the port in between)
is reported the same way (`ListenError`).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from adapters.errors import ListenError
from proxy.runtime.config import Config


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
