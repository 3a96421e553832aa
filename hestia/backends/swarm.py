"""Docker Swarm backend: a service is a replicated Swarm service that Hestia scales from 0 to
`replicas` on a start and back to 0 on a stop.

- Instances are Swarm services with `hestia.*` labels on the service (`deploy.labels` in a
  stack file), or named by `container:` in the config. Their id is the service id.
- start: scale to `replicas` (unless it is scaled up already) and wait until a task runs. Swarm
  holds a task with a health check in `starting` until the check passes, so "running" includes
  the task's health; the lifecycle then probes through the upstream as for a container. A task
  Swarm rejects or that fails (no such image, an exit) fails the start at once with the task's
  error, and the service is scaled back to 0 (`on_start_failure: stop`) so Swarm stops
  retrying it.
- stop: scale to 0 and wait for the tasks to end (Swarm stops them with the service's own
  `stop_grace_period`).
- running: scaled up and at least one task running. A Swarm task's container events stay on
  the node that runs it, so liveness comes from inspections (during a start, after a refused
  connection, and the periodic reconcile) and from service events (a scale by hand).
- address: the service's name on an overlay network Hestia's container is attached to; else
  its published port: in `mode: host` on the node that runs the task (its Swarm address), in
  `mode: ingress` at the endpoint's host (any node answers, where the routing mesh works).
- global (and job) mode services cannot scale to zero: reported `refused`, never started,
  stopped or proxied; the registry shows why in their status.
- events: /events of type service (create/update/remove), through the engine's EventPump.

docker-py is reached through the engine (backends/docker.py), still its only importer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, cast

from loguru import logger

from hestia.backends.base import BackendEvent, HealthState, InstanceInfo, StopResult
from hestia.backends.docker import DockerEngine, is_loopback, parse_time, update_replicas
from hestia.config import ServiceConfig
from hestia.errors import BackendError, ServiceStartFailed

# How often a start or a stop looks at the tasks (a look is two small API calls).
POLL_S = 0.25
# A stop waits for the tasks this much longer than the grace period Swarm gives them.
STOP_MARGIN_S = 10.0
DEFAULT_GRACE_S = 10.0  # Swarm's stop_grace_period when the service sets none

_MISSING = "the Swarm service does not exist"
_EVENT_KINDS = {"create": "create", "update": "update", "remove": "destroy"}
# A task in one of these states is over (it will not run again; Swarm makes a new one).
_ENDED = frozenset({"complete", "shutdown", "failed", "rejected", "remove", "orphaned"})
_FAILED = frozenset({"failed", "rejected"})

Task = dict[str, Any]


def _state(task: Task) -> str:
    return str((task.get("Status") or {}).get("State", ""))


def _current(tasks: list[Task]) -> list[Task]:
    """The tasks Swarm wants running now (the rest is history: failed, replaced, stopped)."""
    return [t for t in tasks if t.get("DesiredState") == "running"]


def running_tasks(tasks: list[Task]) -> list[Task]:
    return [t for t in _current(tasks) if _state(t) == "running"]


def replicas_of(service: dict[str, Any]) -> int | None:
    """The replica count of a replicated service; None for any other mode."""
    mode = (service.get("Spec") or {}).get("Mode") or {}
    if "Replicated" not in mode:
        return None
    return int((mode["Replicated"] or {}).get("Replicas", 1))


def refusal(service: dict[str, Any]) -> str:
    """Why Hestia will not manage this service ("" when it will)."""
    spec = service.get("Spec") or {}
    mode = spec.get("Mode") or {}
    if "Replicated" in mode:
        return ""
    kind = next(iter(mode), "unknown").lower().replace("job", " job")
    return (
        f"Swarm service {spec.get('Name', '?')} runs in {kind} mode: Hestia starts a Swarm "
        "service by scaling it from 0 and stops it by scaling it to 0, which only a "
        "replicated service can do; it is not managed (deploy it with `mode: replicated`)"
    )


def _published(service: dict[str, Any]) -> list[dict[str, Any]]:
    endpoint = (service.get("Endpoint") or {}).get("Ports")
    if endpoint:
        return list(endpoint)
    return list(((service.get("Spec") or {}).get("EndpointSpec") or {}).get("Ports") or [])


def _networks(service: dict[str, Any]) -> set[str]:
    spec = service.get("Spec") or {}
    attached = (spec.get("TaskTemplate") or {}).get("Networks") or spec.get("Networks") or []
    ids = {str(n.get("Target", "")) for n in attached}
    for vip in (service.get("Endpoint") or {}).get("VirtualIPs") or []:
        ids.add(str(vip.get("NetworkID", "")))
    ids.discard("")
    return ids


def target_port(service: dict[str, Any], port: int | None) -> int:
    """`port` (hestia.port / config), else the one published target port, else 80."""
    if port is not None:
        return port
    targets = {int(p["TargetPort"]) for p in _published(service) if p.get("TargetPort")}
    return targets.pop() if len(targets) == 1 else 80


def service_address(
    service: dict[str, Any],
    tasks: list[Task],
    port: int,
    self_networks: frozenset[str] = frozenset(),
    node_addrs: Mapping[str, str] = {},
    host: str = "127.0.0.1",
    local: bool = True,
) -> tuple[str, int] | None:
    """Where to reach a Swarm service's `port`, when no `url` is configured.

    1. Hestia's container shares an overlay network with it: the service's name (its virtual
       IP balances over the tasks).
    2. The port is published in `mode: host`: the Swarm address of the node that runs a task,
       at the port published there (`host` while no task runs yet).
    3. The port is published in `mode: ingress`: the endpoint's `host` (the routing mesh
       answers on every node).
    """
    name = str((service.get("Spec") or {}).get("Name", ""))
    if self_networks & _networks(service):
        return name, port
    for pub in _published(service):
        if int(pub.get("TargetPort") or 0) != port or pub.get("Protocol", "tcp") != "tcp":
            continue
        if pub.get("PublishMode") != "host":
            published = pub.get("PublishedPort")
            return (host, int(published)) if published else None
        for task in running_tasks(tasks):
            ports = ((task.get("Status") or {}).get("PortStatus") or {}).get("Ports") or []
            for tp in ports:
                if int(tp.get("TargetPort") or 0) == port and tp.get("PublishedPort"):
                    node = _node_host(node_addrs.get(str(task.get("NodeID"))), host, local)
                    return node, int(tp["PublishedPort"])
        published = pub.get("PublishedPort")
        return (host, int(published)) if published else None
    return None


def _node_host(addr: str | None, host: str, local: bool) -> str:
    if not addr or addr in ("0.0.0.0", "::") or (not local and is_loopback(addr)):
        return host
    return addr


def task_error(task: Task) -> str:
    status = task.get("Status") or {}
    err = str(status.get("Err") or status.get("Message") or _state(task))
    code = (status.get("ContainerStatus") or {}).get("ExitCode")
    if _state(task) == "failed" and code:
        err += f" (exit code {code})"
    return err


def start_verdict(tasks: list[Task], before: set[str]) -> tuple[str, str]:
    """What the tasks of a start say: ("running", ""), ("failed", the task's error) or
    ("waiting", why a task waits, if Swarm says). `before`: ids of tasks that were history
    before the start (their old failures are not this start's)."""
    fresh = [t for t in tasks if t.get("ID") not in before]
    if running_tasks(fresh):
        return "running", ""
    failed = [t for t in fresh if _state(t) in _FAILED]
    if failed:
        newest = max(failed, key=lambda t: str((t.get("Status") or {}).get("Timestamp", "")))
        return "failed", task_error(newest)
    waiting = [
        str((t.get("Status") or {}).get("Err") or "")
        for t in _current(fresh)
        if _state(t) in ("pending", "assigned")
    ]
    return "waiting", next((w for w in waiting if w), "")


def info_from_service(
    service: dict[str, Any],
    tasks: list[Task],
    port: int | None = None,
    *,
    self_networks: frozenset[str] = frozenset(),
    node_addrs: Mapping[str, str] = {},
    host: str = "127.0.0.1",
    local: bool = True,
    self_service: str | None = None,
    own_health: bool = False,
) -> InstanceInfo:
    """A Swarm service and its tasks -> InstanceInfo. `own_health` (health.type: docker):
    report the tasks' own health, which Swarm has checked before it calls a task running."""
    spec = service.get("Spec") or {}
    name = str(spec.get("Name", ""))
    refused = refusal(service)
    replicas = replicas_of(service) or 0
    running_now = running_tasks(tasks)
    running = not refused and replicas > 0 and bool(running_now)
    if refused:
        status = next(iter(spec.get("Mode") or {}), "unknown").lower()
    elif replicas == 0:
        status = "scaled to 0"
    elif running:
        status = f"running ({len(running_now)}/{replicas} tasks)"
    else:
        status = "starting"
    ended = [t for t in tasks if _state(t) in _ENDED]
    exit_code = None
    if ended and not running:
        last = max(ended, key=lambda t: str((t.get("Status") or {}).get("Timestamp", "")))
        exit_code = ((last.get("Status") or {}).get("ContainerStatus") or {}).get("ExitCode")
    health: HealthState = "none"
    if own_health:
        health = "healthy" if running else "starting"
    started = sorted(str((t.get("Status") or {}).get("Timestamp", "")) for t in running_now)
    return InstanceInfo(
        id=str(service.get("ID", "")),
        name=name,
        running=running,
        status=status,
        health=health,
        exit_code=exit_code,
        labels=dict(spec.get("Labels") or {}),
        address=service_address(
            service, tasks, target_port(service, port), self_networks, node_addrs, host, local
        ),
        created=parse_time(service.get("CreatedAt")),
        started_at=started[0] if started else None,
        is_self=self_service is not None and service.get("ID") == self_service,
        refused=refused,
    )


def event_from_raw(raw: dict[str, Any], labels: Mapping[str, str] = {}) -> BackendEvent | None:
    """One decoded service event -> BackendEvent; `labels`: the service's, when known (the
    event carries only its name)."""
    if raw.get("Type") != "service":
        return None
    kind = _EVENT_KINDS.get(str(raw.get("Action", "")))
    if kind is None:
        return None
    actor = raw.get("Actor") or {}
    attrs: dict[str, str] = dict(actor.get("Attributes") or {})
    return BackendEvent(
        kind,  # type: ignore[arg-type]
        str(actor.get("ID", "")),
        attrs.get("name", ""),
        {**attrs, **labels},
    )


class SwarmBackend:
    """Replicated Swarm services, through the engine of a manager node."""

    def __init__(self, engine: DockerEngine, name: str = "swarm") -> None:
        self.name = name
        self.engine = engine
        self._node_addrs: dict[str, str] = {}
        self._pump = engine.pump(name, {"type": "service"}, self._event)

    # ------------------------------------------------------------ blocking (engine threads)
    def _event(self, raw: dict[str, Any]) -> BackendEvent | None:
        """Runs on the pump's thread: a created or updated service is looked up for its
        labels, so the registry sees a newly labelled service at once."""
        event = event_from_raw(raw)
        if event is None or event.kind == "destroy":
            return event
        try:
            spec = self.engine.api().inspect_service(event.id).get("Spec") or {}
        except Exception:
            return event  # gone already, or the engine: the reconcile catches up
        return replace(event, labels={**event.labels, **(spec.get("Labels") or {})})

    def _nodes(self, client: Any, tasks: list[Task]) -> dict[str, str]:
        wanted = {str(t.get("NodeID")) for t in running_tasks(tasks) if t.get("NodeID")}
        if wanted - set(self._node_addrs):
            for node in client.nodes():
                status = node.get("Status") or {}
                addr = str(status.get("Addr") or "")
                if addr in ("", "0.0.0.0"):
                    manager = str((node.get("ManagerStatus") or {}).get("Addr") or "")
                    addr = manager.rpartition(":")[0] or addr
                self._node_addrs[str(node.get("ID"))] = addr
        return self._node_addrs

    def _look(self, ref: str) -> Callable[[Any], tuple[dict[str, Any], list[Task]]]:
        def look(client: Any) -> tuple[dict[str, Any], list[Task]]:
            service = client.inspect_service(ref)
            tasks = client.tasks(filters={"service": service["ID"]})
            self._nodes(client, tasks)
            return service, tasks

        return look

    def _tasks(self, service_id: str) -> Callable[[Any], list[Task]]:
        def tasks(client: Any) -> list[Task]:
            found = cast(list[Task], client.tasks(filters={"service": service_id}))
            self._nodes(client, found)
            return found

        return tasks

    def _discover(self, client: Any) -> list[tuple[dict[str, Any], list[Task]]]:
        services = client.services(filters={"label": "hestia.enable"})
        if not services:
            return []
        tasks = client.tasks(filters={"service": [s["ID"] for s in services]})
        self._nodes(client, tasks)
        by_service: dict[str, list[Task]] = {}
        for task in tasks:
            by_service.setdefault(str(task.get("ServiceID")), []).append(task)
        return [(s, by_service.get(s["ID"], [])) for s in services]

    # ------------------------------------------------------------ the protocol
    def _info(
        self, service: dict[str, Any], tasks: list[Task], port: int | None, own: bool
    ) -> InstanceInfo:
        e = self.engine
        return info_from_service(
            service,
            tasks,
            port,
            self_networks=e.self_networks,
            node_addrs=dict(self._node_addrs),
            host=e.host,
            local=e.local,
            self_service=e.self_labels.get("com.docker.swarm.service.id"),
            own_health=own,
        )

    async def _inspect_raw(self, ref: str) -> tuple[dict[str, Any], list[Task]]:
        return await self.engine.call(
            f"inspecting Swarm service {ref!r}", self._look(ref), missing=_MISSING
        )

    async def inspect(self, ref: str, spec: ServiceConfig) -> InstanceInfo:
        service, tasks = await self._inspect_raw(ref)
        return self._info(service, tasks, spec.port, spec.health.type == "docker")

    async def _scale(self, ref: str, replicas: int) -> None:
        await self.engine.call(
            f"scaling Swarm service {ref!r} to {replicas}",
            lambda client: update_replicas(client, ref, replicas),
            missing=_MISSING,
        )

    async def start(self, ref: str, spec: ServiceConfig) -> None:
        service, tasks = await self._inspect_raw(ref)
        name = str((service.get("Spec") or {}).get("Name", ref))
        why = refusal(service)
        if why:
            raise ServiceStartFailed(why, service=spec.name)
        sid = str(service["ID"])
        current = {str(t.get("ID")) for t in _current(tasks)}
        before = {str(t.get("ID")) for t in tasks} - current
        if not replicas_of(service):
            await self._scale(sid, spec.replicas)
        said = ""
        while True:  # bounded by the lifecycle's startup deadline (it cancels us)
            tasks = await self.engine.call(
                f"listing the tasks of Swarm service {name!r}", self._tasks(sid), missing=_MISSING
            )
            verdict, detail = start_verdict(tasks, before)
            if verdict == "running":
                return
            if verdict == "failed":
                await self._start_failed(name, sid, spec, detail)
            if detail and detail != said:
                said = detail
                logger.warning("service {}: Swarm task waits: {}", spec.name, detail)
            await asyncio.sleep(POLL_S)

    async def _start_failed(self, name: str, sid: str, spec: ServiceConfig, err: str) -> None:
        logs = await self.logs_tail(sid, 20)
        scale_down = spec.on_start_failure == "stop"
        if scale_down:
            try:
                await self._scale(sid, 0)
            except BackendError as exc:
                logger.warning("service {}: scaling back to 0 failed: {}", spec.name, exc.message)
                scale_down = False
        last = logs.splitlines()[-5:]
        raise ServiceStartFailed(
            f"Swarm service {name!r} of service {spec.name!r} could not start a task: {err}"
            + (f"; last log lines: {' | '.join(last)}" if last else "")
            + (
                "; Hestia scaled it back to 0 (on_start_failure: stop)"
                if scale_down
                else "; it stays scaled up and Swarm keeps retrying it"
            ),
            service=spec.name,
            detail={"task_error": err, "scaled_to_zero": scale_down, "logs": logs},
        )

    async def stop(self, ref: str, spec: ServiceConfig, timeout: float) -> StopResult:
        service, _ = await self._inspect_raw(ref)
        if refusal(service):
            return StopResult()
        sid = str(service["ID"])
        name = str((service.get("Spec") or {}).get("Name", ref))
        container = ((service.get("Spec") or {}).get("TaskTemplate") or {}).get("ContainerSpec")
        grace_ns = (container or {}).get("StopGracePeriod")
        grace = grace_ns / 1e9 if grace_ns else DEFAULT_GRACE_S
        t0 = time.monotonic()
        await self._scale(sid, 0)
        deadline = t0 + max(timeout, grace) + STOP_MARGIN_S
        while True:
            tasks = await self.engine.call(
                f"listing the tasks of Swarm service {name!r}", self._tasks(sid), missing=_MISSING
            )
            if all(_state(t) in _ENDED for t in tasks):
                break
            if time.monotonic() >= deadline:
                logger.warning(
                    "service {}: Swarm service {} is scaled to 0 but its tasks have not all "
                    "ended after {:g}s; not waiting longer",
                    spec.name,
                    name,
                    time.monotonic() - t0,
                )
                break
            await asyncio.sleep(POLL_S)
        took = time.monotonic() - t0
        killed = took >= timeout and any(
            ((t.get("Status") or {}).get("ContainerStatus") or {}).get("ExitCode") == 137
            for t in tasks
            if t.get("DesiredState") != "running"
        )
        return StopResult(killed=killed)

    async def logs_tail(self, ref: str, lines: int = 20) -> str:
        def read(client: Any) -> bytes:
            chunks = client.service_logs(ref, stdout=True, stderr=True, tail=lines)
            return b"".join(c if isinstance(c, bytes) else str(c).encode() for c in chunks)

        with contextlib.suppress(BackendError):
            raw = await self.engine.call(
                f"reading the logs of Swarm service {ref!r}", read, missing=_MISSING
            )
            return raw.decode("utf-8", "replace").strip()
        return ""

    async def discover(self) -> list[InstanceInfo]:
        found = await self.engine.call("listing labelled Swarm services", self._discover)
        out = []
        for service, tasks in found:
            labels = (service.get("Spec") or {}).get("Labels") or {}
            port = labels.get("hestia.port")
            number = int(port) if port and port.isdigit() else None
            out.append(self._info(service, tasks, number, False))
        return out

    def events(self) -> Any:
        return self._pump.events()

    async def close(self) -> None:
        self._pump.close()
        self.engine.close()
