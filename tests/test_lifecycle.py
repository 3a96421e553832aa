"""The state machine alone, with an in-memory backend (the Docker one is tested against a real
engine in test_lifecycle_docker.py). Upstreams here are real listening sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hestia.backends.base import BackendEvent, InstanceInfo, InstanceNotFound
from hestia.config import parse_config
from hestia.errors import ServiceBusy, ServiceStartFailed, ServiceStartTimeout, ShuttingDown
from hestia.lifecycle import Service, State
from tests.conftest import wait_for


class MemoryBackend:
    """Instances that 'listen' by opening a real TCP server on 127.0.0.1 after a delay."""

    name = "memory"

    def __init__(self, start_delay: float = 0.1, fail_with_exit: int | None = None) -> None:
        self.start_delay = start_delay
        self.fail_with_exit = fail_with_exit
        self.running = False
        self.starts = 0
        self.stops = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.listeners: list[Service] = []

    async def inspect(self, ref: str) -> InstanceInfo:
        if ref != "box":
            raise InstanceNotFound(f"container {ref!r} does not exist")
        return InstanceInfo(
            id="id-box",
            name="box",
            running=self.running,
            status="running" if self.running else "exited",
            exit_code=self.fail_with_exit,
            published={80: ("127.0.0.1", self.port)} if self.port else {},
        )

    async def start(self, ref: str) -> None:
        self.starts += 1
        self.running = True
        asyncio.get_running_loop().create_task(self._come_up())

    async def _come_up(self) -> None:
        await asyncio.sleep(self.start_delay)
        if self.fail_with_exit is not None:
            self.running = False
            for svc in self.listeners:
                svc.on_event(BackendEvent("die", "id-box", "box", exit_code=self.fail_with_exit))
            return
        self.server = await asyncio.start_server(_answer_200, "127.0.0.1", self.port or 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self, ref: str, timeout: float = 10.0) -> None:
        self.stops += 1
        self.running = False
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def logs_tail(self, ref: str, lines: int = 20) -> str:
        return "boom: cannot open model file"

    async def list_opted_in(self) -> list[InstanceInfo]:
        return []

    async def events(self) -> AsyncIterator[BackendEvent]:
        await asyncio.Event().wait()
        yield BackendEvent("start", "", "")

    def self_networks(self) -> set[str]:
        return set()

    def is_self(self, info: InstanceInfo) -> bool:
        return False

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _answer_200(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await writer.drain()
    writer.close()


def _service(backend: MemoryBackend, **overrides: Any) -> Service:
    cfg = parse_config(
        {"services": {"box": {"container": "box", "port": 80, **overrides}}}
    ).resolve("box")
    # the memory backend publishes port 80 on a random host port once it listens; before
    # that, the address is unknown and the probe retries
    svc = Service(cfg, backend)  # type: ignore[arg-type]
    backend.listeners.append(svc)
    return svc


@pytest.fixture
async def backend() -> AsyncIterator[MemoryBackend]:
    b = MemoryBackend()
    # reserve a port up front so the address is stable
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        b.port = s.getsockname()[1]
    yield b
    for svc in b.listeners:
        svc.shutdown()
    if b.server is not None:
        b.server.close()
        await b.server.wait_closed()


async def test_concurrent_acquires_share_one_start(backend: MemoryBackend) -> None:
    svc = _service(backend)
    ups = await asyncio.gather(*(svc.acquire() for _ in range(100)))
    assert backend.starts == 1
    assert svc.state is State.READY
    assert svc.in_flight == 100
    assert {u.port for u in ups} == {backend.port}
    for _ in ups:
        svc.release()
    assert svc.in_flight == 0


async def test_idle_stop_waits_for_in_flight(backend: MemoryBackend) -> None:
    svc = _service(backend, idle_timeout="0.3s")
    await svc.acquire()  # a long request: in flight for 1 s
    await asyncio.sleep(1.0)
    assert svc.state is State.READY and backend.stops == 0
    svc.release()
    await wait_for(lambda: svc.state is State.STOPPED, 3, "idle stop")
    assert backend.stops == 1


async def test_idle_timeout_zero_never_stops(backend: MemoryBackend) -> None:
    svc = _service(backend, idle_timeout=0)
    await svc.acquire()
    svc.release()
    await asyncio.sleep(0.3)
    assert svc.state is State.READY


async def test_exit_during_start_fails_all_waiters_with_reason(backend: MemoryBackend) -> None:
    backend.fail_with_exit = 137
    svc = _service(backend)
    results = await asyncio.gather(*(svc.acquire() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ServiceStartFailed) for r in results)
    err = results[0]
    assert isinstance(err, ServiceStartFailed)
    assert "exited with code 137" in err.message
    assert "boom: cannot open model file" in err.message
    assert svc.state is State.FAILED
    assert svc.last_error is not None and svc.last_error["code"] == "start_failed"
    # failed is not sticky: the next request tries again
    backend.fail_with_exit = None
    await svc.acquire()
    assert svc.state is State.READY
    assert backend.starts == 2


async def test_startup_timeout(backend: MemoryBackend) -> None:
    backend.start_delay = 5
    svc = _service(backend, startup_timeout="0.3s")
    with pytest.raises(ServiceStartTimeout):
        await svc.acquire()
    assert svc.waiting == 0


async def test_missing_container_is_a_clear_start_failure(backend: MemoryBackend) -> None:
    cfg = parse_config({"services": {"x": {"container": "gone"}}}).resolve("x")
    svc = Service(cfg, backend)  # type: ignore[arg-type]
    with pytest.raises(ServiceStartFailed, match="'gone' of service 'x' does not exist"):
        await svc.acquire()


async def test_shutdown_answers_held_requests(backend: MemoryBackend) -> None:
    backend.start_delay = 5
    svc = _service(backend)
    held = asyncio.gather(*(svc.acquire() for _ in range(3)), return_exceptions=True)
    await wait_for(lambda: svc.waiting == 3, 2, "3 waiting")
    svc.shutdown()
    results = await asyncio.wait_for(held, 2)
    assert all(isinstance(r, ShuttingDown) and r.status == 503 for r in results)
    assert backend.stops == 0  # containers are left as they are


async def test_request_during_stop_waits_then_starts_again(backend: MemoryBackend) -> None:
    svc = _service(backend)
    await svc.acquire()
    svc.release()
    stop = svc.request_stop("test")
    assert stop is not None
    up = await svc.acquire()
    assert up.port == backend.port
    assert svc.state is State.READY
    assert backend.stops == 1 and backend.starts == 2


async def test_plain_url_service_is_always_ready() -> None:
    cfg = parse_config({"services": {"nas": {"url": "http://127.0.0.1:9/x"}}}).resolve("nas")
    svc = Service(cfg, None)
    assert svc.state is State.READY
    up = await svc.acquire()
    assert (up.host, up.port, up.base_path) == ("127.0.0.1", 9, b"/x")
    assert svc.request_stop("idle") is None
    assert svc.status()["backend"] == "url"


async def test_max_concurrency_queues_then_503_when_slots_stay_busy(backend: MemoryBackend) -> None:
    svc = _service(backend, max_concurrency=2, startup_timeout="0.5s")
    await svc.acquire()
    await svc.acquire()
    third = asyncio.create_task(svc.acquire())
    await wait_for(lambda: svc.queued == 1, 2, "a queued request")
    assert svc.in_flight == 2
    svc.release()  # a slot frees up: the queued request gets it
    await asyncio.wait_for(third, 2)
    assert svc.in_flight == 2 and svc.queued == 0
    with pytest.raises(ServiceBusy) as exc:
        await svc.acquire()  # nothing frees up within startup_timeout
    assert exc.value.status == 503 and exc.value.code == "service_busy"
    assert svc.queued == 0
    svc.release()
    svc.release()
    assert svc.in_flight == 0


async def test_stop_during_a_start_does_not_cancel_held_requests(backend: MemoryBackend) -> None:
    backend.start_delay = 0.5
    svc = _service(backend)
    held = asyncio.create_task(svc.acquire())
    await wait_for(lambda: svc.state is State.STARTING, 2, "starting")
    stop = svc.request_stop("api")
    assert stop is not None
    up = await asyncio.wait_for(held, 5)  # waits out the stop, then a new start serves it
    assert up.port == backend.port
    assert svc.state is State.READY
    assert backend.stops == 1 and backend.starts == 2
