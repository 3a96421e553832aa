"""Per-service state machine: stopped -> starting -> ready -> stopping -> stopped (or failed).

One start at a time: every request that finds the service not ready waits on the same start
task, bounded by its own `startup_timeout`. In-flight requests (including open streams and
WebSockets) count as activity: the idle timer only stops a service with nothing in flight and
nobody waiting, `idle_timeout` after the last request ended.

The hot path is `acquire()`/`release()` on a ready service: a state check and two counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from loguru import logger

from hestia.backends.base import (
    Backend,
    BackendEvent,
    InstanceInfo,
    InstanceNotFound,
    resolve_address,
)
from hestia.config import ServiceConfig
from hestia.errors import (
    HestiaError,
    ServiceBusy,
    ServiceStartFailed,
    ServiceStartTimeout,
    ShuttingDown,
)
from hestia.probes import http_probe, tcp_probe

# How often a start re-inspects the instance even without an event (a safety net for a
# missed event; readiness itself is noticed through events and the fast probe interval).
_INSPECT_EVERY_S = 1.0
_STOP_TIMEOUT_S = 10.0


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int
    base_path: bytes  # path prefix from the url, without a trailing slash ('' for none)
    host_header: bytes

    @property
    def display(self) -> str:
        return f"http://{self.host}:{self.port}{self.base_path.decode('latin-1')}"


def upstream_from_url(url: str) -> Upstream:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    netloc = host if port == 80 else f"{host}:{port}"
    if ":" in host and port != 80:
        netloc = f"[{host}]:{port}"
    return Upstream(host, port, parts.path.rstrip("/").encode(), netloc.encode())


def upstream_from_address(host: str, port: int) -> Upstream:
    return Upstream(host, port, b"", f"{host}:{port}".encode())


# (service, from_state, to_state, cause, reason, seconds spent in from_state)
StateListener = Callable[["Service", State, State, str, str, float], None]


class Service:
    """Runtime state of one service, managed (has a container) or plain (url only)."""

    def __init__(
        self,
        config: ServiceConfig,
        backend: Backend | None,
        self_networks: Callable[[], set[str]] = set,
        on_transition: StateListener | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.backend = backend if config.managed else None
        self._self_networks = self_networks
        self._on_transition = on_transition
        self.state = State.STOPPED
        self.upstream: Upstream | None = upstream_from_url(config.url) if config.url else None
        if self.backend is None:
            self.state = State.READY
        self.in_flight = 0
        self.waiting = 0
        self.queued = 0  # waiting for a max_concurrency slot
        limit = config.max_concurrency
        self._slots: asyncio.Semaphore | None = asyncio.Semaphore(limit) if limit else None
        self.peak_waiting = 0
        self._state_since = time.monotonic()
        self._restored_state: str | None = None
        self._restored_activity = False
        self.last_activity = time.monotonic()
        self.last_activity_wall = time.time()
        self.started_at: float | None = None
        self.last_error: dict[str, Any] | None = None
        self.instance_id: str | None = None
        self._start_task: asyncio.Task[HestiaError | None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()  # an instance event arrived during a start
        self._died: BackendEvent | None = None
        self._closing: asyncio.Future[str] | None = None  # result: why held requests end

    # ---------------------------------------------------------------- hot path
    async def acquire(self) -> Upstream:
        """Reserve a slot for one request; wait for a start when needed. Pair with release()."""
        if self._slots is None:
            if self.state is State.READY and self.upstream is not None:
                self.in_flight += 1
                return self.upstream
            return await self._acquire_slow()
        await self._take_slot()
        try:
            if self.state is State.READY and self.upstream is not None:
                self.in_flight += 1
                return self.upstream
            return await self._acquire_slow()
        except BaseException:
            self._slots.release()
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self.last_activity = time.monotonic()
        if self._slots is not None:
            self._slots.release()

    async def _take_slot(self) -> None:
        """With max_concurrency: wait (FIFO, at most startup_timeout) for a free slot."""
        assert self._slots is not None
        if not self._slots.locked():
            await self._slots.acquire()
            return
        self.queued += 1
        try:
            async with asyncio.timeout(self.config.startup_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise ServiceBusy(
                f"service {self.name!r} had all {self.config.max_concurrency} of its "
                f"max_concurrency slots busy for {self.config.startup_timeout:g}s; retry later "
                "or raise max_concurrency",
                service=self.name,
            ) from None
        finally:
            self.queued -= 1

    # ---------------------------------------------------------------- waiting
    async def _acquire_slow(self) -> Upstream:
        loop = asyncio.get_running_loop()
        if self._closing is None:
            self._closing = loop.create_future()
        if self._closing.done():
            raise ShuttingDown(self._closing.result(), service=self.name)
        deadline = loop.time() + self.config.startup_timeout
        self.waiting += 1
        if self.waiting > self.peak_waiting:
            self.peak_waiting = self.waiting
        try:
            while not (self.state is State.READY and self.upstream is not None):
                if self.state is State.STOPPING and self._stop_task is not None:
                    task: asyncio.Future[Any] = self._stop_task
                else:
                    task = self.ensure_started("request")
                remaining = deadline - loop.time()
                done, _ = await asyncio.wait(
                    (task, self._closing), timeout=max(remaining, 0), return_when="FIRST_COMPLETED"
                )
                if self._closing in done:
                    raise ShuttingDown(self._closing.result(), service=self.name)
                if not done:
                    raise ServiceStartTimeout(
                        f"service {self.name!r} was not ready within its startup_timeout "
                        f"of {self.config.startup_timeout:g}s; check its logs or raise "
                        "startup_timeout",
                        service=self.name,
                        detail={"state": self.state.value},
                    )
                if task.cancelled():
                    continue  # a stop (API) cancelled the start: wait for it, then start again
                result = task.result()
                if isinstance(result, HestiaError):
                    raise result
        finally:
            self.waiting -= 1
        self.in_flight += 1
        return self.upstream

    def ensure_started(self, reason: str) -> asyncio.Task[HestiaError | None]:
        """The running start task, or a new one. Never two at once."""
        if self._start_task is None or self._start_task.done():
            self._start_task = asyncio.get_running_loop().create_task(
                self._run_start(reason), name=f"hestia-start-{self.name}"
            )
        return self._start_task

    # ---------------------------------------------------------------- start
    async def _run_start(self, reason: str) -> HestiaError | None:
        if self.backend is None:
            self._transition(State.READY, reason)
            return None
        if self._stop_task is not None and not self._stop_task.done():
            await asyncio.shield(self._stop_task)
        assert self.config.container is not None
        container = self.config.container
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.startup_timeout
        self._died = None
        self._changed.clear()
        self._cancel_idle()
        self._transition(State.STARTING, reason, f"start asked by {reason}")
        t0 = loop.time()
        try:
            info = await self.backend.inspect(container)
            self.instance_id = info.id
            if not info.running:
                await self.backend.start(container)
                info = await self.backend.inspect(container)
            async with asyncio.timeout_at(deadline):
                await self._wait_ready(info)
        except TimeoutError:
            err: HestiaError = ServiceStartTimeout(
                f"service {self.name!r} (container {container!r}) was not ready within "
                f"{self.config.startup_timeout:g}s; check its logs, or raise startup_timeout",
                service=self.name,
            )
            return self._fail(err, reason)
        except InstanceNotFound as exc:
            return self._fail(
                ServiceStartFailed(
                    f"container {container!r} of service {self.name!r} does not exist; "
                    "create it (e.g. docker compose up --no-start) or fix `container`",
                    service=self.name,
                    detail={"backend_error": exc.message},
                ),
                reason,
            )
        except HestiaError as exc:
            exc.service = exc.service or self.name
            return self._fail(exc, reason)
        self.started_at = time.time()
        if reason != "adopted":
            self._touch()
        took_ms = (loop.time() - t0) * 1000
        self._transition(State.READY, reason, f"ready after {took_ms:.0f} ms")
        self.last_error = None
        # an adopted service keeps the idle clock it had (restored across a restart)
        remaining = self.last_activity + self.config.idle_timeout - time.monotonic()
        self._schedule_idle(max(remaining, 0.0))
        return None

    def _fail(self, err: HestiaError, cause: str) -> HestiaError:
        self.last_error = {**err.to_dict()["error"], "at": time.time()}
        self._transition(State.FAILED, cause, err.message)
        return err

    async def _wait_ready(self, info: InstanceInfo) -> None:
        assert self.backend is not None and self.config.container is not None
        mode = self.config.health.type
        if mode == "auto":
            mode = "docker" if info.health != "none" else "http"
        loop = asyncio.get_running_loop()
        next_inspect = loop.time() + _INSPECT_EVERY_S
        interval = self.config.health.interval
        while True:
            await self._check_alive(info)
            if self.config.url is None:
                address = resolve_address(info, self.config.port, self._self_networks())
                if address is None:
                    raise ServiceStartFailed(
                        f"container {info.name!r} of service {self.name!r} has no address Hestia "
                        "can reach: put both on one network, publish its port, or set `url`",
                        service=self.name,
                    )
                self.upstream = upstream_from_address(*address)
            assert self.upstream is not None
            if mode == "docker":
                if info.health == "healthy":
                    return
                if info.health == "unhealthy":
                    raise ServiceStartFailed(
                        f"container {info.name!r} of service {self.name!r} failed its health "
                        f"check: {info.health_output or 'no output'}",
                        service=self.name,
                        detail={"health_output": info.health_output},
                    )
                wait = _INSPECT_EVERY_S
            elif mode == "tcp":
                if await tcp_probe(self.upstream.host, self.upstream.port):
                    return
                wait = interval
            else:
                status = await http_probe(
                    self.upstream.host,
                    self.upstream.port,
                    self._probe_path(),
                    self.upstream.host_header.decode("latin-1"),
                )
                expected = self.config.health.status
                if status is not None and (status == expected if expected else status < 500):
                    return
                wait = interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)
            self._changed.clear()
            if self._died is not None or mode == "docker" or loop.time() >= next_inspect:
                info = await self.backend.inspect(self.config.container)
                next_inspect = loop.time() + _INSPECT_EVERY_S

    def _probe_path(self) -> str:
        assert self.upstream is not None
        path = self.config.health.path
        if not path.startswith("/"):
            path = "/" + path
        return self.upstream.base_path.decode("latin-1") + path

    async def _check_alive(self, info: InstanceInfo) -> None:
        if info.running and self._died is None:
            return
        assert self.backend is not None
        code = self._died.exit_code if self._died is not None else info.exit_code
        logs = await self.backend.logs_tail(info.id, 20)
        last = logs.splitlines()[-5:]
        raise ServiceStartFailed(
            f"container {info.name!r} of service {self.name!r} exited with code {code} while "
            f"starting; last log lines: {' | '.join(last) or '(none)'}",
            service=self.name,
            detail={"exit_code": code, "logs": logs},
        )

    # ---------------------------------------------------------------- stop
    def request_stop(self, reason: str) -> asyncio.Task[None] | None:
        if self.backend is None or self.state is State.STOPPED:
            return None
        if self._stop_task is None or self._stop_task.done():
            # STOPPING at once, not when the task first runs: a request arriving in between
            # must wait for the stop and start again, never take the fast path to a dying
            # container.
            self._cancel_idle()
            self._transition(State.STOPPING, reason, f"stop asked by {reason}")
            self._stop_task = asyncio.get_running_loop().create_task(
                self._run_stop(reason), name=f"hestia-stop-{self.name}"
            )
        return self._stop_task

    async def _run_stop(self, reason: str) -> None:
        assert self.backend is not None and self.config.container is not None
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._start_task
        self._cancel_idle()
        self._transition(State.STOPPING, reason, f"stop asked by {reason}")
        try:
            await self.backend.stop(self.config.container, _STOP_TIMEOUT_S)
        except InstanceNotFound:
            pass
        except HestiaError as exc:
            logger.error("stopping service {} failed: {}", self.name, exc.message)
            self._fail(exc, reason)
            return
        self.started_at = None
        self._transition(State.STOPPED, reason, "container stopped")

    # ---------------------------------------------------------------- idle
    def _schedule_idle(self, delay: float) -> None:
        if self.backend is None or self.config.idle_timeout <= 0:
            return
        self._cancel_idle()
        self._idle_handle = asyncio.get_running_loop().call_later(delay, self._idle_check)

    def _cancel_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _idle_check(self) -> None:
        self._idle_handle = None
        if self.state is not State.READY:
            return
        if self.in_flight or self.waiting or self.queued:
            self._schedule_idle(self.config.idle_timeout)
            return
        remaining = self.last_activity + self.config.idle_timeout - time.monotonic()
        if remaining > 0.001:
            self._schedule_idle(remaining)
            return
        logger.info(
            "service {} idle for {:g}s with nothing in flight: stopping it",
            self.name,
            self.config.idle_timeout,
        )
        self.request_stop("idle")

    # ---------------------------------------------------------------- events
    def adopt(self, info: InstanceInfo) -> None:
        """Take over an instance found at start-up or by reconcile, without restarting it."""
        self.instance_id = info.id
        restored, self._restored_state = self._restored_state, None
        if info.running and self.state in (State.STOPPED, State.FAILED):
            if not self._restored_activity:
                self._touch()
            self._restored_activity = False
            self.ensure_started("adopted")
        elif not info.running and restored == State.STARTING.value:
            self._fail(
                ServiceStartFailed(
                    f"Hestia restarted while starting service {self.name!r} and its container "
                    f"{info.name!r} is not running (exit code {info.exit_code}); the next "
                    "request starts it again",
                    service=self.name,
                ),
                "recovery",
            )
        elif not info.running and self.state is State.READY:
            self._transition(State.STOPPED, "external", f"container {info.name!r} is not running")

    def restore(
        self, state: str, last_activity_wall: float, last_error: dict[str, Any] | None
    ) -> None:
        """What the previous run of Hestia knew: the idle clock keeps running across a restart."""
        idle_for = max(0.0, time.time() - last_activity_wall)
        self.last_activity = time.monotonic() - idle_for
        self.last_activity_wall = last_activity_wall
        self.last_error = last_error
        self._restored_state = state
        self._restored_activity = True

    def on_event(self, event: BackendEvent) -> None:
        if event.kind == "health":
            self._changed.set()
        elif event.kind in ("die", "stop"):
            if self.state is State.STARTING:
                if event.kind == "die":
                    self._died = event
                self._changed.set()
            elif self.state is State.READY:
                self._cancel_idle()
                self.started_at = None
                self._transition(
                    State.STOPPED,
                    "external",
                    f"container stopped outside Hestia (exit code {event.exit_code})",
                )
        elif event.kind == "start":
            self.instance_id = event.id
            if self.state in (State.STOPPED, State.FAILED) and (
                self._stop_task is None or self._stop_task.done()
            ):
                self._touch()
                self.ensure_started("external")

    # ---------------------------------------------------------------- misc
    def _touch(self) -> None:
        self.last_activity = time.monotonic()
        self.last_activity_wall = time.time()

    def _transition(self, new: State, cause: str, reason: str = "") -> None:
        old = self.state
        if old is new:
            return
        now = time.monotonic()
        spent, self._state_since = now - self._state_since, now
        self.state = new
        logger.bind(
            event="lifecycle",
            service=self.name,
            from_state=old.value,
            to_state=new.value,
            cause=cause,
            reason=reason,
        ).info("service {} {} -> {}: {}", self.name, old.value, new.value, reason or cause)
        if self._on_transition is not None:
            self._on_transition(self, old, new, cause, reason, spent)

    def shutdown(self, why: str = "") -> None:
        """Answer every held request with 503 and cancel timers; containers are left as they are."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
        if not self._closing.done():
            self._closing.set_result(
                why or f"Hestia is shutting down; the request for {self.name!r} was not served"
            )
        self._cancel_idle()
        for task in (self._start_task, self._stop_task):
            if task is not None and not task.done():
                task.cancel()

    def status(self) -> dict[str, Any]:
        idle_for = time.monotonic() - self.last_activity
        return {
            "name": self.name,
            "state": self.state.value,
            "backend": self.backend.name if self.backend is not None else "url",
            "container": self.config.container,
            "upstream": self.upstream.display if self.upstream else None,
            "last_activity": time.time() - idle_for,
            "idle_timeout_s": self.config.idle_timeout,
            "startup_timeout_s": self.config.startup_timeout,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "peak_waiting": self.peak_waiting,
            "queued": self.queued,
            "max_concurrency": self.config.max_concurrency,
            "last_error": self.last_error,
            "started_at": self.started_at,
        }
