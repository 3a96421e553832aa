"""A backend whose instances live in memory, shipped with the package like httpx's
MockTransport: registry, lifecycle and control-API tests run on it in milliseconds, without
Docker, and a demo can run without an engine.

An instance is scriptable: how long it takes to come up, whether it exits instead (with an
exit code and log lines), whether it has a health check of its own and what it reports, how
long a stop takes. A running instance really listens: a tiny HTTP server on 127.0.0.1 answers
every request with 200 and the instance's name, so the proxy and the readiness probes are
exercised for real. Hand-made changes (a start or stop outside Hestia, a rename, a removal, a
crash) are scripted with methods that emit the same events a Docker engine would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hestia.backends.base import (
    BackendEvent,
    EventKind,
    HealthState,
    InstanceInfo,
    InstanceNotFound,
    StopResult,
)
from hestia.config import ServiceConfig
from hestia.errors import BackendError

_ids = itertools.count(1)


@dataclass
class MemoryInstance:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    start_delay: float = 0.05  # seconds from start until it listens
    fail_exit: int | None = None  # exit with this code instead of listening
    # a health check of its own: None (none), "healthy" or "unhealthy" once it listens
    own_health: HealthState | None = None
    stop_delay: float = 0.0  # seconds a graceful stop takes
    ignores_stop: bool = False  # only a kill after the stop timeout ends it
    refuse_start: str | None = None  # the engine refuses to start it, with this message
    # seconds the engine's start call takes; like docker-py's call in its thread, the start
    # lands even when the caller stopped waiting for it
    start_call_delay: float = 0.0
    # a crash leaves its connections open and silent (as when a container's network
    # namespace vanishes with data in flight): only the gateway can cut them
    freeze_on_crash: bool = False
    logs: list[str] = field(default_factory=list)
    lineage: str = ""
    id: str = ""
    created: float = 0.0
    running: bool = False
    exit_code: int | None = None
    health: HealthState = "none"
    port: int = 0
    starts: int = 0
    stops: int = 0
    _server: asyncio.Server | None = None
    _conns: set[asyncio.StreamWriter] = field(default_factory=set)
    _frozen: set[asyncio.StreamWriter] = field(default_factory=set)
    _come_up: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.id = self.id or f"mem{next(_ids):09d}"
        self.created = self.created or time.time()
        if not self.port:  # its address is known from the start, as a container's IP is
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]


class MemoryBackend:
    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.instances: dict[str, MemoryInstance] = {}  # by id
        self._subscribers: list[asyncio.Queue[BackendEvent]] = []
        self.calls: list[tuple[str, str]] = []  # (operation, instance name), in order
        self._tasks: set[asyncio.Task[None]] = set()  # start calls still landing

    # ------------------------------------------------------------ scripting
    def add(self, name: str, **kwargs: object) -> MemoryInstance:
        """A new (stopped) instance; emits `create`. kwargs: MemoryInstance fields."""
        inst = MemoryInstance(name, **kwargs)  # type: ignore[arg-type]
        self.instances[inst.id] = inst
        self._emit("create", inst)
        return inst

    def get(self, ref: str) -> MemoryInstance:
        for inst in self.instances.values():
            if ref in (inst.id, inst.name):
                return inst
        raise InstanceNotFound(f"instance {ref!r} does not exist")

    async def start_by_hand(self, ref: str) -> None:
        await self._start(self.get(ref))

    async def stop_by_hand(self, ref: str, exit_code: int = 0) -> None:
        await self._halt(self.get(ref), exit_code)

    async def crash(self, ref: str, exit_code: int = 137) -> None:
        inst = self.get(ref)
        if inst.freeze_on_crash:
            inst._frozen |= inst._conns
            inst._conns = set()
        await self._halt(inst, exit_code, stop_event=False)

    def rename(self, ref: str, new_name: str) -> None:
        inst = self.get(ref)
        old, inst.name = inst.name, new_name
        self._emit("rename", inst, old_name=old)

    async def remove(self, ref: str) -> None:
        inst = self.get(ref)
        if inst.running:
            await self._halt(inst, 137)
        del self.instances[inst.id]
        self._emit("destroy", inst)

    def set_health(self, ref: str, health: HealthState) -> None:
        inst = self.get(ref)
        inst.health = health
        self._emit("health", inst, health=health)

    def disconnect(self, reason: str = "connection refused") -> None:
        for q in self._subscribers:
            q.put_nowait(BackendEvent("disconnected", "", "", reason=reason))

    def reconnect(self) -> None:
        for q in self._subscribers:
            q.put_nowait(BackendEvent("reconnected", "", ""))

    def count(self, operation: str, name: str | None = None) -> int:
        return sum(1 for op, n in self.calls if op == operation and name in (None, n))

    # ------------------------------------------------------------ the protocol
    async def inspect(self, ref: str, spec: ServiceConfig) -> InstanceInfo:
        return self._info(self.get(ref))

    async def start(self, ref: str, spec: ServiceConfig) -> None:
        inst = self.get(ref)
        self.calls.append(("start", inst.name))
        if inst.refuse_start is not None:
            raise BackendError(f"starting instance {inst.name!r}: {inst.refuse_start}")
        if inst.start_call_delay:
            landing = asyncio.get_running_loop().create_task(self._slow_start(inst))
            self._tasks.add(landing)
            landing.add_done_callback(self._tasks.discard)
            try:
                await asyncio.shield(landing)
            except asyncio.CancelledError:
                await asyncio.wait([landing])  # returns once the start has landed, as Docker's
                raise
            return
        await self._start(inst)

    async def _slow_start(self, inst: MemoryInstance) -> None:
        await asyncio.sleep(inst.start_call_delay)
        await self._start(inst)

    async def stop(self, ref: str, spec: ServiceConfig, timeout: float) -> StopResult:
        inst = self.get(ref)
        self.calls.append(("stop", inst.name))
        if not inst.running:
            return StopResult()
        if inst.ignores_stop:
            await asyncio.sleep(timeout)
            await self._halt(inst, 137)
            return StopResult(killed=True)
        if inst.stop_delay:
            await asyncio.sleep(min(inst.stop_delay, timeout))
        killed = inst.stop_delay > timeout
        await self._halt(inst, 137 if killed else 0)
        return StopResult(killed=killed)

    async def logs_tail(self, ref: str, lines: int = 20) -> str:
        try:
            inst = self.get(ref)
        except InstanceNotFound:
            return ""
        return "\n".join(inst.logs[-lines:])

    async def discover(self) -> list[InstanceInfo]:
        return [self._info(i) for i in self.instances.values() if "hestia.enable" in i.labels]

    def events(self) -> AsyncIterator[BackendEvent]:
        queue: asyncio.Queue[BackendEvent] = asyncio.Queue()
        self._subscribers.append(queue)
        return self._follow(queue)

    async def _follow(self, queue: asyncio.Queue[BackendEvent]) -> AsyncIterator[BackendEvent]:
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for inst in self.instances.values():
            for writer in inst._frozen:
                writer.transport.abort()
            inst._frozen.clear()
            if inst._come_up is not None:
                inst._come_up.cancel()
            await _close_server(inst)

    # ------------------------------------------------------------ internals
    def _info(self, inst: MemoryInstance) -> InstanceInfo:
        return InstanceInfo(
            id=inst.id,
            name=inst.name,
            running=inst.running,
            status="running" if inst.running else ("exited" if inst.starts else "created"),
            health=inst.health,
            health_output=f"health check of {inst.name}: {inst.health}",
            exit_code=inst.exit_code,
            labels=dict(inst.labels),
            address=("127.0.0.1", inst.port),
            lineage=inst.lineage,
            created=inst.created,
        )

    def _emit(self, kind: EventKind, inst: MemoryInstance, **extra: object) -> None:
        ev = BackendEvent(kind, inst.id, inst.name, dict(inst.labels), **extra)  # type: ignore[arg-type]
        for q in self._subscribers:
            q.put_nowait(ev)

    async def _start(self, inst: MemoryInstance) -> None:
        if inst.running:
            return
        inst.starts += 1
        inst.running = True
        inst.exit_code = None
        inst.health = "starting" if inst.own_health else "none"
        self._emit("start", inst)
        inst._come_up = asyncio.get_running_loop().create_task(self._come_up(inst))

    async def _come_up(self, inst: MemoryInstance) -> None:
        await asyncio.sleep(inst.start_delay)
        if not inst.running:
            return
        if inst.fail_exit is not None:
            inst.logs.append(f"{inst.name}: simulated failure, exiting {inst.fail_exit}")
            await self._halt(inst, inst.fail_exit, stop_event=False)
            return
        inst._server = await _listen(inst)
        if inst.own_health is not None:
            self.set_health(inst.id, inst.own_health)

    async def _halt(self, inst: MemoryInstance, exit_code: int, stop_event: bool = True) -> None:
        if not inst.running:
            return
        inst.running = False
        inst.stops += 1
        inst.exit_code = exit_code
        if inst._come_up is not None and not inst._come_up.done():
            inst._come_up.cancel()
        await _close_server(inst)
        self._emit("die", inst, exit_code=exit_code)
        if stop_event:
            self._emit("stop", inst)


async def _listen(inst: MemoryInstance) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = f"{inst.name}\n".encode()
        inst._conns.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    key, _, value = line.partition(b":")
                    if key.strip().lower() == b"content-length":
                        length = int(value.strip() or 0)
                if length:
                    await reader.readexactly(length)
                if head.startswith(b"GET /stream"):
                    await _stream(inst, writer)
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-instance: "
                    + inst.name.encode()
                    + b"\r\ncontent-length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + (b"" if head.startswith(b"HEAD ") else body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            inst._conns.discard(writer)
            writer.close()

    port = inst.port
    try:
        server = await asyncio.start_server(answer, "127.0.0.1", port)
    except OSError:  # the old port is taken now: take another, as a recreated container would
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
    inst.port = server.sockets[0].getsockname()[1]
    return server


async def _stream(inst: MemoryInstance, writer: asyncio.StreamWriter) -> None:
    """`GET /stream`: a chunked line every 20 ms until the instance stops (or freezes)."""
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    line = f"{inst.name}\n".encode()
    while writer in inst._conns:
        writer.write(b"%x\r\n%s\r\n" % (len(line), line))
        await writer.drain()
        await asyncio.sleep(0.02)
    if writer in inst._frozen:
        await asyncio.Event().wait()  # silent, open, for ever


async def _close_server(inst: MemoryInstance) -> None:
    """Stop listening and cut every open connection, as a process that exits does."""
    server, inst._server = inst._server, None
    for writer in list(inst._conns):
        writer.transport.abort()
    inst._conns.clear()
    if server is not None:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)
