"""Docker backend: the only module of Hestia that imports docker-py.

`DockerEngine` is one Docker engine (an endpoint of `docker.endpoints`, or the local engine):
a docker-py client made on first use and made again until the engine answers (an engine that
is down at start-up must not keep Hestia down), a small thread pool for docker-py's blocking
calls, and events pumps (the shared EventPump: reconnect with back-off, resume). docker-py's
exceptions are translated once, in `_mapped`, into InstanceNotFound / BackendError. The Swarm
backend (backends/swarm.py) drives its services through a `DockerEngine` too, so docker-py is
still imported here only.

`DockerBackend` runs containers on one engine. Docker's networking (shared networks, published
ports on that engine's host, "is this Hestia's own container") stays in here: the lifecycle
only sees an address.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from ipaddress import ip_address
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import docker
import docker.errors
import docker.tls
from loguru import logger

from hestia.backends.base import (
    BackendEvent,
    HealthState,
    InstanceInfo,
    InstanceNotFound,
    StopResult,
)
from hestia.backends.events import EventPump
from hestia.config import DockerTLS, ServiceConfig
from hestia.errors import BackendError

T = TypeVar("T")

# Connecting (and docker-py's version check) may take this long: an endpoint whose host is
# down must not hold up start-up, or a call, for docker-py's default minute.
CONNECT_TIMEOUT_S = 5.0
# Every later call: docker-py's default (a stop adds its own timeout to it).
CALL_TIMEOUT_S = 60.0
# The label of a Swarm task's container: such containers are the Swarm backend's business.
SWARM_SERVICE_LABEL = "com.docker.swarm.service.id"

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
def _mapped(
    what: str, where: str = "the Docker engine", missing: str = "the container does not exist"
) -> Iterator[None]:
    """docker-py's exceptions -> ours, once. `what`: e.g. "starting container 'ollama'";
    `where`: the engine, for "cannot reach"; `missing`: what a 404 means."""
    try:
        yield
    except docker.errors.NotFound as exc:
        raise InstanceNotFound(f"{what}: {missing}") from exc
    except docker.errors.APIError as exc:
        raise BackendError(f"{what}: Docker refused: {exc.explanation or exc}") from exc
    except docker.errors.DockerException as exc:
        raise BackendError(f"{what} failed: {exc}") from exc
    except OSError as exc:  # the socket itself (engine gone, proxy down)
        raise BackendError(f"{what} failed: cannot reach {where} ({exc})") from exc


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def parse_time(stamp: str | None) -> float:
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
    host: str = "127.0.0.1",
    local: bool = True,
) -> InstanceInfo:
    """docker inspect's answer -> InstanceInfo, with the address for `port` (see
    `resolve_address`; `host`, `local`: the engine's)."""
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
        address=resolve_address(networks, published, exposed, port, self_networks, host, local),
        lineage=_lineage(labels),
        created=parse_time(data.get("Created")),
        started_at=state.get("StartedAt"),
        is_self=self_id is not None and data["Id"] == self_id,
    )


def resolve_address(
    networks: dict[str, str],
    published: dict[int, tuple[str, int]],
    exposed: tuple[int, ...],
    port: int | None,
    self_networks: frozenset[str],
    host: str = "127.0.0.1",
    local: bool = True,
) -> tuple[str, int] | None:
    """Where to reach a container, when no `url` is configured.

    1. The port: `port` (hestia.port / config) or, if the image exposes exactly one port, that
       one, else 80.
    2. Hestia in a container on this engine: the container's IP on a network both share.
    3. Else the published port on the engine's `host` (0.0.0.0 / :: become `host`, and on a
       remote engine so does its loopback); else, on the local engine only, the container's
       IP on its first network (a remote engine's networks are not Hestia's).
    """
    if port is None:
        port = exposed[0] if len(exposed) == 1 else 80
    for net, ip in networks.items():
        if net in self_networks and ip:
            return ip, port
    if not self_networks and port in published:
        host_ip, host_port = published[port]
        if host_ip in ("", "0.0.0.0", "::") or (not local and is_loopback(host_ip)):
            host_ip = host
        return host_ip, host_port
    if local:
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
    if SWARM_SERVICE_LABEL in attrs:
        return None  # a Swarm task's container: Swarm runs it, the swarm backend follows it
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


def _inspect_container(ref: str) -> Callable[[Any], dict[str, Any]]:
    return lambda client: cast(dict[str, Any], client.inspect_container(ref))


def update_replicas(client: Any, ref: str, replicas: int) -> bool:
    """Scale a replicated Swarm service to `replicas` the way `docker service scale` does:
    its spec as it is, with only the count changed (no defaults filled in, so the tasks'
    template does not change and nothing is redeployed). Retries a write that raced another
    update. False: it already had that count. Blocking."""
    for attempt in range(3):
        service = client.inspect_service(ref)
        spec = service.get("Spec") or {}
        replicated = (spec.get("Mode") or {}).get("Replicated")
        if replicated is None:
            raise BackendError(f"Swarm service {ref!r} is not in replicated mode; not scaling it")
        if replicated.get("Replicas") == replicas:
            return False
        try:
            client.update_service(
                service["ID"],
                service["Version"]["Index"],
                task_template=spec.get("TaskTemplate"),
                name=spec.get("Name"),
                labels=spec.get("Labels"),
                mode={"Replicated": {**replicated, "Replicas": replicas}},
                update_config=spec.get("UpdateConfig"),
                rollback_config=spec.get("RollbackConfig"),
                endpoint_spec=spec.get("EndpointSpec"),
            )
        except docker.errors.APIError as exc:
            if "out of sequence" in str(exc.explanation or exc) and attempt < 2:
                continue  # someone else updated it in between: read it again
            raise
        return True
    return True


class DockerEngine:
    """One Docker engine, as Hestia reaches it: `url` (None: DOCKER_HOST or the local
    socket), TLS, and `host`, the address its published ports are reached at.

    The docker-py client is made on first use and, while the engine does not answer, again
    on every use after that: nothing here raises at construction, so an endpoint that is down
    at start-up leaves Hestia starting, with that endpoint's services unreachable until the
    engine answers (its events pump retries with back-off and reports `reconnected`)."""

    def __init__(
        self,
        name: str = "local",
        url: str | None = None,
        *,
        tls: DockerTLS | None = None,
        host: str | None = None,
        self_container: str | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self._tls = tls
        if host is None:
            parsed = urlsplit(url or "")
            remote = url is not None and parsed.scheme not in ("unix", "npipe")
            host = (parsed.hostname or "127.0.0.1") if remote else "127.0.0.1"
        self.host = host
        # Published ports on a loopback host are this machine's; elsewhere a container's own
        # IP means nothing to Hestia.
        self.local = is_loopback(host)
        self._self_container = self_container
        self.self_id: str | None = None
        self.self_networks: frozenset[str] = frozenset()  # names and ids
        self.self_labels: dict[str, str] = {}
        self._client: Any = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix=f"hestia-{name}")
        self._closed = False

    def describe(self) -> str:
        if self.url is None:
            return "the Docker engine"
        return f"Docker endpoint {self.name!r} ({self.url})"

    def api(self) -> Any:
        """The docker-py APIClient, connecting if needed. Blocking: call it on a thread.
        Raises BackendError while the engine cannot be reached."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Any:
        try:
            if self.url is None:
                client = docker.from_env(version="auto", timeout=CONNECT_TIMEOUT_S).api
            else:
                kwargs: dict[str, Any] = {}
                tls = self._tls
                if tls is not None:
                    kwargs["tls"] = docker.tls.TLSConfig(
                        client_cert=(tls.cert, tls.key) if tls.cert and tls.key else None,
                        ca_cert=tls.ca,
                        verify=tls.verify,
                    )
                if self.url.startswith("ssh://"):
                    kwargs["use_ssh_client"] = True  # the ssh command and its ~/.ssh/config
                client = docker.APIClient(
                    base_url=self.url, version="auto", timeout=CONNECT_TIMEOUT_S, **kwargs
                )
        except (docker.errors.DockerException, OSError) as exc:
            hint = (
                "is the daemon running and is /var/run/docker.sock mounted (or DOCKER_HOST set)?"
                if self.url is None
                else "is the engine running and reachable from here?"
            )
            raise BackendError(f"cannot reach {self.describe()} ({exc}); {hint}") from exc
        client.timeout = CALL_TIMEOUT_S
        self._find_self(client)
        return client

    def _find_self(self, client: Any) -> None:
        own = self._self_container or _own_container_id()
        if not own:
            return
        try:
            me = client.inspect_container(own)
        except docker.errors.NotFound:
            logger.debug("Hestia's container {} is not on {}", own, self.describe())
            return
        except (docker.errors.DockerException, OSError):
            logger.warning("running in container {} but cannot inspect it", own)
            return
        networks = (me.get("NetworkSettings") or {}).get("Networks") or {}
        ids = {(net or {}).get("NetworkID") for net in networks.values()}
        self.self_id = me["Id"]
        self.self_networks = frozenset(networks) | frozenset(i for i in ids if i)
        self.self_labels = dict((me.get("Config") or {}).get("Labels") or {})

    async def call(
        self, what: str, fn: Callable[[Any], T], missing: str = "the container does not exist"
    ) -> T:
        """`fn(client)` on the engine's thread pool, with docker-py's errors translated."""
        loop = asyncio.get_running_loop()
        where = self.describe()
        if self._closed:
            raise BackendError(f"{what}: the connection to {where} is closed (shutting down)")

        def run() -> T:
            with _mapped(what, where, missing):
                return fn(self.api())

        return await loop.run_in_executor(self._pool, run)

    def pump(
        self,
        label: str,
        filters: dict[str, Any],
        convert: Callable[[dict[str, Any]], BackendEvent | None],
    ) -> EventPump[dict[str, Any]]:
        """An events pump over this engine's /events with `filters`."""
        return EventPump(
            label,
            lambda since: self.api().events(decode=True, filters=filters, since=since),
            convert,
            _resume_point,
            lambda stream: stream.close(),  # type: ignore[attr-defined]
            # a little back: events of the last moment may come twice, none is lost; the
            # registry checks each against a fresh inspect
            lambda: f"{time.time() - 0.2:.6f}",
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()


class DockerBackend:
    """Containers on one Docker engine. `name`: the backend's key in the gateway (`docker`
    for the default endpoint, `docker@gpu` for the others)."""

    def __init__(
        self,
        base_url: str | None = None,
        self_container: str | None = None,
        *,
        engine: DockerEngine | None = None,
        name: str = "docker",
    ) -> None:
        self.name = name
        self.engine = engine or DockerEngine(url=base_url, self_container=self_container)
        self._warned: set[str] = set()
        self._pump = self.engine.pump(name, {"type": "container"}, event_from_raw)

    def _info(self, data: dict[str, Any], port: int | None) -> InstanceInfo:
        e = self.engine
        return info_from_inspect(data, port, e.self_networks, e.self_id, e.host, e.local)

    async def inspect(self, ref: str, spec: ServiceConfig) -> InstanceInfo:
        data = await self.engine.call(
            f"inspecting container {ref!r}", lambda c: c.inspect_container(ref)
        )
        return self._info(data, spec.port)

    async def start(self, ref: str, spec: ServiceConfig) -> None:
        own = self.engine.self_id
        if own is not None and ref in (own, own[:12]):
            raise BackendError(f"container {ref!r} is Hestia's own container; not starting it")
        call = asyncio.ensure_future(
            self.engine.call(f"starting container {ref!r}", lambda c: c.start(ref))
        )
        try:
            await asyncio.shield(call)
        except asyncio.CancelledError:
            # docker-py's request goes on in its thread and the container may start after
            # this: return from the cancel only once it is over, so a stop sent next is not
            # overtaken by it (bounded by the client's timeout)
            await asyncio.wait([call])
            if not call.cancelled():
                call.exception()  # seen: a failed start after a cancel is not news
            raise

    async def stop(self, ref: str, spec: ServiceConfig, timeout: float) -> StopResult:
        seconds = max(0, round(timeout))
        t0 = time.monotonic()
        await self.engine.call(
            f"stopping container {ref!r}", lambda c: c.stop(ref, timeout=seconds)
        )
        took = time.monotonic() - t0
        killed = False
        if took >= seconds:
            with contextlib.suppress(BackendError):
                data = await self.engine.call(
                    f"inspecting container {ref!r}", lambda c: c.inspect_container(ref)
                )
                killed = (data.get("State") or {}).get("ExitCode") == 137
        return StopResult(killed=killed)

    async def logs_tail(self, ref: str, lines: int = 20) -> str:
        try:
            raw = await self.engine.call(
                f"reading the logs of {ref!r}",
                lambda c: c.logs(ref, tail=lines, stdout=True, stderr=True),
            )
        except BackendError:
            return ""
        return raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else str(raw)

    async def discover(self) -> list[InstanceInfo]:
        rows = await self.engine.call(
            "listing labelled containers",
            lambda c: c.containers(all=True, filters={"label": "hestia.enable"}),
        )
        out = []
        for row in rows:
            labels = row.get("Labels") or {}
            if SWARM_SERVICE_LABEL in labels:
                self._swarm_task(row, labels)
                continue
            cid: str = row["Id"]
            try:
                data = await self.engine.call(
                    f"inspecting container {cid[:12]}", _inspect_container(cid)
                )
            except InstanceNotFound:
                continue  # removed between list and inspect
            labels = (data.get("Config") or {}).get("Labels") or {}
            port = labels.get("hestia.port")
            out.append(self._info(data, int(port) if port and port.isdigit() else None))
        return out

    def _swarm_task(self, row: dict[str, Any], labels: dict[str, str]) -> None:
        service = labels.get("com.docker.swarm.service.name", labels[SWARM_SERVICE_LABEL])
        if service in self._warned:
            return
        self._warned.add(service)
        logger.warning(
            "container {} is a task of Swarm service {} and carries hestia.* labels: Hestia "
            "does not start or stop a Swarm task's container (Swarm would replace it); put "
            "the labels on the service (deploy.labels in a stack file) and enable the swarm "
            "backend",
            ((row.get("Names") or ["?"])[0]).lstrip("/"),
            service,
        )

    def events(self) -> Any:
        return self._pump.events()

    async def close(self) -> None:
        self._pump.close()
        self.engine.close()
