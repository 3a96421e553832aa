"""Docker backend: the only module of Hestia that imports docker-py.

docker-py is blocking, so every call runs on a small thread pool of our own; the events stream
gets a dedicated thread that hands events to the event loop. docker-py's exceptions are
translated here, once, into InstanceNotFound / BackendError.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import docker
import docker.errors
from loguru import logger

from hestia.backends.base import BackendEvent, HealthState, InstanceInfo, InstanceNotFound
from hestia.config import label_enabled
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


def _info_from_inspect(data: dict[str, Any]) -> InstanceInfo:
    state = data.get("State") or {}
    config = data.get("Config") or {}
    health_data = state.get("Health")
    health: HealthState = "none"
    health_output = ""
    if health_data:
        health = health_data.get("Status", "starting") or "starting"
        if health not in ("starting", "healthy", "unhealthy"):
            health = "starting"
        log = health_data.get("Log") or []
        if log:
            health_output = str(log[-1].get("Output", "")).strip()
    elif not (config.get("Healthcheck") or {}).get("Test") or (
        (config.get("Healthcheck") or {}).get("Test") == ["NONE"]
    ):
        health = "none"
    else:
        health = "starting"
    networks = {
        name: (net or {}).get("IPAddress", "")
        for name, net in ((data.get("NetworkSettings") or {}).get("Networks") or {}).items()
    }
    published: dict[int, tuple[str, int]] = {}
    for key, binds in ((data.get("NetworkSettings") or {}).get("Ports") or {}).items():
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
    return InstanceInfo(
        id=data["Id"],
        name=data.get("Name", "").lstrip("/"),
        running=bool(state.get("Running")),
        status=state.get("Status", "unknown"),
        health=health,
        health_output=health_output,
        exit_code=state.get("ExitCode"),
        labels=dict(config.get("Labels") or {}),
        networks=networks,
        published=published,
        exposed=exposed,
        started_at=state.get("StartedAt"),
    )


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
        self._closed = False
        self._event_streams: list[Any] = []
        self._self_id: str | None = None
        self._self_networks: set[str] = set()
        own = self_container or _own_container_id()
        if own:
            try:
                me = self._client.inspect_container(own)
                self._self_id = me["Id"]
                self._self_networks = set(
                    ((me.get("NetworkSettings") or {}).get("Networks") or {}).keys()
                )
            except docker.errors.DockerException:
                logger.warning("running in container {} but cannot inspect it", own)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def inspect(self, ref: str) -> InstanceInfo:
        try:
            data = await self._call(self._client.inspect_container, ref)
        except docker.errors.NotFound as exc:
            raise InstanceNotFound(f"container {ref!r} does not exist") from exc
        except docker.errors.DockerException as exc:
            raise BackendError(f"inspecting container {ref!r} failed: {exc}") from exc
        return _info_from_inspect(data)

    async def start(self, ref: str) -> None:
        try:
            await self._call(self._client.start, ref)
        except docker.errors.NotFound as exc:
            raise InstanceNotFound(f"container {ref!r} does not exist") from exc
        except docker.errors.APIError as exc:
            raise BackendError(
                f"Docker refused to start container {ref!r}: {exc.explanation or exc}"
            ) from exc
        except docker.errors.DockerException as exc:
            raise BackendError(f"starting container {ref!r} failed: {exc}") from exc

    async def stop(self, ref: str, timeout: float = 10.0) -> None:
        try:
            await self._call(self._client.stop, ref, timeout=int(timeout))
        except docker.errors.NotFound as exc:
            raise InstanceNotFound(f"container {ref!r} does not exist") from exc
        except docker.errors.DockerException as exc:
            raise BackendError(f"stopping container {ref!r} failed: {exc}") from exc

    async def logs_tail(self, ref: str, lines: int = 20) -> str:
        try:
            raw = await self._call(self._client.logs, ref, tail=lines, stdout=True, stderr=True)
        except docker.errors.DockerException:
            return ""
        return raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else str(raw)

    async def list_opted_in(self) -> list[InstanceInfo]:
        try:
            rows = await self._call(
                self._client.containers, all=True, filters={"label": "hestia.enable"}
            )
        except docker.errors.DockerException as exc:
            raise BackendError(f"listing containers failed: {exc}") from exc
        out = []
        for row in rows:
            if not label_enabled(row.get("Labels") or {}):
                continue
            try:
                out.append(await self.inspect(row["Id"]))
            except InstanceNotFound:
                continue  # removed between list and inspect
        return out

    def self_networks(self) -> set[str]:
        return set(self._self_networks)

    def is_self(self, info: InstanceInfo) -> bool:
        return self._self_id is not None and info.id == self._self_id

    async def events(self) -> AsyncIterator[BackendEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[BackendEvent | BaseException] = asyncio.Queue()
        stop = threading.Event()

        def pump() -> None:
            since: int | None = None  # after a reconnect, resume where the stream broke off
            while not stop.is_set() and not self._closed:
                try:
                    stream = self._client.events(
                        decode=True, filters={"type": "container"}, since=since
                    )
                    self._event_streams.append(stream)
                    for raw in stream:
                        since = raw.get("time", since)
                        ev = _event_from_raw(raw)
                        if ev is not None:
                            loop.call_soon_threadsafe(queue.put_nowait, ev)
                except Exception as exc:
                    if stop.is_set() or self._closed:
                        return
                    logger.warning("Docker events stream broke ({}); reconnecting in 1s", exc)
                    stop.wait(1.0)

        thread = threading.Thread(target=pump, name="hestia-docker-events", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            self._close_streams()

    def _close_streams(self) -> None:
        for stream in self._event_streams:
            with contextlib.suppress(Exception):
                stream.close()
        self._event_streams.clear()

    async def close(self) -> None:
        self._closed = True
        self._close_streams()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self._client.close()


def _event_from_raw(raw: dict[str, Any]) -> BackendEvent | None:
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
