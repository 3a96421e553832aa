"""The state machine alone, on the package's memory backend (the Docker one is tested against a
real engine in test_lifecycle_docker.py). Instances really listen on 127.0.0.1 once up."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hestia.backends.memory import MemoryBackend, MemoryInstance
from hestia.config import parse_config
from hestia.errors import (
    QueueTimeout,
    ServiceStartFailed,
    ServiceStartTimeout,
    ShuttingDown,
)
from hestia.lifecycle import ALLOWED, InvalidTransition, Service, State
from tests.conftest import wait_for


def _config(**overrides: Any) -> Any:
    return parse_config(
        {"services": {"box": {"container": "box", "backend": "memory", **overrides}}}
    ).resolve("box")


@pytest.fixture
async def backend() -> AsyncIterator[MemoryBackend]:
    b = MemoryBackend()
    yield b
    await b.close()


@pytest.fixture
def box(backend: MemoryBackend) -> MemoryInstance:
    return backend.add("box")


_services: list[Service] = []


def _state(svc: Service) -> State:
    """The state now (a call, so the type checker does not carry an earlier assert over)."""
    return svc.state


def _service(backend: MemoryBackend, **overrides: Any) -> Service:
    svc = Service(_config(**overrides), backend)
    _services.append(svc)
    return svc


@pytest.fixture(autouse=True)
async def _shutdown_services() -> AsyncIterator[None]:
    yield
    while _services:
        _services.pop().shutdown()


async def test_concurrent_acquires_share_one_start(
    backend: MemoryBackend, box: MemoryInstance
) -> None:
    svc = _service(backend)
    ups = await asyncio.gather(*(svc.acquire() for _ in range(100)))
    assert backend.count("start") == 1
    assert svc.state is State.READY
    assert svc.in_flight == 100
    assert {u.port for u in ups} == {box.port}
    for _ in ups:
        svc.release()
    assert svc.in_flight == 0


async def test_idle_stop_waits_for_in_flight(backend: MemoryBackend, box: MemoryInstance) -> None:
    svc = _service(backend, idle_timeout="0.2s")
    await svc.acquire()  # a long request
    first = svc.idle_deadline
    assert first is not None
    loop = asyncio.get_running_loop()
    # the timer fires while the request is in flight: it is put off, nothing is stopped
    await wait_for(lambda: (svc.idle_deadline or 0) > first and loop.time() > first, 5, "the timer")
    assert svc.state is State.READY and backend.count("stop") == 0
    svc.release()
    await wait_for(lambda: svc.state is State.STOPPED, 3, "idle stop")
    assert backend.count("stop") == 1


async def test_idle_timeout_zero_never_stops(backend: MemoryBackend, box: MemoryInstance) -> None:
    svc = _service(backend, idle_timeout=0)
    await svc.acquire()
    svc.release()
    assert svc.state is State.READY
    assert svc.idle_deadline is None  # no idle timer at all


async def test_exit_during_start_fails_all_waiters_with_reason(backend: MemoryBackend) -> None:
    box = backend.add("box", fail_exit=137)
    svc = _service(backend)
    results = await asyncio.gather(*(svc.acquire() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ServiceStartFailed) for r in results)
    err = results[0]
    assert isinstance(err, ServiceStartFailed)
    assert "exited with code 137" in err.message
    assert "simulated failure, exiting 137" in err.message
    assert svc.state is State.FAILED
    assert svc.last_error is not None and svc.last_error["code"] == "start_failed"
    # failed is not sticky: the next request tries again
    box.fail_exit = None
    await svc.acquire()
    assert _state(svc) is State.READY
    assert backend.count("start") == 2


async def test_each_waiter_gets_its_own_exception(backend: MemoryBackend) -> None:
    backend.add("box", fail_exit=1)
    svc = _service(backend)
    results = await asyncio.gather(*(svc.acquire() for _ in range(20)), return_exceptions=True)
    assert len({id(r) for r in results}) == 20
    errors = [r for r in results if isinstance(r, BaseException)]
    depths = [len(traceback.extract_tb(r.__traceback__)) for r in errors]
    assert max(depths) == min(depths)  # no traceback grows with the number of waiters


async def test_startup_timeout(backend: MemoryBackend) -> None:
    backend.add("box", start_delay=5)
    svc = _service(backend, startup_timeout="0.3s")
    with pytest.raises(ServiceStartTimeout):
        await svc.acquire()
    assert svc.waiting == 0


async def test_failed_start_stops_what_it_started(backend: MemoryBackend) -> None:
    box = backend.add("box", start_delay=5)
    svc = _service(backend, startup_timeout="0.3s")
    with pytest.raises(ServiceStartTimeout, match="Hestia stopped the instance"):
        await svc.acquire()
    await wait_for(lambda: not box.running, 3, "the instance to be stopped")
    assert svc.state is State.FAILED
    assert svc.last_error is not None and svc.last_error["detail"]["instance_stopped"] is True


async def test_a_stalled_loop_still_gives_the_start_verdict(backend: MemoryBackend) -> None:
    """The loop stalls (a busy machine) past both the start's deadline and the waiter's: the
    waiter still answers with what the start saw and did, not a bare timeout of its own."""
    box = backend.add("box", start_delay=5)
    svc = _service(backend, startup_timeout="0.3s")
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, time.sleep, 0.6)  # blocks the loop from 0.2 s to 0.8 s
    with pytest.raises(ServiceStartTimeout, match="Hestia stopped the instance"):
        await svc.acquire()
    await wait_for(lambda: not box.running, 3, "the instance to be stopped")


async def test_a_start_that_lands_after_the_timeout_is_stopped(backend: MemoryBackend) -> None:
    """The engine's start call outlasts startup_timeout (a loaded Docker daemon) and lands
    after it: the instance it brings up is stopped, not left running for ever."""
    box = backend.add("box", start_delay=5, start_call_delay=0.6)
    svc = _service(backend, startup_timeout="0.3s")
    with pytest.raises(ServiceStartTimeout, match="Hestia stopped the instance"):
        await svc.acquire()
    assert not box.running  # the start has not landed yet
    await wait_for(lambda: box.starts == 1 and not box.running, 3, "the late start, then a stop")
    assert [op for op, _ in backend.calls] == ["start", "stop"]


async def test_a_stop_during_a_slow_start_call_comes_after_it(backend: MemoryBackend) -> None:
    """A stop asked while the engine's start call is still out: the stop is sent after the
    start has landed, so the instance does not come up behind it and run for ever."""
    box = backend.add("box", start_delay=5, start_call_delay=0.5)
    svc = _service(backend)
    svc.ensure_started("request")
    await wait_for(lambda: backend.count("start") == 1, 3, "the start call")
    stop = svc.request_stop("api")
    assert stop is not None
    await asyncio.wait_for(stop, 5)
    assert box.starts == 1 and not box.running
    assert [op for op, _ in backend.calls] == ["start", "stop"]
    assert svc.state is State.STOPPED


async def test_failed_start_can_leave_the_instance_for_debugging(backend: MemoryBackend) -> None:
    box = backend.add("box", start_delay=5)
    svc = _service(backend, startup_timeout="0.3s", on_start_failure="leave")
    with pytest.raises(ServiceStartTimeout):
        await svc.acquire()
    assert box.running and backend.count("stop") == 0
    assert svc.last_error is not None and svc.last_error["detail"]["instance_stopped"] is False


async def test_missing_instance_is_a_clear_start_failure(backend: MemoryBackend) -> None:
    cfg = parse_config({"services": {"x": {"container": "gone", "backend": "memory"}}})
    svc = Service(cfg.resolve("x"), backend)
    with pytest.raises(ServiceStartFailed, match="'gone' of service 'x' does not exist"):
        await svc.acquire()


async def test_shutdown_answers_held_requests(backend: MemoryBackend) -> None:
    backend.add("box", start_delay=5)
    svc = _service(backend)
    held = asyncio.gather(*(svc.acquire() for _ in range(3)), return_exceptions=True)
    await wait_for(lambda: svc.waiting == 3, 2, "3 waiting")
    svc.shutdown()
    results = await asyncio.wait_for(held, 2)
    assert all(isinstance(r, ShuttingDown) and r.status == 503 for r in results)
    assert backend.count("stop") == 0  # instances are left as they are


async def test_request_during_stop_waits_then_starts_again(
    backend: MemoryBackend, box: MemoryInstance
) -> None:
    svc = _service(backend)
    await svc.acquire()
    svc.release()
    stop = svc.request_stop("test")
    assert stop is not None
    assert svc.state is State.STOPPING
    up = await svc.acquire()
    assert up.port == box.port
    assert _state(svc) is State.READY
    assert backend.count("stop") == 1 and backend.count("start") == 2


async def test_request_during_a_slow_stop_gets_a_whole_start_budget(
    backend: MemoryBackend,
) -> None:
    backend.add("box", stop_delay=0.6, start_delay=0.3)
    svc = _service(backend, startup_timeout="0.5s")
    await svc.acquire()
    svc.release()
    svc.request_stop("idle")
    # 0.6 s of stop + 0.3 s of start > startup_timeout, but the stop's time is not counted
    await asyncio.wait_for(svc.acquire(), 5)
    assert svc.state is State.READY


async def test_plain_url_service_is_always_ready() -> None:
    cfg = parse_config({"services": {"nas": {"url": "http://127.0.0.1:9/x"}}}).resolve("nas")
    svc = Service(cfg, None)
    assert svc.state is State.READY
    up = await svc.acquire()
    assert (up.host, up.port, up.base_path) == ("127.0.0.1", 9, b"/x")
    assert svc.request_stop("idle") is None
    assert svc.status()["backend"] == "url"
    assert svc.status()["idle_deadline_in_s"] is None  # never stopped: no idle countdown


async def test_max_concurrency_queues_then_504_when_slots_stay_busy(
    backend: MemoryBackend, box: MemoryInstance
) -> None:
    svc = _service(backend, max_concurrency=2, startup_timeout="0.5s")
    await svc.acquire()
    await svc.acquire()
    third = asyncio.create_task(svc.acquire())
    await wait_for(lambda: svc.queued == 1, 2, "a queued request")
    assert svc.in_flight == 2
    svc.release()  # a slot frees up: the queued request gets it
    await asyncio.wait_for(third, 2)
    assert svc.in_flight == 2 and svc.queued == 0
    with pytest.raises(QueueTimeout) as exc:
        await svc.acquire()  # nothing frees up within queue.timeout (startup_timeout)
    assert exc.value.status == 504 and exc.value.code == "queue_timeout"
    assert svc.queued == 0
    svc.release()
    svc.release()
    assert svc.in_flight == 0


async def test_reconfigure_max_concurrency_applies_to_waiting_and_next_requests(
    backend: MemoryBackend, box: MemoryInstance
) -> None:
    svc = _service(backend, max_concurrency=1)
    await svc.acquire()
    queued = [asyncio.create_task(svc.acquire()) for _ in range(3)]
    await wait_for(lambda: svc.queued == 3, 2, "3 queued")
    svc.reconfigure(_config(max_concurrency=3))
    await wait_for(lambda: svc.in_flight == 3, 2, "two let in by the larger limit")
    assert svc.queued == 1
    svc.reconfigure(_config(max_concurrency=None))
    await asyncio.wait_for(asyncio.gather(*queued), 2)
    assert svc.in_flight == 4 and svc.queued == 0
    for _ in range(4):
        svc.release()


async def test_reconfigure_url_applies_to_the_next_request(
    backend: MemoryBackend, box: MemoryInstance
) -> None:
    svc = _service(backend)
    up = await svc.acquire()
    svc.release()
    assert up.port == box.port
    svc.reconfigure(_config(url="http://127.0.0.1:9/base"))
    up = await svc.acquire()
    svc.release()
    assert (up.port, up.base_path) == (9, b"/base")
    assert svc.state is State.READY and backend.count("start") == 1


async def test_stop_during_a_start_does_not_cancel_held_requests(backend: MemoryBackend) -> None:
    box = backend.add("box", start_delay=0.5)
    svc = _service(backend)
    held = asyncio.create_task(svc.acquire())
    await wait_for(lambda: svc.state is State.STARTING, 2, "starting")
    stop = svc.request_stop("api")
    assert stop is not None
    up = await asyncio.wait_for(held, 5)  # waits out the stop, then a new start serves it
    assert up.port == box.port
    assert svc.state is State.READY
    assert backend.count("stop") == 1 and backend.count("start") == 2


async def test_api_stop_drains_requests_in_flight(
    backend: MemoryBackend, box: MemoryInstance
) -> None:
    svc = _service(backend)
    await svc.acquire()
    stop = svc.request_stop("api", drain=True)
    assert stop is not None
    await asyncio.sleep(0.2)
    assert box.running and not stop.done()  # the request in flight is not cut
    svc.release()
    await asyncio.wait_for(stop, 3)
    assert not box.running and svc.state is State.STOPPED


async def test_stop_that_needs_a_kill_is_reported(backend: MemoryBackend) -> None:
    backend.add("box", ignores_stop=True)
    svc = _service(backend, stop_timeout="0.2s")
    await svc.acquire()
    svc.release()
    stop = svc.request_stop("api")
    assert stop is not None
    await asyncio.wait_for(stop, 3)
    assert svc.last_stop is not None and svc.last_stop["killed"] is True
    assert svc.status()["last_stop"]["killed"] is True


async def test_crash_while_ready_is_noticed_and_next_request_restarts(
    backend: MemoryBackend, box: MemoryInstance
) -> None:
    svc = _service(backend)
    await svc.acquire()
    svc.release()
    seen: list[Any] = []

    async def follow() -> None:
        async for ev in backend.events():
            seen.append(ev)
            svc.on_event(ev)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0)  # subscribed
    await backend.crash("box")
    await wait_for(lambda: svc.state is State.STOPPED, 2, "the crash to be noticed")
    assert [e.exit_code for e in seen if e.kind == "die"] == [137]
    await svc.acquire()
    svc.release()
    assert backend.count("start") == 2
    follower.cancel()


async def test_impossible_transition_raises_in_tests(
    backend: MemoryBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HESTIA_STRICT", "1")
    svc = _service(backend)
    assert State.STOPPING not in ALLOWED[State.STOPPING]
    assert State.READY not in ALLOWED[State.STOPPING]
    svc.state = State.STOPPING
    with pytest.raises(InvalidTransition):
        svc._transition(State.READY, "test")
