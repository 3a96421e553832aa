"""Which services exist: from hestia_config.yml and from opted-in (labelled) containers.

Labelled containers are found at start-up, followed through the backend's events (create,
destroy, rename, start, die, health) and re-checked by a periodic reconcile in case an event
was missed. Only containers that opted in (hestia.enable=true) or that the config file names
are ever touched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from loguru import logger

from hestia.backends.base import Backend, BackendEvent, InstanceInfo, InstanceNotFound
from hestia.config import (
    HestiaConfig,
    label_enabled,
    service_name_from_labels,
    valid_service_name,
)
from hestia.errors import ConfigError, HestiaError, ServiceNotFound
from hestia.lifecycle import Service, StateListener


class Registry:
    def __init__(
        self,
        config: HestiaConfig,
        backend: Backend | None,
        on_transition: StateListener | None = None,
        on_new_service: Callable[[Service], None] | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self._on_transition = on_transition
        self._on_new_service = on_new_service
        self.services: dict[str, Service] = {}
        self._by_instance: dict[str, Service] = {}  # instance id -> service
        self._tasks: list[asyncio.Task[None]] = []
        self._scope = config.docker.scope

    def _new_service(self, svc_config: Any) -> Service:
        networks = self.backend.self_networks if self.backend is not None else set
        svc = Service(svc_config, self.backend, networks, self._on_transition)
        if self._on_new_service is not None:
            self._on_new_service(svc)
        return svc

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

    # ---------------------------------------------------------------- start-up
    async def start(self) -> None:
        for name, svc_config in self.config.static_services().items():
            if svc_config.managed and self.backend is None:
                logger.warning(
                    "service {} names container {!r} but the Docker backend is disabled; "
                    "it will fail to start",
                    name,
                    svc_config.container,
                )
            self.services[name] = self._new_service(svc_config)
        if self.backend is None:
            return
        await self.reconcile()
        self._tasks.append(asyncio.create_task(self._watch_events(), name="hestia-events"))
        self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="hestia-reconcile"))

    async def reconcile(self) -> None:
        """Bring the registry in line with what the backend has now."""
        assert self.backend is not None
        seen: set[str] = set()
        for info in await self.backend.list_opted_in():
            if self.backend.is_self(info) or not label_enabled(info.labels, self._scope):
                continue
            svc = self._register_labelled(info)
            if svc is not None:
                seen.add(svc.name)
                svc.adopt(info)
        for name, svc in list(self.services.items()):
            if name in seen or svc.backend is None or svc.config.container is None:
                continue
            if name in self.config.services:
                await self._adopt_static(svc)
            else:
                self._remove(svc, "its container is gone or no longer opted in")

    async def _adopt_static(self, svc: Service) -> None:
        assert self.backend is not None and svc.config.container is not None
        try:
            info = await self.backend.inspect(svc.config.container)
        except InstanceNotFound:
            return
        except HestiaError as exc:
            logger.warning("cannot inspect container of service {}: {}", svc.name, exc.message)
            return
        if self.backend.is_self(info):
            logger.error("service {} names Hestia's own container; ignoring it", svc.name)
            return
        self._by_instance[info.id] = svc
        svc.adopt(info)

    def _register_labelled(self, info: InstanceInfo) -> Service | None:
        name = service_name_from_labels(info.labels, info.name)
        if not valid_service_name(name):
            logger.error(
                "container {} opted in with an invalid service name {!r}: use letters, digits, "
                "'_', '.', '-'; set the hestia.service label",
                info.name,
                name,
            )
            return None
        existing = self.services.get(name)
        if existing is not None and existing.instance_id not in (None, info.id):
            if existing.config.container not in (info.name, info.id):
                logger.warning(
                    "containers {} and {} both claim service {!r}; keeping {}",
                    existing.config.container,
                    info.name,
                    name,
                    existing.config.container,
                )
                return None
        try:
            svc_config = self.config.resolve(name, info.labels, container=info.name)
        except ConfigError as exc:
            logger.error("container {} has invalid hestia labels: {}", info.name, exc.message)
            return None
        if existing is not None and existing.config == svc_config:
            svc = existing
        elif existing is not None:
            existing.config = svc_config  # labels changed (container re-created): new settings
            svc = existing
        else:
            svc = self._new_service(svc_config)
            self.services[name] = svc
            logger.info(
                "service {} found on container {} (upstream port {})",
                name,
                info.name,
                svc_config.port or "auto",
            )
        self._by_instance[info.id] = svc
        return svc

    def _remove(self, svc: Service, why: str) -> None:
        if self.services.get(svc.name) is svc:
            del self.services[svc.name]
        for key in [k for k, v in self._by_instance.items() if v is svc]:
            del self._by_instance[key]
        svc.shutdown(f"service {svc.name!r} was removed: {why}")
        logger.info("service {} removed: {}", svc.name, why)

    # ---------------------------------------------------------------- events
    async def _watch_events(self) -> None:
        assert self.backend is not None
        while True:
            try:
                async for event in self.backend.events():
                    try:
                        await self.handle_event(event)
                    except Exception:
                        logger.exception("handling Docker event {} failed", event)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Docker event stream failed; retrying in 1s")
                await asyncio.sleep(1.0)

    async def handle_event(self, event: BackendEvent) -> None:
        assert self.backend is not None
        svc = self._by_instance.get(event.id)
        if event.kind in ("create", "rename"):
            if event.kind == "rename" and svc is not None:
                if svc.name in self.config.services:
                    # the config names the container: the renamed one is no longer it
                    del self._by_instance[event.id]
                    svc.instance_id = None
                    await self._adopt_static(svc)
                    return
                self._remove(svc, f"container renamed from {event.old_name} to {event.name}")
            try:
                info = await self.backend.inspect(event.id)
            except InstanceNotFound:
                return
            if self.backend.is_self(info):
                return
            if label_enabled(info.labels, self._scope):
                new = self._register_labelled(info)
                if new is not None:
                    new.adopt(info)
            else:
                for static in self.services.values():
                    if static.config.container == info.name and static.name in self.config.services:
                        self._by_instance[info.id] = static
                        static.adopt(info)
            return
        if svc is None:
            if event.kind == "start":
                # a static service's container may have been (re)created since we looked
                for static in self.services.values():
                    if static.config.container == event.name:
                        await self._adopt_static(static)
            return
        if event.kind == "destroy":
            del self._by_instance[event.id]
            svc.instance_id = None
            svc.on_event(BackendEvent("die", event.id, event.name))
            if svc.name not in self.config.services:
                self._remove(svc, f"container {event.name} was removed")
            return
        svc.on_event(event)

    async def _reconcile_loop(self) -> None:
        interval = self.config.docker.reconcile_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reconcile()
            except HestiaError as exc:
                logger.warning("reconcile with Docker failed: {}", exc.message)

    # ---------------------------------------------------------------- shutdown
    def begin_shutdown(self) -> None:
        for svc in self.services.values():
            svc.shutdown()

    async def close(self) -> None:
        self.begin_shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
