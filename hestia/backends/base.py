"""The Backend protocol: the few operations the lifecycle and the registry need from whatever
runs a service's instance (a Docker container today; a Swarm service, a container on another
Docker host, a Semaphore task, a host process).

A backend speaks of *instances*: it starts, stops and inspects one, tells what it printed last,
discovers the instances that opted in, and reports what happens to them as events. It hands
back an *address* to proxy to; how it finds one (shared networks, published ports, a URL) is
its own business. It knows nothing about requests, idle time or states: that is the
lifecycle's job.

Errors: `InstanceNotFound` when the instance does not exist, `BackendError` (hestia.errors) for
anything else the backend refused. Implementations translate their library's exceptions once,
at their boundary.

Adding a backend: implement this protocol in `hestia/backends/<name>.py` (the only module that
imports its client library), add its name to `config.KNOWN_BACKENDS`, and build it in
`hestia/backends/__init__.py:build_backends()` from its config section.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from hestia.config import ServiceConfig
from hestia.errors import BackendError

__all__ = [
    "Backend",
    "BackendError",
    "BackendEvent",
    "InstanceInfo",
    "InstanceNotFound",
    "StopResult",
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
    status: str  # the backend's own word: created, running, exited, restarting, ...
    health: HealthState = "none"  # "none": the instance has no health check of its own
    health_output: str = ""  # last health check's output, for error messages
    exit_code: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    # Where to reach the instance for the service's port, when the backend can tell.
    address: tuple[str, int] | None = None
    # The instance's whole base URL when the backend knows it (a host process's `url` with
    # the port it was started on): the lifecycle uses it as it uses a service's `url`.
    url: str | None = None
    # Instances with the same non-empty `lineage` replace each other (a compose service's
    # container re-created by `docker compose up -d`): the newest one is the service's.
    lineage: str = ""
    created: float = 0.0  # epoch seconds
    started_at: str | None = None
    # True for the gateway's own instance: never started, stopped or proxied to.
    is_self: bool = False
    # Why the backend will not manage this instance (a global-mode Swarm service cannot scale
    # to zero), or "": the registry lists the reason in the service's status (conflicts) and
    # logs it; the backend reports it not running and refuses to start it, with the reason.
    refused: str = ""


EventKind = Literal[
    "create",
    "destroy",
    "rename",
    "start",
    "die",
    "stop",
    "health",
    "update",
    # the backend lost / regained its connection to what runs the instances
    "disconnected",
    "reconnected",
]


@dataclass(frozen=True)
class BackendEvent:
    kind: EventKind
    id: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    health: HealthState | None = None  # for kind == "health"
    exit_code: int | None = None  # for kind == "die"
    old_name: str | None = None  # for kind == "rename"
    # for kind == "disconnected": why; for kind == "die": what the backend knows of the
    # exit (a host process's last output lines)
    reason: str = ""
    # for kind == "die": the backend counts this exit as a failure (a host process that
    # exited non-zero on its own): the lifecycle goes to failed rather than stopped
    crashed: bool = False


@dataclass(frozen=True)
class StopResult:
    killed: bool = False  # the instance did not stop within the timeout and was killed


class Backend(Protocol):
    name: str

    async def inspect(self, ref: str, spec: ServiceConfig) -> InstanceInfo:
        """Current facts about an instance (by name or id), with its address for `spec`'s
        port. Raises InstanceNotFound."""
        ...

    async def start(self, ref: str, spec: ServiceConfig) -> None:
        """Start a stopped instance; returns once the backend accepted it (not once ready)."""
        ...

    async def stop(self, ref: str, spec: ServiceConfig, timeout: float) -> StopResult:
        """Stop a running instance, gracefully within `timeout` seconds, then forcibly."""
        ...

    async def logs_tail(self, ref: str, lines: int = 20) -> str:
        """The last lines the instance printed, for error messages. '' when unavailable."""
        ...

    async def discover(self) -> list[InstanceInfo]:
        """Every instance that opted in with labels (hestia.enable), running or not.
        Backends without labels return []."""
        ...

    def events(self) -> AsyncIterator[BackendEvent]:
        """Instance events as they happen, until the backend is closed. The subscription
        starts with this call (not with the first iteration): the registry subscribes, then
        lists, so nothing that happens in between is missed. Backends without an event
        source never yield."""
        ...

    async def close(self) -> None: ...
