"""Readiness strategies: when is a started instance ready to take requests?

- its own health check (Docker's HEALTHCHECK): ready when the backend says `healthy`, failed
  when it says `unhealthy`;
- `http`: a GET of `health.path` answers (any status below 500, or exactly `health.status`);
- `tcp`: the port accepts a connection.

`auto` picks the instance's own health check when it has one, else HTTP. The lifecycle asks
`check()` in a loop and waits for an instance event or the returned delay in between; it
knows nothing of HTTP or TCP itself.
"""

from __future__ import annotations

from typing import Literal

from hestia.address import Upstream
from hestia.backends.base import InstanceInfo
from hestia.config import HealthConfig
from hestia.errors import ServiceStartFailed
from hestia.probes import http_probe, tcp_probe

# How long to wait for a health event before looking again, when the instance's own health
# check decides (events wake the wait earlier).
OWN_CHECK_RECHECK_S = 1.0

Mode = Literal["own", "http", "tcp"]


def mode_for(health: HealthConfig, info: InstanceInfo) -> Mode:
    if health.type == "docker" or (health.type == "auto" and info.health != "none"):
        return "own"
    return "tcp" if health.type == "tcp" else "http"


def probe_path(health: HealthConfig, upstream: Upstream) -> str:
    path = health.path if health.path.startswith("/") else "/" + health.path
    return upstream.base_path.decode("latin-1") + path


async def check(
    service: str, health: HealthConfig, info: InstanceInfo, upstream: Upstream
) -> float | None:
    """None when the instance is ready; else how long to wait before the next check.
    Raises ServiceStartFailed when the instance's own health check reports it unhealthy."""
    mode = mode_for(health, info)
    if mode == "own":
        if info.health == "healthy":
            return None
        if info.health == "unhealthy":
            raise ServiceStartFailed(
                f"instance {info.name!r} of service {service!r} failed its health check: "
                f"{info.health_output or 'no output'}",
                service=service,
                detail={"health_output": info.health_output},
            )
        return OWN_CHECK_RECHECK_S
    if mode == "tcp":
        return None if await tcp_probe(upstream.host, upstream.port) else health.interval
    status = await http_probe(
        upstream.host,
        upstream.port,
        probe_path(health, upstream),
        upstream.host_header.decode("latin-1"),
    )
    expected = health.status
    if status is not None and (status == expected if expected else status < 500):
        return None
    return health.interval
