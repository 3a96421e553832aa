"""Which services exist, and which instance is each one's: from hestia_config.yml and from
instances that opted in with labels, across every backend the gateway runs.

The registry keeps a model of the instances each backend reported (discovered at start-up,
followed through events, re-listed by a periodic reconcile in case an event was missed) and
derives the services from it in one place, `_desired()`:

- a `services:` entry naming an instance claims it (also when the instance carries labels:
  they fill in what the entry does not set; a label naming another service is refused);
- an instance labelled `hestia.enable=true` (for this gateway's scope) claims the service its
  labels name, unless the config file says that service is another instance;
- one instance, one service; one service, one instance: when several claim a name, instances
  of one lineage (a compose service's container re-created by `docker compose up -d`)
  replace each other and the newest wins; unrelated claimants are refused, logged once and
  shown in the service's status.

`_apply()` then creates, reconfigures, binds, unbinds and removes services to match. Only
instances that opted in or that the config file names are ever touched.

Backends go by their key (`config.backend_key`: `docker`, `docker@gpu`, `swarm`): a service's
`backend_key` says which one runs it. A backend that cannot be reached (its events stream
broke, or listing its instances failed, also at start-up) makes its services unreachable
(503 backend_unreachable for what needs the backend) until it answers again; the others go on.

The routing table (host names, `strip_prefix: false`) follows the services: recomputed after
every `_apply()` and removal and handed to the router (`on_routes`). One host name, one
service: a host in the config file's `services.<name>.hosts` wins over a `hestia.host` label,
which wins over a `routing.subdomains` name; between equals, the service that has it now,
else the name that sorts first. Every loser is logged once and listed under its `conflicts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from loguru import logger

from hestia.backends.base import Backend, BackendEvent, InstanceInfo, InstanceNotFound
from hestia.config import (
    HestiaConfig,
    ServiceConfig,
    label_enabled,
    service_name_from_labels,
    valid_service_name,
)
from hestia.errors import ConfigError, HestiaError, ServiceNotFound
from hestia.groups import Groups
from hestia.lifecycle import DRAIN_TIMEOUT_S, Service, State, StateListener
from hestia.schedule import zone
from hestia.warmth import Clock

# compose renames the container it replaces to "<12 hex of its id>_<name>"
_RECREATE_NAME = re.compile(r"^[0-9a-f]{12}_")
# after that rename, starts wait at most this long for the new container
RECREATE_RENAME_HOLD_S = 30.0
# backends with a config section that enables them
_SECTIONS = ("docker", "swarm")


@dataclass
class _Desired:
    backend: str | None
    info: InstanceInfo | None = None
    conflicts: dict[str, str] = field(default_factory=dict)


class Registry:
    def __init__(
        self,
        config: HestiaConfig,
        backends: Mapping[str, Backend],
        on_transition: StateListener | None = None,
        on_new_service: Callable[[Service], None] | None = None,
        clock: Clock | None = None,
        on_routes: Callable[[dict[str, str], frozenset[str]], None] | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or (lambda: datetime.now(UTC))
        self._tz = zone(config.schedule.timezone)
        self._on_routes = on_routes
        self.hosts: dict[str, str] = {}  # host name -> service
        self._keep_prefix: frozenset[str] = frozenset()
        self._host_conflicts: dict[str, set[str]] = {}  # service -> its keys in conflicts
        self.backends = dict(backends)
        self._on_transition = on_transition
        self._on_new_service = on_new_service
        self.services: dict[str, Service] = {}
        self.groups = Groups(self.services)
        self._known: dict[str, dict[str, InstanceInfo]] = {name: {} for name in self.backends}
        self._removals: dict[str, asyncio.TimerHandle] = {}
        self._warned: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._grace = config.docker.recreate_grace
        # why a backend is unreachable now: its events stream broke / its last listing failed
        self._stream_down: dict[str, str] = {}
        self._list_down: dict[str, str] = {}
        self._static = self.check(config)

    def check(self, config: HestiaConfig) -> dict[str, ServiceConfig]:
        """The config file's services, or ConfigError when one needs a backend that is not
        running."""
        static = config.static_services()
        for name, spec in static.items():
            key = spec.backend_key
            if key is not None and key not in self.backends:
                raise ConfigError(
                    f"invalid config in {config.source or 'config'}: services.{name}."
                    f"backend: the {key!r} backend is not enabled"
                    + (f" ({spec.backend}.enabled is false)" if spec.backend in _SECTIONS else ""),
                    service=name,
                )
        return static

    def reconfigure(self, config: HestiaConfig) -> dict[str, list[str]]:
        """Take a new version of the config file (live reload) and apply it as a diff: new
        services become routable, changed ones take their settings from the next request
        on, removed ones stop being routed at once (their held requests are answered
        `service_removed`; their instance is left as it is, or stopped once its requests in
        flight are done with `reload.on_remove: stop`). Unchanged services see nothing.
        ConfigError (before anything changed) when the new version cannot run here."""
        static = self.check(config)
        before = {name: svc.config for name, svc in self.services.items()}
        gone = set(self.config.services) - set(config.services)
        self.config = config
        self._static = static
        self._tz = zone(config.schedule.timezone)
        # removed from the file and claimed by no labelled instance either: gone now (not
        # unbound and held for a replacement, as when an instance disappears)
        desired = self._desired()
        removed = sorted(n for n in gone if n not in desired and n in self.services)
        for name in removed:
            self._remove_from_config(name, stop=config.reload.on_remove == "stop")
        self._apply(set())
        return {
            "added": sorted(n for n in self.services if n not in before),
            "changed": sorted(
                n for n, svc in self.services.items() if n in before and svc.config != before[n]
            ),
            "removed": removed,
        }

    def _remove_from_config(self, name: str, *, stop: bool) -> None:
        svc = self.services.pop(name)
        if name in self._removals:
            self._removals.pop(name).cancel()
        ref = svc.instance_id or svc.config.instance
        running = svc.state in (State.STARTING, State.READY)
        svc.remove("it was removed from the config file")
        logger.info(
            "service {} removed from the config file: no longer routed; its instance is {}",
            name,
            "stopped once its requests in flight are done" if stop else "left as it is",
        )
        self._publish_routes()
        if stop and running and ref is not None and svc.backend is not None:
            self._tasks.append(
                asyncio.create_task(self._stop_removed(svc, ref), name=f"hestia-remove-{name}")
            )

    async def _stop_removed(self, svc: Service, ref: str) -> None:
        deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_S
        # polled, so release() on the hot path stays two counters
        while svc.in_flight and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if svc.backend is None:
            return
        try:
            await svc.backend.stop(ref, svc.config, svc.config.stop_timeout)
        except InstanceNotFound:
            pass
        except HestiaError as exc:
            logger.error("stopping removed service {} failed: {}", svc.name, exc.message)
        else:
            logger.info("service {} (removed from the config file) stopped", svc.name)

    def get(self, name: str) -> Service:
        try:
            return self.services[name]
        except KeyError:
            raise ServiceNotFound(
                f"no service named {name!r}; known services: "
                f"{', '.join(sorted(self.services)) or '(none)'}. Label its container "
                "hestia.enable=true or add it under `services:` in hestia_config.yml",
                service=name,
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self.services

    # ---------------------------------------------------------------- start-up
    async def start(self) -> None:
        self._apply(set())
        for name, backend in self.backends.items():
            events = backend.events()  # subscribe first, then list: nothing falls in between
            try:
                await self.reconcile(name)
            except HestiaError as exc:
                # one engine down must not keep the gateway (and the other engines) down: its
                # events stream retries, and `reconnected` (or the periodic reconcile) lists
                # its instances when it answers
                logger.error(
                    "backend {} cannot be reached at start-up: {}; its services answer 503 "
                    "backend_unreachable until it is back (retrying in the background)",
                    name,
                    exc.message,
                )
            self._tasks.append(
                asyncio.create_task(self._watch(name, backend, events), name=f"hestia-{name}")
            )
        if self.backends:
            self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="hestia-reconcile"))

    async def reconcile(self, backend_name: str | None = None) -> None:
        """Re-list what the backend(s) have now and bring the services in line."""
        fresh: set[str] = set()
        for name in [backend_name] if backend_name else list(self.backends):
            try:
                known = await self._list(name)
            except HestiaError as exc:
                self._list_down[name] = exc.message
                self._apply(fresh)  # its services are unreachable now
                raise
            self._list_down.pop(name, None)
            self._known[name] = known
            fresh |= set(known)
        self._apply(fresh)

    async def _list(self, name: str) -> dict[str, InstanceInfo]:
        backend = self.backends[name]
        known: dict[str, InstanceInfo] = {}
        for info in await backend.discover():
            known[info.id] = info
        for svc_name in self.config.services:
            spec = self._spec_for_inspect(svc_name)
            if spec is None or spec.backend_key != name or spec.instance is None:
                continue
            svc = self.services.get(svc_name)
            refs = {spec.instance} | ({svc.instance_id} if svc and svc.instance_id else set())
            for ref in refs:
                with contextlib.suppress(InstanceNotFound):
                    info = await backend.inspect(ref, spec)
                    known[info.id] = info
        return known

    def unreachable(self, backend_name: str | None) -> str | None:
        """Why the backend cannot be reached now, or None."""
        if backend_name is None:
            return None
        return self._stream_down.get(backend_name) or self._list_down.get(backend_name)

    def _spec_for_inspect(self, name: str) -> ServiceConfig | None:
        svc = self.services.get(name)
        if svc is not None:
            return svc.config
        try:
            return self.config.resolve(name)
        except ConfigError:
            return None

    # ---------------------------------------------------------------- the model
    def _desired(self) -> dict[str, _Desired]:
        config = self.config
        out: dict[str, _Desired] = {}
        claims: dict[str, list[InstanceInfo]] = {}
        by_name: dict[tuple[str, str], str] = {}  # (backend, instance name) -> service
        for name in config.services:
            spec = config.resolve(name)
            key = spec.backend_key
            out[name] = _Desired(key)
            if key is not None and spec.instance is not None:
                by_name[(key, spec.instance)] = name
        for bname, known in self._known.items():
            for info in known.values():
                if info.is_self:
                    continue
                named = by_name.get((bname, info.name))
                enabled = label_enabled(info.labels, config.docker.scope)
                if named is not None:
                    if enabled:
                        labelled = service_name_from_labels(info.labels, info.name)
                        if labelled != named and "hestia.service" in info.labels:
                            self._conflict(
                                out[named],
                                info,
                                f"labelled hestia.service={labelled} but services.{named} in "
                                f"the config names it; one instance, one service: it stays "
                                f"{named!r}",
                            )
                    claims.setdefault(named, []).append(info)
                    continue
                if not enabled:
                    continue
                name = service_name_from_labels(info.labels, info.name)
                if not valid_service_name(name):
                    self._warn_once(
                        f"bad-name:{info.id}",
                        f"instance {info.name} opted in with an invalid service name {name!r}: "
                        "use letters, digits, '_', '.', '-'; set the hestia.service label",
                    )
                    continue
                static = out.get(name)
                if static is not None and name in config.services:
                    spec = config.resolve(name)
                    if spec.instance is not None and spec.instance != info.name:
                        self._conflict(
                            static,
                            info,
                            f"claims service {name!r} by its labels, but services.{name} in "
                            f"the config names instance {spec.instance!r}",
                        )
                        continue
                    if static.backend not in (None, bname):
                        self._conflict(static, info, f"is on backend {bname}, not {static.backend}")
                        continue
                claims.setdefault(name, []).append(info)
                if static is None:
                    out[name] = _Desired(bname)
                else:
                    static.backend = bname
        for name, candidates in claims.items():
            self._choose(name, out[name], candidates)
        # a config-named instance that was renamed stays the service's until an instance of
        # the configured name appears (Hestia may have started it: it must not run forever)
        for name, want in out.items():
            svc = self.services.get(name)
            if want.info is not None or svc is None or svc.instance_id is None:
                continue
            if name in config.services and want.backend is not None:
                kept = self._known.get(want.backend, {}).get(svc.instance_id)
                if kept is not None and not kept.is_self:
                    want.info = kept
        return out

    def _choose(self, name: str, want: _Desired, candidates: list[InstanceInfo]) -> None:
        svc = self.services.get(name)
        current = svc.instance_id if svc is not None else None
        # the lineage that holds the service now keeps it; else the oldest claimant's
        keep = next((c for c in candidates if c.id == current), None)
        if keep is None:
            keep = min(candidates, key=lambda c: (c.created, c.id))
        family = [
            c for c in candidates if c is keep or (keep.lineage and c.lineage == keep.lineage)
        ]
        for c in candidates:
            if c not in family:
                self._conflict(
                    want,
                    c,
                    f"also claims service {name!r}, which instance {keep.name} has; "
                    "one service, one instance: give it another hestia.service name",
                )
        # a running one wins (a create-first recreate keeps the old one serving until it
        # stops), then the newest; and never back to an older one while the newer exists
        best = max(family, key=lambda c: (c.running, c.created, c.id))
        held = next((c for c in family if c.id == current), None)
        if held is not None and (best.created, best.id) < (held.created, held.id):
            best = held
        want.info = best
        if best.refused:  # bound, so its status says why; the backend never starts it
            self._conflict(want, best, best.refused)

    def _compose_depends_on(self, backend: str | None, info: InstanceInfo) -> list[str]:
        """Compose's own `depends_on` (the label Compose v2 writes:
        `db:service_started:false,cache:service_healthy:true`), as Hestia service names of
        the same project's labelled containers."""
        raw = info.labels.get("com.docker.compose.depends_on", "")
        project = info.labels.get("com.docker.compose.project")
        if not raw or not project or backend is None:
            return []
        wanted = {part.split(":", 1)[0].strip() for part in raw.split(",") if part.strip()}
        names = []
        for other in self._known.get(backend, {}).values():
            labels = other.labels
            if (
                labels.get("com.docker.compose.project") == project
                and labels.get("com.docker.compose.service") in wanted
                and label_enabled(labels, self.config.docker.scope)
            ):
                names.append(service_name_from_labels(labels, other.name))
        return sorted(set(names))

    def _conflict(self, want: _Desired, info: InstanceInfo, why: str) -> None:
        want.conflicts[info.name] = why
        self._warn_once(f"conflict:{info.id}:{why}", f"instance {info.name} {why}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.error("{}", message)

    def _apply(self, fresh: set[str]) -> None:
        """Create, reconfigure, bind, unbind and remove services to match `_desired()`.
        `fresh`: ids of instances inspected just now (only their state is adopted)."""
        desired = self._desired()
        for name, want in desired.items():
            info = want.info
            backend = self.backends.get(want.backend) if want.backend else None
            try:
                spec = self.config.resolve(
                    name,
                    info.labels if info is not None else None,
                    instance=info.name if info is not None else None,
                    backend=want.backend if info is not None else None,
                )
            except ConfigError as exc:
                self._warn_once(f"labels:{info.id if info else name}:{exc.message}", exc.message)
                continue
            if info is not None and not spec.depends_on:
                compose_deps = self._compose_depends_on(want.backend, info)
                if compose_deps:
                    spec = spec.model_copy(update={"depends_on": compose_deps})
            svc = self.services.get(name)
            if name in self._removals:
                self._removals.pop(name).cancel()
            if svc is None:
                svc = Service(
                    spec,
                    backend,
                    self._on_transition,
                    recreate_grace=self._grace,
                    coordinator=self.groups,
                    tz=self._tz,
                    clock=self.clock,
                )
                self.services[name] = svc
                if self._on_new_service is not None:
                    self._on_new_service(svc)
                logger.info(
                    "service {} found ({}{})",
                    name,
                    spec.source,
                    f", instance {info.name} on {want.backend}" if info else "",
                )
            else:
                svc.reconfigure(spec, backend)
            svc.conflicts = want.conflicts
            svc.set_reachable(self.unreachable(want.backend if backend is not None else None))
            if info is None:
                if svc.instance_id is not None:
                    svc.unbind("its instance is gone")
                continue
            if info.id != svc.instance_id or info.id in fresh:
                svc.bind(info)
        for name, svc in self.services.items():
            if name not in desired and name not in self._removals:
                svc.unbind("its instance is gone or no longer opted in")
                # held, not refused, for a moment: a replacement may be on its way
                self._removals[name] = asyncio.get_running_loop().call_later(
                    self._grace, self._remove, name
                )
        self._publish_routes()

    def _remove(self, name: str) -> None:
        self._removals.pop(name, None)
        svc = self.services.pop(name, None)
        if svc is None:
            return
        svc.remove("its instance is gone or no longer opted in, and none replaced it")
        logger.info("service {} removed: its instance is gone or no longer opted in", name)
        self._publish_routes()

    # ---------------------------------------------------------------- routing table
    def _publish_routes(self) -> None:
        """Recompute host name -> service and hand it to the router when it changed."""
        # (kind, not the holder now, name): config file < label < subdomain name
        claims: dict[str, list[tuple[int, bool, str]]] = {}
        for name in sorted(self.services):
            svc = self.services[name]
            entry = self.config.services.get(name)
            in_config = set(entry.hosts or ()) if entry is not None else set()
            explicit = svc.config.hosts
            for host in (*explicit, *self.config.routing.subdomain_hosts(name)):
                kind = (0 if host in in_config else 1) if host in explicit else 2
                claims.setdefault(host, []).append((kind, self.hosts.get(host) != name, name))
        hosts: dict[str, str] = {}
        lost: dict[str, dict[str, str]] = {}
        for host, contenders in claims.items():
            contenders.sort()
            winner = contenders[0][2]
            hosts[host] = winner
            for *_, loser in contenders[1:]:
                if loser == winner:
                    continue
                why = (
                    f"claims host name {host!r}, which service {winner!r} has; a host name "
                    "routes to one service: change its hestia.host label or hosts"
                )
                lost.setdefault(loser, {})[f"host {host}"] = why
                self._warn_once(f"host:{host}:{loser}:{winner}", f"service {loser!r} {why}")
        for name, svc in self.services.items():
            old = self._host_conflicts.pop(name, set())
            mine = lost.get(name, {})
            if old or mine:
                conflicts = {k: v for k, v in svc.conflicts.items() if k not in old}
                conflicts.update(mine)
                svc.conflicts = conflicts
            if mine:
                self._host_conflicts[name] = set(mine)
        keep = frozenset(n for n, s in self.services.items() if not s.config.strip_prefix)
        if hosts != self.hosts or keep != self._keep_prefix:
            self.hosts = hosts
            self._keep_prefix = keep
            if self._on_routes is not None:
                self._on_routes(dict(hosts), keep)

    # ---------------------------------------------------------------- events
    async def _watch(
        self, name: str, backend: Backend, events: AsyncIterator[BackendEvent]
    ) -> None:
        while True:
            try:
                async for event in events:
                    try:
                        await self.handle_event(name, event)
                    except Exception:
                        logger.exception("handling {} event {} failed", name, event)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("{} event stream failed; retrying in 1s", name)
                await asyncio.sleep(1.0)
                events = backend.events()
                await self.reconcile(name)

    def _bound(self, backend_name: str, instance_id: str) -> Service | None:
        for svc in self.services.values():
            if svc.instance_id == instance_id and (
                svc.backend is not None and svc.backend is self.backends.get(backend_name)
            ):
                return svc
        return None

    def _interesting(self, backend_name: str, event: BackendEvent) -> bool:
        if event.id in self._known.get(backend_name, {}) or "hestia.enable" in event.labels:
            return True
        names = {event.name, event.old_name}
        return any(
            spec.instance in names and spec.backend_key == backend_name
            for spec in self._static.values()
        )

    async def handle_event(self, backend_name: str, event: BackendEvent) -> None:
        backend = self.backends[backend_name]
        if event.kind in ("disconnected", "reconnected"):
            if event.kind == "disconnected":
                self._stream_down[backend_name] = event.reason or "its events stream broke"
            else:
                self._stream_down.pop(backend_name, None)
            for each in self.services.values():
                if each.backend is backend:
                    each.set_reachable(self.unreachable(backend_name))
            if event.kind == "reconnected":
                try:
                    await self.reconcile(backend_name)
                except HestiaError as exc:
                    logger.warning("reconcile with {} failed: {}", backend_name, exc.message)
            return
        svc = self._bound(backend_name, event.id)
        if event.kind == "health":
            if svc is not None:
                svc.on_event(event)
            return
        if not self._interesting(backend_name, event):
            return
        known = self._known.setdefault(backend_name, {})
        fresh: set[str] = set()
        # what the service was doing when the news came (the inspect below takes a moment)
        was_up = svc is not None and svc.state in (State.STARTING, State.READY)
        if event.kind == "destroy":
            known.pop(event.id, None)
        else:
            spec = svc.config if svc is not None else self._any_spec()
            try:
                info = await backend.inspect(event.id, spec)
            except InstanceNotFound:
                known.pop(event.id, None)
            else:
                known[info.id] = info
                fresh.add(info.id)
        if svc is not None and event.kind in ("die", "stop", "start"):
            # the bound instance's own news: the lifecycle acts on it when the instance's
            # state now agrees (an event replayed after a reconnect or a restart of Hestia
            # must not undo what happened since); its state is not adopted again from it
            fresh.discard(event.id)
            now = known.get(event.id)
            running_now = now is not None and now.running
            # a death that came while the service was stopping or stopped is that stop's:
            # a start that began during the inspect must not take it for its instance's
            stale = event.kind != "start" and not was_up
            if running_now == (event.kind == "start") and not stale:
                svc.on_event(event)
        if svc is not None and event.kind == "rename" and _RECREATE_NAME.match(event.name):
            # compose is re-creating it: the new container follows (released when it binds)
            svc.hold_starts(max(self._grace, RECREATE_RENAME_HOLD_S))
        self._apply(fresh)

    def _any_spec(self) -> ServiceConfig:
        return ServiceConfig(name="_")

    async def _reconcile_loop(self) -> None:
        interval = self.config.docker.reconcile_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            for name in list(self.backends):
                try:
                    await self.reconcile(name)
                except HestiaError as exc:
                    logger.warning("reconcile with {} failed: {}", name, exc.message)

    # ---------------------------------------------------------------- shutdown
    def begin_shutdown(self) -> None:
        for svc in self.services.values():
            svc.shutdown()

    async def close(self) -> None:
        self.begin_shutdown()
        for handle in self._removals.values():
            handle.cancel()
        self._removals.clear()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
