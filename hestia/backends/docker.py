"""Docker backend: the only module of Hestia that imports docker-py.

docker-py is blocking, so every call runs on a small thread pool of our own; the events stream
is followed by the shared EventPump. docker-py's exceptions are translated once, in `_mapped`,
into InstanceNotFound / BackendError. Docker's networking (shared networks, published ports,
"is this Hestia's own container") stays in here: the lifecycle only sees an address.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar, cast

import docker
import docker.errors
from loguru import logger

from hestia.backends.base import (
    BackendEvent,
    HealthState,
    InstanceInfo,
    InstanceNotFound,
    StopResult,
)
from hestia.backends.events import EventPump
from hestia.config import ServiceConfig
from hestia.errors import BackendError

T = TypeVar("T")

_CONTAINER_ID = re.compile(r"/(?:docker/containers|docker|containerd)/([0-9a-f]{64})")
_EVENT_KINDS = {
    "create": "create",
    "destroy": "destroy",
    "rename": "rename",
    "start": "start",
    "die": "die",
    "stop": "stop",
    "update": "update",
}


def _own_container_id() -> str | None:
    """Hestia's container id when it runs in a container, from cgroup/mountinfo or hostname."""
    for path in ("/proc/self/mountinfo", "/proc/self/cgroup"):
        try:
            with open(path) as fh:
                m = _CONTAINER_ID.search(fh.read())
        except OSError:
            continue
        if m:
            return m.group(1)
    if os.path.exists("/.dockerenv"):
        return os.environ.get("HOSTNAME")
    return None


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """docker-py's exceptions -> ours, once. `what`: e.g. "starting container 'ollama'"."""
    try:
        yield
    except docker.errors.NotFound as exc:
        raise InstanceNotFound(f"{what}: the container does not exist") from exc
    except docker.errors.APIError as exc:
        raise BackendError(f"{what}: Docker refused: {exc.explanation or exc}") from exc
    except docker.errors.DockerException as exc:
        raise BackendError(f"{what} failed: {exc}") from exc
    except OSError as exc:  # the socket itself (engine gone, proxy down)
        raise BackendError(f"{what} failed: cannot reach the Docker engine ({exc})") from exc


def _parse_time(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    # Docker: 2024-05-01T10:20:30.123456789Z (nanoseconds; fromisoformat takes microseconds)
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", stamp)
    if not m:
        return 0.0
    frac = (m.group(2) or ".0")[:7]
    zone = m.group(3) or "Z"
    zone = "+00:00" if zone == "Z" else zone
    try:
        return datetime.fromisoformat(m.group(1) + frac + zone).timestamp()
    except ValueError:
        return 0.0


def _lineage(labels: dict[str, str]) -> str:
    """Containers of one compose service (and replica number) replace each other."""
    project = labels.get("com.docker.compose.project")
    service = labels.get("com.docker.compose.service")
    if not project or not service:
        return ""
    number = labels.get("com.docker.compose.container-number", "1")
    return f"compose:{project}/{service}/{number}"


def info_from_inspect(
    data: dict[str, Any],
    port: int | None = None,
    self_networks: frozenset[str] = frozenset(),
    self_id: str | None = None,
) -> InstanceInfo:
    """docker inspect's answer -> InstanceInfo, with the address for `port` (see
    `resolve_address`)."""
    state = data.get("State") or {}
    config = data.get("Config") or {}
    health_data = state.get("Health")
    health: HealthState = "none"
    health_output = ""
    test = (config.get("Healthcheck") or {}).get("Test")
    if health_data:
        status = health_data.get("Status", "starting") or "starting"
        if status in ("starting", "healthy", "unhealthy"):
            health = cast(HealthState, status)
        log = health_data.get("Log") or []
        if log:
            health_output = str(log[-1].get("Output", "")).strip()
    elif test and test != ["NONE"]:
        health = "starting"
    settings = data.get("NetworkSettings") or {}
    networks = {
        name: (net or {}).get("IPAddress", "")
        for name, net in (settings.get("Networks") or {}).items()
    }
    published: dict[int, tuple[str, int]] = {}
    for key, binds in (settings.get("Ports") or {}).items():
        port_s, _, proto = key.partition("/")
        if proto != "tcp" or not binds:
            continue
        for bind in binds:
            host_ip = bind.get("HostIp", "")
            if host_ip == "::" and int(port_s) in published:
                continue
            published[int(port_s)] = (host_ip, int(bind["HostPort"]))
    exposed = tuple(
        sorted(
            int(k.partition("/")[0])
            for k in (config.get("ExposedPorts") or {})
            if k.endswith("/tcp")
        )
    )
    labels = dict(config.get("Labels") or {})
    return InstanceInfo(
        id=data["Id"],
        name=data.get("Name", "").lstrip("/"),
        running=bool(state.get("Running")),
        status=state.get("Status", "unknown"),
        health=health,
        health_output=health_output,
        exit_code=state.get("ExitCode"),
        labels=labels,
        address=resolve_address(networks, published, exposed, port, self_networks),
        lineage=_lineage(labels),
        created=_parse_time(data.get("Created")),
        started_at=state.get("StartedAt"),
        is_self=self_id is not None and data["Id"] == self_id,
    )


def resolve_address(
    networks: dict[str, str],
    published: dict[int, tuple[str, int]],
    exposed: tuple[int, ...],
    port: int | None,
    self_networks: frozenset[str],
) -> tuple[str, int] | None:
    """Where to reach a container, when no `url` is configured.

    1. The port: `port` (hestia.port / config) or, if the image exposes exactly one port, that
       one, else 80.
    2. Hestia in a container: the container's IP on a network both share.
    3. Hestia on the host: the published port on the host, if the port is published
       (0.0.0.0 / :: become 127.0.0.1); else the container's IP on its first network.
    """
    if port is None:
        port = exposed[0] if len(exposed) == 1 else 80
    for net, ip in networks.items():
        if net in self_networks and ip:
            return ip, port
    if not self_networks and port in published:
        host_ip, host_port = published[port]
        if host_ip in ("", "0.0.0.0", "::"):
            host_ip = "127.0.0.1"
        return host_ip, host_port
    for ip in networks.values():
        if ip:
            return ip, port
    return None


def _resume_point(raw: dict[str, Any]) -> str | None:
    """Docker's `since` for resuming after this event (seconds, with the nanoseconds)."""
    nanos = raw.get("timeNano")
    if isinstance(nanos, int):
        return f"{nanos // 1_000_000_000}.{nanos % 1_000_000_000:09d}"
    stamp = raw.get("time")
    return str(stamp) if stamp is not None else None


def event_from_raw(raw: dict[str, Any]) -> BackendEvent | None:
    """One decoded Docker event -> BackendEvent (None: not one the registry follows)."""
    if raw.get("Type", "container") != "container":
        return None
    action = str(raw.get("Action") or raw.get("status") or "")
    actor = raw.get("Actor") or {}
    attrs: dict[str, str] = dict(actor.get("Attributes") or {})
    cid = actor.get("ID") or raw.get("id") or ""
    name = attrs.get("name", "")
    if action.startswith("health_status"):
        status = action.partition(":")[2].strip()
        health: HealthState = "starting"
        if status == "healthy":
            health = "healthy"
        elif status == "unhealthy":
            health = "unhealthy"
        return BackendEvent("health", cid, name, attrs, health=health)
    kind = _EVENT_KINDS.get(action)
    if kind is None:
        return None
    exit_code = None
    if kind == "die":
        with contextlib.suppress(ValueError):
            exit_code = int(attrs.get("exitCode", ""))
    old = attrs.get("oldName", "").lstrip("/") or None
    return BackendEvent(kind, cid, name, attrs, exit_code=exit_code, old_name=old)  # type: ignore[arg-type]


class DockerBackend:
    name = "docker"

    def __init__(self, base_url: str | None = None, self_container: str | None = None) -> None:
        try:
            if base_url:
                self._client = docker.APIClient(base_url=base_url, version="auto")
            else:
                self._client = docker.from_env(version="auto").api
            self._client.ping()
        except docker.errors.DockerException as exc:
            raise BackendError(
                f"cannot reach the Docker engine ({exc}); is the daemon running and is "
                "/var/run/docker.sock mounted (or DOCKER_HOST set)?"
            ) from exc
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="hestia-docker")
        self._self_id: str | None = None
        self._self_networks: frozenset[str] = frozenset()
        own = self_container or _own_container_id()
        if own:
            try:
                me = self._client.inspect_container(own)
                self._self_id = me["Id"]
                self._self_networks = frozenset(
                    ((me.get("NetworkSettings") or {}).get("Networks") or {}).keys()
                )
            except docker.errors.DockerException:
                logger.warning("running in container {} but cannot inspect it", own)
        self._pump: EventPump[dict[str, Any]] = EventPump(
            "Docker",
            lambda since: self._client.events(
                decode=True, filters={"type": "container"}, since=since
            ),
            event_from_raw,
            _resume_point,
            lambda stream: stream.close(),  # type: ignore[attr-defined]
            # a little back: events of the last moment may come twice, none is lost; the
            # registry checks each against a fresh inspect
            lambda: f"{time.time() - 0.2:.6f}",
        )

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _info(self, data: dict[str, Any], port: int | None) -> InstanceInfo:
        return info_from_inspect(data, port, self._self_networks, self._self_id)

    async def inspect(self, ref: str, spec: ServiceConfig) -> InstanceInfo:
        with _mapped(f"inspecting container {ref!r}"):
            data = await self._call(self._client.inspect_container, ref)
        return self._info(data, spec.port)

    async def start(self, ref: str, spec: ServiceConfig) -> None:
        if self._self_id is not None and ref in (self._self_id, self._self_id[:12]):
            raise BackendError(f"container {ref!r} is Hestia's own container; not starting it")
        with _mapped(f"starting container {ref!r}"):
            await self._call(self._client.start, ref)

    async def stop(self, ref: str, spec: ServiceConfig, timeout: float) -> StopResult:
        seconds = max(0, round(timeout))
        t0 = time.monotonic()
        with _mapped(f"stopping container {ref!r}"):
            await self._call(self._client.stop, ref, timeout=seconds)
        took = time.monotonic() - t0
        killed = False
        if took >= seconds:
            with contextlib.suppress(BackendError):
                with _mapped(f"inspecting container {ref!r}"):
                    data = await self._call(self._client.inspect_container, ref)
                killed = (data.get("State") or {}).get("ExitCode") == 137
        return StopResult(killed=killed)

    async def logs_tail(self, ref: str, lines: int = 20) -> str:
        try:
            raw = await self._call(self._client.logs, ref, tail=lines, stdout=True, stderr=True)
        except (docker.errors.DockerException, OSError):
            return ""
        return raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else str(raw)

    async def discover(self) -> list[InstanceInfo]:
        with _mapped("listing labelled containers"):
            rows = await self._call(
                self._client.containers, all=True, filters={"label": "hestia.enable"}
            )
        out = []
        for row in rows:
            try:
                with _mapped(f"inspecting container {row['Id'][:12]}"):
                    data = await self._call(self._client.inspect_container, row["Id"])
            except InstanceNotFound:
                continue  # removed between list and inspect
            labels = (data.get("Config") or {}).get("Labels") or {}
            port = labels.get("hestia.port")
            out.append(self._info(data, int(port) if port and port.isdigit() else None))
        return out

    def events(self) -> Any:
        return self._pump.events()

    async def close(self) -> None:
        self._pump.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self._client.close()
