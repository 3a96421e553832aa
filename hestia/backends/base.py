"""The Backend protocol: the few operations the lifecycle needs from whatever runs a service.

A backend knows how to start, stop and inspect one *instance* (a Docker container today; a
Swarm service, a container on another Docker host or a Semaphore task later) and reports what
happens to instances as a stream of events. It knows nothing about requests, idle time or
states: that is the lifecycle's job.

Errors: `InstanceNotFound` when the instance does not exist, `BackendError` (hestia.errors) for
anything else the backend refused. Implementations translate their library's exceptions once,
at their boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from hestia.errors import BackendError

__all__ = [
    "Backend",
    "BackendError",
    "BackendEvent",
    "InstanceInfo",
    "InstanceNotFound",
    "resolve_address",
]


class InstanceNotFound(BackendError):
    status = 503
    code = "instance_not_found"


HealthState = Literal["none", "starting", "healthy", "unhealthy"]


@dataclass(frozen=True)
class InstanceInfo:
    id: str
    name: str
    running: bool
    status: str  # backend's own word: created, running, exited, restarting, ...
    health: HealthState = "none"  # "none": the instance has no health check of its own
    health_output: str = ""  # last health check's output, for error messages
    exit_code: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    # network name -> IP address of the instance on it
    networks: dict[str, str] = field(default_factory=dict)
    # container port -> (host ip, host port) it is published on, if any
    published: dict[int, tuple[str, int]] = field(default_factory=dict)
    exposed: tuple[int, ...] = ()
    started_at: str | None = None


EventKind = Literal["create", "destroy", "rename", "start", "die", "stop", "health", "update"]


@dataclass(frozen=True)
class BackendEvent:
    kind: EventKind
    id: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    health: HealthState | None = None  # for kind == "health"
    exit_code: int | None = None  # for kind == "die"
    old_name: str | None = None  # for kind == "rename"


class Backend(Protocol):
    name: str

    async def inspect(self, ref: str) -> InstanceInfo:
        """Current facts about an instance (by name or id). Raises InstanceNotFound."""
        ...

    async def start(self, ref: str) -> None:
        """Start a stopped instance; returns once the backend accepted it (not once healthy)."""
        ...

    async def stop(self, ref: str, timeout: float = 10.0) -> None:
        """Stop a running instance, gracefully within `timeout` seconds."""
        ...

    async def logs_tail(self, ref: str, lines: int = 20) -> str:
        """The last lines the instance printed, for error messages. '' when unavailable."""
        ...

    async def list_opted_in(self) -> list[InstanceInfo]:
        """Every instance that opted in (hestia.enable=true), running or not."""
        ...

    def events(self) -> AsyncIterator[BackendEvent]:
        """Instance events as they happen, forever, until the backend is closed."""
        ...

    def self_networks(self) -> set[str]:
        """Networks Hestia itself is attached to (empty when Hestia runs on the host)."""
        ...

    def is_self(self, info: InstanceInfo) -> bool:
        """True when the instance is Hestia's own container."""
        ...

    async def close(self) -> None: ...


def resolve_address(
    info: InstanceInfo, port: int | None, self_networks: set[str]
) -> tuple[str, int] | None:
    """Where to reach an instance, when no `url` is configured.

    1. The port: `port` (hestia.port / config) or, if the image exposes exactly one port, that
       one, else 80.
    2. Hestia in a container: the instance's IP on a network both share.
    3. Hestia on the host: the published port on the host, if the port is published
       (0.0.0.0 / :: become 127.0.0.1); else the instance's IP on its first network.
    """
    if port is None:
        port = info.exposed[0] if len(info.exposed) == 1 else 80
    shared = [net for net in info.networks if net in self_networks]
    for net in shared:
        if info.networks[net]:
            return info.networks[net], port
    if not self_networks and port in info.published:
        host_ip, host_port = info.published[port]
        if host_ip in ("", "0.0.0.0", "::"):
            host_ip = "127.0.0.1"
        return host_ip, host_port
    for ip in info.networks.values():
        if ip:
            return ip, port
    return None
