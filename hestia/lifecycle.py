"""Per-service state machine: stopped -> starting -> ready -> stopping -> stopped (or failed).

One start at a time: every request that finds the service not ready waits on the same start
task, bounded by its own `startup_timeout`. In-flight requests (including open streams and
WebSockets) count as activity: the idle timer only stops a service with nothing in flight and
nobody waiting, `idle_timeout` after the last request ended.

Transitions are checked against `ALLOWED`: an impossible one is a bug (it raises
`InvalidTransition` when HESTIA_STRICT is set, as in the tests, and is logged otherwise).
Everything derived from the config (slots, upstream address, timers) is derived again by
`reconfigure()`, so a changed label or config entry applies to the next request without
dropping the requests in flight or waiting. Readiness itself (HTTP, TCP, the instance's own
health check) lives in `hestia.readiness`; this module knows no HTTP.

The hot path is `acquire()`/`release()` on a ready service: a state check and two counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, tzinfo
from enum import StrEnum
from typing import Any, cast

from loguru import logger

from hestia import readiness
from hestia.address import Upstream, upstream_from_address, upstream_from_url
from hestia.backends.base import Backend, BackendEvent, InstanceInfo, InstanceNotFound
from hestia.config import ServiceConfig
from hestia.errors import (
    BackendUnreachable,
    HestiaError,
    InstanceExited,
    QueueFull,
    QueueTimeout,
    ServiceRemoved,
    ServiceStartFailed,
    ServiceStartTimeout,
    ShuttingDown,
)
from hestia.limiter import Limiter
from hestia.upstream import UpstreamTimeouts
from hestia.wake import WakeFilter
from hestia.warmth import Clock, Warmth

# How often a start re-inspects the instance even without an event (a safety net for a
# missed event; readiness itself is noticed through events and the fast probe interval).
_INSPECT_EVERY_S = 1.0
_VERDICT_MARGIN_S = 0.25
# how long a waiter past its deadline still waits for a start past its own deadline
_VERDICT_GRACE_S = 5.0
_LOST = object()
# how often a service kept warm (or needed by a dependent) looks again at whether it still is
_WARM_RECHECK_S = 30.0
# how long a refused request waits to learn whether the instance died under it
_DEATH_NOTICE_S = 0.5  # a start found its instance gone: look for the next one
# An API stop lets the requests in flight finish for at most this long first.
DRAIN_TIMEOUT_S = 30.0


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


ALLOWED: dict[State, frozenset[State]] = {
    # READY from STOPPED/FAILED: a plain url service (no backend) is ready at once
    State.STOPPED: frozenset({State.STARTING, State.READY, State.FAILED, State.STOPPING}),
    State.STARTING: frozenset({State.READY, State.FAILED, State.STOPPING, State.STOPPED}),
    State.READY: frozenset({State.STOPPING, State.STOPPED, State.FAILED}),
    State.STOPPING: frozenset({State.STOPPED, State.FAILED}),
    State.FAILED: frozenset({State.STARTING, State.STOPPING, State.STOPPED, State.READY}),
}


class InvalidTransition(RuntimeError):
    pass


def _strict() -> bool:
    return os.environ.get("HESTIA_STRICT", "") not in ("", "0")


def _upstream_timeouts(config: ServiceConfig) -> UpstreamTimeouts:
    t = config.timeouts
    return UpstreamTimeouts(t.connect, t.response_headers or None, t.idle_body or None)


class Coordinator:
    """What a service's start and idle stop must ask of the other services (dependencies,
    exclusive groups); the registry provides it. The default knows no other service."""

    async def before_start(self, svc: Service) -> None:
        """Start what `svc` depends on and make room in its exclusive group."""

    def needed(self, svc: Service) -> bool:
        """True while another running service depends on `svc` (no idle stop then)."""
        return False


# (service, from_state, to_state, cause, reason, seconds spent in from_state)
StateListener = Callable[["Service", State, State, str, str, float], None]


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A shielded call's failure is seen by whoever awaits it; none is left unretrieved."""
    if not task.cancelled():
        task.exception()


class Service:
    """Runtime state of one service, managed (has a backend) or plain (url only)."""

    def __init__(
        self,
        config: ServiceConfig,
        backend: Backend | None,
        on_transition: StateListener | None = None,
        *,
        recreate_grace: float = 0.0,
        coordinator: Coordinator | None = None,
        tz: tzinfo | None = None,
        clock: Clock = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.coordinator = coordinator
        self._tz = tz
        self._clock = clock
        self.warmth = Warmth(config, tz, clock)
        self.wake = WakeFilter.build(config.wake)
        # after an outside stop of an instance that has a lineage (a compose service's), a
        # start waits this long for a replacement: `docker compose up -d` stops the old
        # container before it creates the new one, and must not find the old one started
        self.recreate_grace = recreate_grace
        self._lineage = ""
        self.name = config.name
        self.backend = backend if config.managed else None
        self._on_transition = on_transition
        self.state = State.READY if self.backend is None else State.STOPPED
        # the address requests go to now (None: not routable); last_upstream for display
        self.upstream: Upstream | None = None
        self.last_upstream: Upstream | None = None
        if config.url:
            self.last_upstream = upstream_from_url(config.url)
            if self.backend is None:
                self.upstream = self.last_upstream
        self.in_flight = 0
        self.waiting = 0
        # with data-plane workers (hestia.workers): their requests in flight, the controller's
        # "publish and wait until every worker has it" before a stop, and whether an idle
        # check holds the service back from the workers' fast path
        self.workers_in_flight = 0
        self.workers_barrier: Callable[[], Awaitable[None]] | None = None
        self.workers_holding = False
        self._limiter = Limiter(config.max_concurrency)
        self.timeouts = _upstream_timeouts(config)
        self.peak_waiting = 0
        self.refused: dict[str, int] = {}  # requests turned away, by error code
        self._state_since = time.monotonic()
        self._restored_state: str | None = None
        self._restored_activity = False
        self.last_activity = time.monotonic()
        self.last_activity_wall = time.time()
        self.started_at: float | None = None
        self.last_error: dict[str, Any] | None = None
        self.last_stop: dict[str, Any] | None = None
        self.instance_id: str | None = None
        self.instance_name: str | None = config.instance
        self.conflicts: dict[str, str] = {}  # instance name -> why it is not this service's
        self._reachable_error: str | None = None
        self._start_task: asyncio.Task[HestiaError | None] | None = None
        self._start_deadline: float | None = None  # loop time the running start gives up at
        self._stop_task: asyncio.Task[None] | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()  # an instance event arrived during a start
        self._bound = asyncio.Event()  # an instance was bound (a start can proceed)
        self._settled = asyncio.Event()  # no replacement pending: starts may proceed
        self._settled.set()
        self._settle_until = 0.0
        self._died: BackendEvent | None = None
        self._failed_started_at: str | None = None
        self._closing: asyncio.Future[HestiaError] | None = None  # why held requests end

    # ---------------------------------------------------------------- hot path
    async def acquire(self) -> Upstream:
        """Reserve a slot for one request; wait for a start when needed. Pair with release()."""
        lim = self._limiter
        if lim.capacity is None or (lim.in_use < lim.capacity and not lim._waiters):
            lim.in_use += 1
        else:
            await self._take_slot()
        upstream = self.upstream
        if upstream is not None and self.state is State.READY:
            return self._enter(upstream)
        try:
            return await self._acquire_slow()
        except BaseException:
            lim.release()
            raise

    def acquire_now(self) -> Upstream | None:
        """acquire() when it need not wait: the slot and the upstream at once, with no
        coroutine; None, taking nothing, when a request would wait (for a start, a stop, or
        a max_concurrency slot)."""
        upstream = self.upstream
        if upstream is None or self.state is not State.READY:
            return None
        lim = self._limiter
        if lim.capacity is not None and (lim.in_use >= lim.capacity or lim._waiters):
            return None
        lim.in_use += 1
        return self._enter(upstream)

    def _enter(self, upstream: Upstream) -> Upstream:
        """A request got its slot and a ready instance: it is in flight now."""
        if self.warmth.auto and not self.in_flight:
            self.warmth.note_gap(time.monotonic() - self.last_activity)
        self.in_flight += 1
        return upstream

    def release(self, touch: bool = True) -> None:
        """The request ended. `touch=False`: it does not count as activity (a request the
        wake filter ignores, e.g. an uptime checker's)."""
        self.in_flight -= 1
        if touch:
            self.last_activity = time.monotonic()
        self._limiter.release()

    def note_refusal(self, code: str) -> None:
        self._count(code)

    @property
    def queue_timeout(self) -> float:
        return self.config.queue.timeout or self.config.startup_timeout

    def _check_room(self) -> None:
        limit = self.config.queue.max_waiting
        if self.waiting + self.queued >= limit:
            self._count("queue_full")
            raise QueueFull(
                f"service {self.name!r} already has {limit} request(s) waiting "
                f"(queue.max_waiting); retry in a moment",
                service=self.name,
                retry_after=self._retry_after(),
            )

    def _retry_after(self) -> int:
        """Seconds a refused client should wait: about one start."""
        return max(1, min(60, round(self.config.startup_timeout / 4)))

    def _count(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    async def _take_slot(self) -> None:
        """With max_concurrency: wait (FIFO, at most queue.timeout) for a free slot."""
        self._check_room()
        timeout = self.queue_timeout
        try:
            await self._limiter.acquire(timeout)
        except TimeoutError:
            self._count("queue_timeout")
            raise QueueTimeout(
                f"service {self.name!r} had all {self.config.max_concurrency} of its "
                f"max_concurrency slots busy for {timeout:g}s (queue.timeout); retry later "
                "or raise max_concurrency",
                service=self.name,
            ) from None

    @property
    def queued(self) -> int:
        """Requests waiting for a max_concurrency slot."""
        return self._limiter.waiting

    # ---------------------------------------------------------------- waiting
    async def _acquire_slow(self) -> Upstream:
        loop = asyncio.get_running_loop()
        closing = self._closing_future()
        if closing.done():
            raise closing.result().fresh()
        if self._reachable_error is not None:
            raise self._unreachable()
        self._check_room()
        # a little over the timeout when it is the start's: the start itself gives up at
        # startup_timeout, and its verdict (what it saw, what it stopped) is the better answer
        deadline = loop.time() + self.queue_timeout + _VERDICT_MARGIN_S
        abandoned = False
        self.waiting += 1
        if self.waiting > self.peak_waiting:
            self.peak_waiting = self.waiting
        try:
            while not (self.state is State.READY and self.upstream is not None):
                waited_for_stop = False
                if self.state is State.STOPPING and self._stop_task is not None:
                    task: asyncio.Future[Any] = self._stop_task
                    waited_for_stop = True
                else:
                    task = self.ensure_started("request")
                t0 = loop.time()
                done, _ = await asyncio.wait(
                    (task, closing),
                    timeout=max(deadline - loop.time(), 0),
                    return_when="FIRST_COMPLETED",
                )
                if closing in done:
                    raise closing.result().fresh()
                if not done and task is self._start_task and self._start_overdue(loop.time()):
                    # the start's own deadline has passed too: it is failing right now and its
                    # verdict (what it saw, what it stopped) is the better answer; it is due
                    # within a few loop steps, more on a stalled machine, so wait for it a bit
                    done, _ = await asyncio.wait(
                        (task, closing), timeout=_VERDICT_GRACE_S, return_when="FIRST_COMPLETED"
                    )
                    if closing in done:
                        raise closing.result().fresh()
                if not done:
                    self._count("start_timeout")
                    raise ServiceStartTimeout(
                        f"service {self.name!r} was not ready within {self.queue_timeout:g}s "
                        "(its startup_timeout, or queue.timeout); check its logs or raise it",
                        service=self.name,
                        detail={"state": self.state.value},
                    )
                if waited_for_stop:
                    # a request that came during a stop waits for it, then for a whole start:
                    # the stop's time does not count against the start's budget
                    deadline += min(loop.time() - t0, self.config.stop_timeout + 1.0)
                    continue
                if task.cancelled():
                    continue  # a stop or a replacement cancelled the start: start again
                result = task.result()
                if isinstance(result, HestiaError):
                    raise result.fresh()
                if self._reachable_error is not None:
                    raise self._unreachable()
        except asyncio.CancelledError:
            abandoned = True  # the client went away while waiting
            raise
        finally:
            self.waiting -= 1
            if abandoned and not self.waiting:
                self._abandoned()
        self.in_flight += 1
        return self.upstream

    def _abandoned(self) -> None:
        """Every client waiting for this start has gone."""
        if self.config.start.cancel_when_abandoned and self.state is State.STARTING:
            logger.info(
                "service {}: every request waiting for its start has gone; stopping the start "
                "(start.cancel_when_abandoned)",
                self.name,
            )
            self.request_stop("abandoned")

    def _start_overdue(self, now: float) -> bool:
        return self._start_deadline is not None and now >= self._start_deadline

    def _closing_future(self) -> asyncio.Future[HestiaError]:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
        return self._closing

    def closing_error(self) -> HestiaError | None:
        """Why held requests are being answered now (shutdown, removal), if they are."""
        if self._closing is not None and self._closing.done():
            return self._closing.result().fresh()
        return None

    def _unreachable(self) -> HestiaError:
        return BackendUnreachable(
            f"service {self.name!r} cannot be reached: its backend "
            f"{self.backend.name if self.backend is not None else '?'} is unreachable "
            f"({self._reachable_error}); retry when it is back",
            service=self.name,
        )

    def ensure_started(self, cause: str) -> asyncio.Task[HestiaError | None]:
        """The running start task, or a new one. Never two at once."""
        if self._start_task is None or self._start_task.done():
            self._start_task = asyncio.get_running_loop().create_task(
                self._run_start(cause), name=f"hestia-start-{self.name}"
            )
        return self._start_task

    # ---------------------------------------------------------------- start
    async def _run_start(self, cause: str) -> HestiaError | None:
        if self.backend is None:
            self._transition(State.READY, cause)
            return None
        if self._stop_task is not None and not self._stop_task.done():
            await asyncio.shield(self._stop_task)
        loop = asyncio.get_running_loop()
        deadline = self._start_deadline = loop.time() + self.config.startup_timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wait_settled()
                    ref = await self._wait_bound()
            except TimeoutError:
                return self._fail(
                    ServiceStartFailed(
                        f"service {self.name!r} has no instance to start: its container is "
                        "gone and none replaced it; create it (e.g. docker compose up -d) or "
                        "fix `container`",
                        service=self.name,
                    ),
                    cause,
                )
            result = await self._start_instance(ref, deadline, cause)
            if result is not _LOST:
                return cast(HestiaError | None, result)

    async def _start_instance(
        self, ref: str, deadline: float, cause: str
    ) -> HestiaError | object | None:
        assert self.backend is not None
        loop = asyncio.get_running_loop()
        backend = self.backend
        spec = self.config
        self._died = None
        self._changed.clear()
        self._cancel_idle()
        self._transition(State.STARTING, cause, f"start asked by {cause}")
        t0 = loop.time()
        info: InstanceInfo | None = None
        start_call: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout_at(deadline):
                if self.coordinator is not None and (spec.depends_on or spec.exclusive_group):
                    await self.coordinator.before_start(self)
                info = await backend.inspect(ref, spec)
                if not info.running:
                    # shielded, so the verdict does not wait for it: a timeout cancels it and
                    # the stop after the failure waits until it is over (a backend's start
                    # returns from a cancel once nothing of it can land later)
                    start_call = loop.create_task(backend.start(ref, spec))
                    start_call.add_done_callback(_retrieved)
                    await asyncio.shield(start_call)
                    info = await backend.inspect(ref, spec)
                upstream = await self._wait_ready(backend, ref, spec, info)
        except asyncio.CancelledError:
            # a stop (or shutdown) cancelled the start: the backend's start call ends first
            # (Semaphore stops its task, Docker's lands), so the stop that follows is last
            if start_call is not None and not start_call.done():
                start_call.cancel()
                await asyncio.wait([start_call], timeout=max(self.config.stop_timeout, 30.0))
            raise
        except TimeoutError:
            err: HestiaError = ServiceStartTimeout(
                f"service {self.name!r} (instance {self.instance_name or ref!r}) was not ready "
                f"within {spec.startup_timeout:g}s; check its logs, or raise startup_timeout",
                service=self.name,
            )
            return self._start_failed(err, cause, ref, info, start_call)
        except InstanceNotFound as exc:
            if ref == self.instance_id:
                # the instance went away under the start (removed, replaced): wait for the
                # next one, or fall back to the configured name
                self.instance_id = None
                self._transition(State.STOPPED, cause, "its instance went away while starting")
                return _LOST
            return self._fail(
                ServiceStartFailed(
                    f"instance {self.instance_name or ref!r} of service {self.name!r} does not "
                    "exist; create it (e.g. docker compose up --no-start) or fix `container`",
                    service=self.name,
                    detail={"backend_error": exc.message},
                ),
                cause,
            )
        except HestiaError as exc:
            exc.service = exc.service or self.name
            return self._start_failed(exc, cause, ref, info)
        except Exception as exc:  # a bug (ours or a backend's): fail the start, not the loop
            logger.exception("starting service {} failed unexpectedly", self.name)
            failure = ServiceStartFailed(
                f"starting service {self.name!r} failed unexpectedly: {exc!r}; this is a bug, "
                "please report it with the log",
                service=self.name,
            )
            return self._start_failed(failure, cause, ref, info)
        self.started_at = time.time()
        self._failed_started_at = None
        if cause != "adopted":
            self._touch()
        self.upstream = self.last_upstream = upstream
        took_ms = (loop.time() - t0) * 1000
        self._transition(State.READY, cause, f"ready after {took_ms:.0f} ms")
        self.last_error = None
        # an adopted service keeps the idle clock it had (restored across a restart)
        self._schedule_idle(max(self._idle_remaining(), 0.0))
        return None

    async def _wait_settled(self) -> None:
        """A replacement is expected (a compose recreate): wait for it, bounded."""
        while not self._settled.is_set():
            remaining = self._settle_until - time.monotonic()
            if remaining <= 0:
                self._settled.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), remaining)

    async def _wait_bound(self) -> str:
        while True:
            ref = self.instance_id or (self.config.instance if not self._unbound else None)
            if ref is not None:
                return ref
            self._bound.clear()
            await self._bound.wait()

    def _start_failed(
        self,
        err: HestiaError,
        cause: str,
        ref: str,
        info: InstanceInfo | None,
        start_call: asyncio.Task[None] | None = None,
    ) -> HestiaError:
        """Fail the start (every waiter gets `err` now); with on_start_failure: stop, stop
        what it left running in the background, or it would run forever, never ready and
        never idle. `start_call`: the backend's start, when the timeout came after it was sent
        (maybe before it returned): the instance may come up after this, so it is stopped
        once that call is over."""
        self.started_at = None
        running = (
            info is not None and self._died is None and (info.running or start_call is not None)
        )
        stop = running and self.backend is not None and self.config.on_start_failure == "stop"
        if info is not None:
            self._failed_started_at = info.started_at
        err.detail["instance_stopped"] = stop
        if start_call is not None:
            start_call.cancel()  # Semaphore stops its task; Docker's call lands, then returns
        if stop:
            err.message += "; Hestia stopped the instance (on_start_failure: stop)"
        self._fail(err, cause)
        if stop:
            self._stop_task = asyncio.get_running_loop().create_task(
                self._stop_after_failure(ref, start_call), name=f"hestia-stop-{self.name}"
            )
        return err

    async def _stop_after_failure(self, ref: str, start_call: asyncio.Task[None] | None) -> None:
        assert self.backend is not None
        if start_call is not None:
            # bounded: a backend that does not return from a cancelled start must not hold
            # the stop for ever
            await asyncio.wait([start_call], timeout=max(self.config.stop_timeout, 30.0))
        try:
            result = await self.backend.stop(ref, self.config, self.config.stop_timeout)
        except HestiaError as exc:
            logger.warning(
                "service {}: stopping the instance after its failed start failed: {}",
                self.name,
                exc.message,
            )
            return
        self.last_stop = {"at": time.time(), "cause": "start_failed", "killed": result.killed}

    def _fail(self, err: HestiaError, cause: str) -> HestiaError:
        self.last_error = {**err.to_dict()["error"], "at": time.time()}
        self._transition(State.FAILED, cause, err.message)
        return err

    async def _wait_ready(
        self, backend: Backend, ref: str, spec: ServiceConfig, info: InstanceInfo
    ) -> Upstream:
        loop = asyncio.get_running_loop()
        next_inspect = loop.time() + _INSPECT_EVERY_S
        while True:
            await self._check_alive(backend, info)
            upstream = self._upstream_for(info)
            self.last_upstream = upstream
            delay = await readiness.check(self.name, spec.health, info, upstream)
            if delay is None:
                return upstream
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), delay)
            self._changed.clear()
            own = readiness.mode_for(spec.health, info) == "own"
            if self._died is not None or own or loop.time() >= next_inspect:
                info = await backend.inspect(ref, spec)
                next_inspect = loop.time() + _INSPECT_EVERY_S

    def _upstream_for(self, info: InstanceInfo) -> Upstream:
        url = self.config.url or info.url
        if url is not None:
            return upstream_from_url(url)
        if info.address is None:
            raise ServiceStartFailed(
                f"instance {info.name!r} of service {self.name!r} has no address Hestia can "
                "reach: put both on one network, publish its port, or set `url`",
                service=self.name,
            )
        return upstream_from_address(*info.address)

    async def _check_alive(self, backend: Backend, info: InstanceInfo) -> None:
        if info.running and self._died is None:
            return
        code = self._died.exit_code if self._died is not None else info.exit_code
        logs = await backend.logs_tail(info.id, 20)
        last = logs.splitlines()[-5:]
        raise ServiceStartFailed(
            f"instance {info.name!r} of service {self.name!r} exited with code {code} while "
            f"starting; last log lines: {' | '.join(last) or '(none)'}",
            service=self.name,
            detail={"exit_code": code, "logs": logs},
        )

    # ---------------------------------------------------------------- stop
    def request_stop(self, cause: str, *, drain: bool = False) -> asyncio.Task[None] | None:
        """Stop the instance. `drain`: let the requests in flight finish first (bounded);
        new requests wait for the stop and then start the service again."""
        if self.backend is None or self.state is State.STOPPED:
            return None
        if self._stop_task is None or self._stop_task.done():
            # STOPPING at once, not when the task first runs: a request arriving in between
            # must wait for the stop and start again, never take the fast path to a dying
            # instance.
            self._cancel_idle()
            self.upstream = None
            self._transition(State.STOPPING, cause, f"stop asked by {cause}")
            self._stop_task = asyncio.get_running_loop().create_task(
                self._run_stop(cause, drain), name=f"hestia-stop-{self.name}"
            )
        return self._stop_task

    async def _run_stop(self, cause: str, drain: bool) -> None:
        assert self.backend is not None
        if self.workers_barrier is not None:
            await self.workers_barrier()  # every worker routes this service here from now on
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._start_task
        self._cancel_idle()
        if drain and (self.in_flight or self.workers_in_flight):
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            # polled, so release() on the hot path stays two counters
            while (self.in_flight or self.workers_in_flight) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        ref = self.instance_id or self.config.instance
        if ref is None:
            self._transition(State.STOPPED, cause, "no instance to stop")
            return
        t0 = time.monotonic()
        try:
            result = await self.backend.stop(ref, self.config, self.config.stop_timeout)
        except InstanceNotFound:
            result = None
        except HestiaError as exc:
            logger.error("stopping service {} failed: {}", self.name, exc.message)
            self._fail(exc, cause)
            return
        took = time.monotonic() - t0
        self.started_at = None
        killed = result is not None and result.killed
        self.last_stop = {"at": time.time(), "cause": cause, "killed": killed, "took_s": took}
        why = (
            f"did not stop within stop_timeout {self.config.stop_timeout:g}s and was killed"
            if killed
            else "stopped"
        )
        self._transition(State.STOPPED, cause, f"instance {why}")

    # ---------------------------------------------------------------- idle
    @property
    def idle_timeout(self) -> float:
        """The idle timeout in force now (`idle_timeout: auto` follows recent use)."""
        return self.warmth.idle_timeout()

    def _idle_remaining(self) -> float:
        return self.last_activity + self.idle_timeout - time.monotonic()

    def _schedule_idle(self, delay: float) -> None:
        if self.backend is None or (self.idle_timeout <= 0 and not self.warmth.auto):
            return
        self._cancel_idle()
        self._idle_handle = asyncio.get_running_loop().call_later(delay, self._idle_check)

    def _cancel_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    @property
    def idle_deadline(self) -> float | None:
        """When the idle timer fires next (loop time), or None when none is scheduled."""
        return self._idle_handle.when() if self._idle_handle is not None else None

    def _idle_check(self) -> None:
        self._idle_handle = None
        if self.state is not State.READY:
            return
        timeout = self.idle_timeout
        if self.in_flight or self.workers_in_flight or self.waiting or self.queued:
            self._schedule_idle(timeout)
            return
        remaining = self._idle_remaining()
        if remaining > 0.001:
            self._schedule_idle(remaining)
            return
        # kept warm (keep_warm, a schedule window) or needed by a running dependent: look
        # again later (a schedule's end or a dependent's stop lets the timer act then)
        if self.warmth.keep_running() or (
            self.coordinator is not None and self.coordinator.needed(self)
        ):
            self._schedule_idle(min(max(timeout, 1.0), _WARM_RECHECK_S))
            return
        if self.workers_barrier is not None:
            asyncio.get_running_loop().create_task(self._idle_stop_past_workers(timeout))
            return
        logger.info(
            "service {} idle for {:g}s with nothing in flight: stopping it", self.name, timeout
        )
        self.request_stop("idle")

    async def _idle_stop_past_workers(self, timeout: float) -> None:
        """An idle stop with data-plane workers: take the service off their fast path, wait
        until every worker has that table (their acknowledgements carry what they still have
        in flight and touched), and stop only if it is still idle; else hand it back."""
        assert self.workers_barrier is not None
        self.workers_holding = True
        try:
            await self.workers_barrier()
        finally:
            self.workers_holding = False
        if self.state is not State.READY:
            return
        busy = self.in_flight or self.workers_in_flight or self.waiting or self.queued
        remaining = self._idle_remaining()
        if busy or remaining > 0.001:
            self._schedule_idle(timeout if busy else remaining)
            return
        logger.info(
            "service {} idle for {:g}s with nothing in flight: stopping it", self.name, timeout
        )
        self.request_stop("idle")

    # ---------------------------------------------------------------- config
    def reconfigure(self, config: ServiceConfig, backend: Backend | None = None) -> None:
        """Apply a new config to the next request: slots, address, timers, backend. Requests
        in flight and waiting keep going."""
        old = self.config
        if config == old and (backend is self.backend or not config.managed):
            return
        self.config = config
        was_managed = self.backend is not None
        self.backend = backend if config.managed else None
        self._limiter.resize(config.max_concurrency)
        self.timeouts = _upstream_timeouts(config)
        warmth = Warmth(config, self._tz, self._clock)
        warmth.adopt_history(self.warmth)
        self.warmth = warmth
        self.wake = WakeFilter.build(config.wake)
        if config.instance != old.instance and self.instance_id is None:
            self.instance_name = config.instance
        if config.url != old.url:
            if config.url is not None:
                fresh = upstream_from_url(config.url)
                self.last_upstream = fresh
                if self.upstream is not None:
                    self.upstream = fresh
            elif self.state is State.READY and self.backend is not None:
                # the address now comes from the instance: find it before the next request
                self.upstream = None
                self._transition(State.STOPPED, "config", "upstream address changed")
                self.ensure_started("config")
        if self.backend is None and was_managed:  # now a plain url: always ready, never stopped
            self._cancel_idle()
            self.upstream = self.last_upstream
            self._transition(State.READY, "config", "now a plain url service")
        elif self.backend is not None and not was_managed:  # now managed: see what it does
            self.upstream = None
            self._transition(State.STOPPED, "config", "now managed by " + self.backend.name)
        if self.state is State.READY and (
            config.idle_timeout != old.idle_timeout
            or config.keep_warm != old.keep_warm
            or config.warm_schedule != old.warm_schedule
        ):
            self._cancel_idle()
            self._schedule_idle(max(self._idle_remaining(), 0.0))
        logger.info("service {} reconfigured (source: {})", self.name, config.source)

    # ---------------------------------------------------------------- instances
    @property
    def _unbound(self) -> bool:
        # a labelled service whose instance is gone has nothing to fall back on by name
        return self.config.source == "labels" and self.instance_id is None

    def bind(self, info: InstanceInfo) -> None:
        """This instance is the service's (found at start-up, by reconcile, or replacing an
        older one); take it over without restarting it."""
        replaced = self.instance_id is not None and info.id != self.instance_id
        if replaced:
            logger.info(
                "service {}: instance {} replaces {}",
                self.name,
                info.name,
                self.instance_name,
            )
            if self._start_task is not None and not self._start_task.done():
                self._start_task.cancel()
            if self.state in (State.READY, State.STARTING):
                self._cancel_idle()
                self.upstream = None
                self.started_at = None
                self._transition(State.STOPPED, "external", f"replaced by {info.name}")
            self._failed_started_at = None
        self.instance_id = info.id
        self.instance_name = info.name
        self._lineage = info.lineage
        self._bound.set()
        if replaced or not self._lineage:
            self.settle()  # the replacement is here: held starts go on, with it
        self.adopt(info)

    def unbind(self, why: str) -> None:
        """The instance is gone (removed); the service waits for a new one."""
        self.instance_id = None
        self._died = self._died or BackendEvent("die", "", "")
        self._changed.set()
        if self.state in (State.READY, State.STARTING):
            self._cancel_idle()
            self.upstream = None
            self.started_at = None
            if self._start_task is not None and not self._start_task.done():
                self._start_task.cancel()
            self._transition(State.STOPPED, "external", why)

    def hold_starts(self, seconds: float) -> None:
        """A replacement instance is expected: starts wait up to `seconds` for it."""
        self._settle_until = max(self._settle_until, time.monotonic() + seconds)
        self._settled.clear()

    def settle(self) -> None:
        """The replacement (or the knowledge that none is coming) is there: starts go on."""
        self._settled.set()

    def adopt(self, info: InstanceInfo) -> None:
        """Bring the state in line with what the instance does, without restarting it."""
        restored, self._restored_state = self._restored_state, None
        if info.running and (
            self.state is State.STOPPED
            or (self.state is State.FAILED and info.started_at != self._failed_started_at)
        ):
            if not self._restored_activity or restored == State.STARTING.value:
                self._touch()  # the idle clock starts at adoption
            self._restored_activity = False
            self.ensure_started("adopted")
        elif not info.running and restored == State.STARTING.value:
            self._fail(
                ServiceStartFailed(
                    f"Hestia restarted while starting service {self.name!r} and its instance "
                    f"{info.name!r} is not running (exit code {info.exit_code}); the next "
                    "request starts it again",
                    service=self.name,
                ),
                "recovery",
            )
        elif not info.running and self.state is State.READY:
            self.upstream = None
            self._transition(State.STOPPED, "external", f"instance {info.name!r} is not running")

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
            if self._lineage and self.state in (State.READY, State.STARTING):
                self.hold_starts(self.recreate_grace)  # stopped from outside: a recreate?
            if self.state is State.STARTING:
                if event.kind == "die":
                    self._died = event
                self._changed.set()
            elif self.state is State.READY:
                self._cancel_idle()
                self.upstream = None
                self.started_at = None
                if event.kind == "die" and event.crashed:
                    # a failure the backend vouches for (a host process's non-zero exit):
                    # failed, with why in last_error; the next request starts it again
                    self._fail(
                        InstanceExited(
                            f"instance {event.name!r} of service {self.name!r} exited with "
                            f"code {event.exit_code} while ready"
                            + (f"; {event.reason}" if event.reason else ""),
                            service=self.name,
                            detail={"exit_code": event.exit_code},
                        ),
                        "external",
                    )
                else:
                    self._transition(
                        State.STOPPED,
                        "external",
                        f"instance stopped outside Hestia (exit code {event.exit_code})",
                    )
        elif event.kind == "start":
            if self.state in (State.STOPPED, State.FAILED) and (
                self._stop_task is None or self._stop_task.done()
            ):
                self._touch()
                self.ensure_started("external")

    async def instance_gone(self, upstream: Upstream) -> bool:
        """After a refused connection to `upstream`: has the instance died (so a retry may
        wait for a new start), rather than the service refusing?"""
        if self.backend is None:
            return False
        if self.state is not State.READY or self.upstream is not upstream:
            return True  # its death was noticed meanwhile
        ref = self.instance_id or self.config.instance
        if ref is None:
            return False
        # a killed instance's connections close a moment before the engine reports it dead
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DEATH_NOTICE_S
        while True:
            try:
                info = await self.backend.inspect(ref, self.config)
            except InstanceNotFound:
                break
            except HestiaError:
                return False
            if not info.running:
                break
            if self.state is not State.READY or self.upstream is not upstream:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.1)
        if self.state is State.READY and self.upstream is upstream:
            self.on_event(BackendEvent("die", ref, self.instance_name or ref))
        return True

    def set_reachable(self, error: str | None) -> None:
        """The backend lost (error) or regained (None) its connection."""
        self._reachable_error = error

    # ---------------------------------------------------------------- misc
    def _touch(self) -> None:
        self.last_activity = time.monotonic()
        self.last_activity_wall = time.time()

    def _transition(self, new: State, cause: str, reason: str = "") -> None:
        old = self.state
        if old is new:
            return
        if new not in ALLOWED[old]:
            msg = f"service {self.name}: impossible transition {old.value} -> {new.value}"
            if _strict():
                raise InvalidTransition(msg)
            logger.error("{} ({}); this is a bug in Hestia", msg, reason or cause)
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

    def shutdown(self, err: HestiaError | None = None) -> None:
        """Answer every held request (503 unless `err` says otherwise) and cancel timers;
        instances are left as they are."""
        closing = self._closing_future()
        if not closing.done():
            closing.set_result(
                err
                or ShuttingDown(
                    f"Hestia is shutting down; the request for {self.name!r} was not served",
                    service=self.name,
                )
            )
        self._cancel_idle()
        for task in (self._start_task, self._stop_task):
            if task is not None and not task.done():
                task.cancel()

    def remove(self, why: str) -> None:
        self.shutdown(
            ServiceRemoved(f"service {self.name!r} was removed: {why}", service=self.name)
        )

    def status(self) -> dict[str, Any]:
        idle_for = time.monotonic() - self.last_activity
        upstream = self.upstream or self.last_upstream
        return {
            "name": self.name,
            "state": self.state.value,
            "backend": self.backend.name if self.backend is not None else "url",
            "source": self.config.source,
            "container": self.instance_name,
            "upstream": upstream.display if upstream else None,
            "last_activity": time.time() - idle_for,
            "idle_timeout_s": self.idle_timeout,
            "idle_deadline_in_s": (
                max(0.0, self._idle_remaining())
                # a plain URL service is never stopped: no countdown to show
                if self.state is State.READY and self.idle_timeout > 0 and self.backend is not None
                else None
            ),
            "startup_timeout_s": self.config.startup_timeout,
            "stop_timeout_s": self.config.stop_timeout,
            "in_flight": self.in_flight,
            "workers_in_flight": self.workers_in_flight,
            "waiting": self.waiting,
            "peak_waiting": self.peak_waiting,
            "queued": self.queued,
            "max_concurrency": self.config.max_concurrency,
            "last_error": self.last_error,
            "last_stop": self.last_stop,
            "started_at": self.started_at,
            "backend_reachable": self._reachable_error is None,
            "conflicts": [
                {"instance": name, "reason": why} for name, why in sorted(self.conflicts.items())
            ],
            "max_waiting": self.config.queue.max_waiting,
            "queue_timeout_s": self.queue_timeout,
            "refused": dict(self.refused),
            "strategy": self.config.strategy,
            "depends_on": list(self.config.depends_on),
            "exclusive_group": self.config.exclusive_group,
            "warmth": self.warmth.status(),
        }
