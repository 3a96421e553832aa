"""Wiring only: the ASGI entry point that sends what the router says is a service's to the
proxy and the rest to the control API, and the Gateway object that owns config, backends,
registry, store, metrics and the upstream pool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping

from loguru import logger

from hestia.api import build_api
from hestia.auth import Authenticator
from hestia.backends.base import Backend
from hestia.config import HestiaConfig
from hestia.headers import TrustedProxies
from hestia.lifecycle import Service, State
from hestia.metrics import Metrics
from hestia.proxy import Proxy
from hestia.registry import Registry
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


class Gateway:
    """The whole gateway as one ASGI app, over a set of named backends (a single backend is
    taken as {backend.name: backend}; None or {} means plain urls only)."""

    def __init__(
        self,
        config: HestiaConfig,
        backends: Backend | Mapping[str, Backend] | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
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
        # live reload: self.auth.reconfigure(new_config.auth)
        self.auth = Authenticator(config.auth, trusted)
        self.api = build_api(self.registry, self.metrics, self.store, self.auth)
        self._restored: dict[str, StoredService] = {}
        self._snapshot_task: asyncio.Task[None] | None = None
        self._warm_task: asyncio.Task[None] | None = None
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
        """Answer every held request 503 now; containers are left as they are."""
        self.registry.begin_shutdown()

    async def shutdown(self) -> None:
        for task in (self._snapshot_task, self._warm_task):
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
