"""Wiring only: the ASGI entry point that sends what the router says is a service's to the
proxy and the rest to the control API, and the Gateway object that owns config, backends,
registry, store, metrics and the upstream pool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loguru import logger

from hestia.api import build_api
from hestia.auth import Authenticator
from hestia.backends.base import Backend
from hestia.config import HestiaConfig
from hestia.errors import HestiaError
from hestia.feed import Feed
from hestia.headers import TrustedProxies
from hestia.lifecycle import Service, State
from hestia.metrics import Metrics
from hestia.proxy import Proxy
from hestia.registry import Registry
from hestia.reload import ConfigReloader
from hestia.router import Router
from hestia.store import EventRow, ServiceRow, Store, StoredService, error_json, wall
from hestia.types import Receive, Scope, Send
from hestia.upstream import UpstreamPool
from hestia.warmth import Clock

# How often every service's idle clock and counters are written to the store.
SNAPSHOT_EVERY_S = 5.0
# Services kept warm are checked at least this often (and at every schedule window's edge);
# one whose start failed is tried again after WARM_RETRY_S.
WARM_CHECK_S = 30.0
WARM_RETRY_S = 60.0
# Sections a running gateway cannot change: a new value takes effect at the next start.
RESTART_ONLY = ("server", "database", "docker", "swarm", "semaphore", "process", "logging")


class Gateway:
    """The whole gateway as one ASGI app, over a set of named backends (a single backend is
    taken as {backend.name: backend}; None or {} means plain urls only)."""

    def __init__(
        self,
        config: HestiaConfig,
        backends: Backend | Mapping[str, Backend] | None = None,
        *,
        clock: Clock | None = None,
        config_path: str | Path | None = None,
        handle_sighup: bool = False,
    ) -> None:
        """`config_path`: the file `config` came from, watched and reloaded (None: no file,
        nothing to reload). `handle_sighup`: SIGHUP reloads it (the `hestia serve` process;
        not for gateways inside another program, such as the tests)."""
        self.config = config
        if backends is None:
            backends = {}
        elif not isinstance(backends, Mapping):
            backends = {backends.name: backends}
        self.backends: dict[str, Backend] = dict(backends)
        self.metrics = Metrics()
        self.store = Store(config.database_url())
        self.router = Router()
        self.registry = Registry(
            config,
            self.backends,
            self._on_transition,
            self._on_new_service,
            clock=clock,
            on_routes=self.router.configure,
        )
        self.metrics.bind_live(
            lambda: {
                n: (
                    s.in_flight + s.workers_in_flight,
                    s.waiting,
                    s.peak_waiting,
                    s.state.value,
                    s.refused,
                )
                for n, s in self.registry.services.items()
            }
        )
        self.pool = UpstreamPool()
        trusted = TrustedProxies(config.server.trusted_proxies)
        self.proxy = Proxy(
            self.registry.get,
            self.pool,
            self.metrics,
            config.logging.access,
            trusted,
        )
        self.auth = Authenticator(config.auth, trusted)
        self.feed = Feed(self._statuses)
        self.reloader = ConfigReloader(
            config_path,
            config,
            self.apply_config,
            lambda outcome: self.feed.publish({"type": "config", **outcome.to_dict()}),
        )
        self._handle_sighup = handle_sighup
        self.api = build_api(
            self.registry, self.metrics, self.store, self.auth, self.reloader, self.feed
        )
        self._restored: dict[str, StoredService] = {}
        self._snapshot_task: asyncio.Task[None] | None = None
        self._warm_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        route = self.router.resolve(scope)
        # one attribute check when auth is off; when on, admit answers 401/403/429 itself and
        # removes the gateway's credential from the headers before anyone else sees them
        if self.auth.enabled and not await self.auth.admit(scope, receive, send, route):
            return
        if route is not None:
            await self.proxy.handle(scope, receive, send, route)
            return
        await self.api(scope, receive, send)

    # ---------------------------------------------------------------- live config
    def apply_config(self, new: HestiaConfig) -> dict[str, list[str]]:
        """Apply a new, valid version of the config file as a diff (see Registry.reconfigure);
        sections that need a restart keep their running values and are listed. ConfigError,
        before anything changed, when it cannot be applied."""
        old = self.config
        restart = [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
        applied = new.model_copy(update={name: getattr(old, name) for name in restart})
        applied._source = new.source
        self.registry.check(applied)
        self.auth.reconfigure(applied.auth)
        changes = self.registry.reconfigure(applied)
        self.config = applied
        changes["restart_required"] = restart
        if self._started:
            self.warm_up()
            if self.registry.backends:  # instances the new entries name: find them now
                self._spawn(self._reconcile_quietly(), "hestia-reload-reconcile")
        return changes

    async def _reconcile_quietly(self) -> None:
        try:
            await self.registry.reconcile()
        except HestiaError as exc:
            logger.warning("reconcile after a config reload failed: {}", exc.message)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _statuses(self) -> list[dict[str, Any]]:
        return [self.registry.services[n].status() for n in sorted(self.registry.services)]

    def _on_sighup(self) -> None:
        logger.info("SIGHUP: reloading the config file")
        self._spawn(self.reloader.reload("SIGHUP"), "hestia-sighup-reload")

    # ---------------------------------------------------------------- hooks
    def _on_new_service(self, svc: Service) -> None:
        row = self._restored.get(svc.name)
        m = self.metrics.service(svc.name)
        if row is None:
            return
        svc.restore(row.state, row.last_activity, row.last_error)
        if not any(m.requests):  # carry the request counters across restarts
            m.requests = list(row.requests_by_class)
            m.errors = row.errors
            m.cold_starts = row.cold_starts

    def _on_transition(
        self, svc: Service, old: State, new: State, cause: str, reason: str, spent: float
    ) -> None:
        self.metrics.on_transition(svc.name, old.value, new.value, spent)
        if old is State.READY and cause == "external" and svc.last_upstream is not None:
            # the instance died or was replaced under open downloads: cut them now, or a
            # slow reader waits for ever on a socket whose other end is gone
            up = svc.last_upstream
            cut = self.pool.abort_origin(
                up.host, up.port, f"service {svc.name!r} stopped outside Hestia ({reason})"
            )
            if cut:
                logger.info("service {}: cut {} open upstream connection(s)", svc.name, cut)
        self.store.record_event(
            EventRow(
                service=svc.name,
                at=time.time(),
                from_state=old.value,
                to_state=new.value,
                cause=cause,
                reason=reason,
                duration_ms=round(spent * 1000, 3),
            )
        )
        self.store.snapshot_service(self._service_row(svc))
        self.feed.publish(
            {
                "type": "transition",
                "service": svc.name,
                "at": time.time(),
                "from_state": old.value,
                "to_state": new.value,
                "cause": cause,
                "reason": reason,
                "duration_ms": round(spent * 1000, 3),
                "status": svc.status(),
            }
        )

    def _service_row(self, svc: Service) -> ServiceRow:
        m = self.metrics.service(svc.name)
        return ServiceRow(
            name=svc.name,
            state=svc.state.value,
            last_activity=wall(svc.last_activity),
            started_at=svc.started_at,
            last_error=error_json(svc.last_error),
            requests_by_class=json.dumps(m.requests),
            errors=m.errors,
            cold_starts=m.cold_starts,
            updated_at=time.time(),
        )

    def snapshot_all(self) -> None:
        for svc in list(self.registry.services.values()):
            self.store.snapshot_service(self._service_row(svc))

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_EVERY_S)
            self.snapshot_all()

    # ---------------------------------------------------------------- lifespan
    async def startup(self) -> None:
        if self._started:
            return
        self._started = True
        await asyncio.to_thread(self.store.migrate)
        self._restored = await asyncio.to_thread(self.store.load_service_states)
        self.store.start()
        await self.registry.start()
        self._snapshot_task = asyncio.create_task(self._snapshot_loop(), name="hestia-snapshots")
        self.warm_up()
        self._warm_task = asyncio.create_task(self._warm_loop(), name="hestia-warmth")
        if self.config.reload.watch:
            self.reloader.start_watching()
        if self._handle_sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        logger.info(
            "Hestia ready with {} service(s): {}; state in {}",
            len(self.registry.services),
            ", ".join(sorted(self.registry.services)) or "(none yet)",
            self.store.display_url,
        )

    # ---------------------------------------------------------------- hot standby
    def warm_up(self) -> None:
        """Start every service that is to be kept warm now (keep_warm, a warm_schedule window)
        and is not running. A failed one is tried again after WARM_RETRY_S."""
        now = time.time()
        for svc in list(self.registry.services.values()):
            if svc.backend is None or not svc.warmth.wanted or not svc.warmth.keep_running():
                continue
            if svc.state is State.STOPPED or (
                svc.state is State.FAILED
                and now - (svc.last_error or {}).get("at", 0.0) > WARM_RETRY_S
            ):
                svc.ensure_started("warm")

    async def _warm_loop(self) -> None:
        while True:
            await asyncio.sleep(self._next_warm_check())
            self.warm_up()

    def _next_warm_check(self) -> float:
        """Seconds to the next schedule window edge of any service, between 1 and 30."""
        wait = WARM_CHECK_S
        now = self.registry.clock()
        for svc in self.registry.services.values():
            schedule = svc.warmth.schedule
            if schedule:
                wait = min(wait, (schedule.next_change(now) - now).total_seconds())
        return max(wait, 1.0)

    def begin_shutdown(self) -> None:
        """Answer every held request 503 now and end the live feeds; containers are left as
        they are."""
        self.feed.close()
        self.registry.begin_shutdown()

    async def shutdown(self) -> None:
        if self._handle_sighup:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        self.feed.close()
        await self.reloader.close()
        for task in (self._snapshot_task, self._warm_task, *self._background):
            if task is not None:
                task.cancel()
        await self.registry.close()
        self.snapshot_all()
        await self.store.close()  # flushes every queued event
        await self.pool.aclose()
        for backend in self.backends.values():
            with contextlib.suppress(Exception):
                await backend.close()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("Hestia failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
