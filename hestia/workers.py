"""Several data-plane workers, one controller (`server.workers`).

With `server.workers: 1` (the default) none of this runs: `hestia serve` is one process.

With N > 1, `hestia serve` is the controller: today's gateway (lifecycle, queues, waiting page,
control API, backends, store) listening only on a private loopback port. N worker processes
(`python -m hestia.worker`) each bind the public port with SO_REUSEPORT, so the kernel spreads
connections over them. A worker serves a request on its own only when the controller's table
says the service is *fast*: ready, with an address, no `max_concurrency` line and no wake
filter. Everything else (cold starts, held and queued requests, the waiting page, the control
API, unknown services, anything auth does not plainly admit) is handed to the controller as it
is, over HTTP on the private port, with a per-run token and the client's address in two
headers only the controller reads.
Handing off is always correct, so a worker that has no table yet hands everything off.

The control channel is a Unix socket with one JSON line per message:

* controller -> worker: the table `{"gen": g, "services": {...}, "hosts": ..., "keep": ...,
  "auth": key set or null, "suspects": [addresses with failed keys], "handoff_all": bool}`,
  sent whenever it changes (looked at every `POLL_S`) and at once by `barrier()`.
* worker -> controller: a report `{"ack": g, "busy": {svc: n}, "touched": [...],
  "counts": {svc: [1xx..5xx, errors, upstream_errors, bytes_in, bytes_out]}}` at once after
  each table and every `REPORT_S` while something changed. `busy` is the worker's requests in
  flight per service at that moment, so once every worker has acknowledged a table in which a
  service is not fast, the controller knows every request a worker still has for it, and every
  later request comes to the controller.

A stop (idle, API, reload, shutdown) first publishes the service as not fast and waits for
every worker's acknowledgement (`Service.workers_barrier`); an idle stop then looks again at
the requests in flight in the workers and at their last activity, and does not stop a service a
worker is busy with. A worker that dies is started again and its in-flight counts are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from hestia.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from hestia.app import Gateway
    from hestia.lifecycle import Service

WORKERS_CAP = 8  # `auto`: one worker per CPU, at most this many
AUTO_MIN_CPUS = 3  # `auto` on fewer usable CPUs: one process (see worker_count)
POLL_S = 0.05  # how often the controller compares the table with the last one sent
REPORT_S = 0.1  # how often a worker reports, when something changed
BARRIER_TIMEOUT_S = 2.0  # a worker that does not acknowledge a table within this is killed
SYNC_TIMEOUT_S = 0.5  # how long reading the metrics waits for the workers' fresh counters
RESPAWN_DELAY_S = 0.2
# auth on: more addresses than this with failed keys on record, and every request goes to the
# controller until they have aged out (the table stays small under an attack from many)
MAX_SUSPECTS = 256
RESPAWN_MAX_S = 10.0
PIPE_BUF = 4096  # writes up to this size to a pipe are never interleaved with other writers

HANDOFF_TOKEN = b"x-hestia-handoff"
HANDOFF_CLIENT = b"x-hestia-client"
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        HANDOFF_TOKEN,
        HANDOFF_CLIENT,
    }
)


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on (its affinity), and no more than its cgroup's CPU
    quota allows (a container's `cpus:`/`--cpus`, rounded up; cgroup v2 or v1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = period = None
    try:
        fields = (cgroup / "cpu.max").read_text().split()
        if fields[0] != "max":
            quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        try:
            q = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            if q > 0:
                quota = q
                period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota is not None and period:
        cpus = min(cpus, max(1, -(-quota // period)))
    return max(1, cpus)


def worker_count(setting: int | str, cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """`server.workers`: a number, or `auto`: one worker per usable CPU (`usable_cpus`), at
    most WORKERS_CAP, and one process (no workers) below AUTO_MIN_CPUS. Measured on 2 cores
    (bench/NOTES.md): two workers gave 1.06-1.35x the req/s of one process for 10-20 % more
    CPU per request, and about 60 MB of memory each (the idle footprint past 100 MB), with no
    free core to grow into once the upstreams and the clients run on the same machine."""
    if setting == "auto":
        cpus = usable_cpus(cgroup)
        return 1 if cpus < AUTO_MIN_CPUS else min(cpus, WORKERS_CAP)
    return max(1, int(setting))


def reuseport_socket(host: str, port: int, listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    if listen:
        sock.listen(2048)
    sock.set_inheritable(False)
    return sock


# ---------------------------------------------------------------------------- the table
def _entry(svc: Service) -> dict[str, Any] | None:
    """What a worker needs to proxy to `svc` itself; None when it must hand requests off."""
    from hestia.lifecycle import State

    up = svc.upstream
    if (
        up is None
        or svc.state is not State.READY
        or svc.workers_holding
        or svc.wake is not None
        or svc.config.max_concurrency is not None
    ):
        return None
    t = svc.timeouts
    return {
        "host": up.host,
        "port": up.port,
        "base": up.base_path.decode("latin-1"),
        "hh": up.host_header.decode("latin-1"),
        "preserve_host": svc.config.preserve_host,
        "strategy": svc.config.strategy,
        "timeouts": [t.connect, t.response_headers, t.idle_body],
    }


# ---------------------------------------------------------------------------- controller
class _Link:
    """One worker's control connection, and what its last report said."""

    def __init__(self, index: int, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.writer = writer
        self.ack = -1
        self.busy: dict[str, int] = {}
        # (generation, future): done once this worker has acknowledged that generation (or
        # is gone). Per generation, so that later tables (a metrics read sends one) never
        # keep an earlier wait from ending.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def send(self, message: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(message)

    def acknowledged(self, generation: int) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.ack >= generation:
            fut.set_result(None)
        else:
            self._waiters.append((generation, fut))
        return fut

    def took(self, ack: int) -> None:
        """The worker acknowledged table `ack`."""
        self.ack = max(self.ack, ack)
        waiting = []
        for generation, fut in self._waiters:
            if fut.done():
                continue
            if generation <= self.ack:
                fut.set_result(None)
            else:
                waiting.append((generation, fut))
        self._waiters = waiting

    def gone(self) -> None:
        """The worker's connection ended: nothing is left to wait for."""
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters = []


class Controller:
    """The controller's side: starts and restarts the workers, sends the table, takes their
    reports into the gateway's services and metrics, and lets the private port be the only
    one where a request may say which client it came from."""

    def __init__(
        self,
        gateway: Gateway,
        count: int,
        host: str,
        port: int,
        config_path: str | None,
        log_format: str,
        log_level: str,
    ) -> None:
        self.gateway = gateway
        self.count = count
        self.host = host
        self.port = port
        self.token = secrets.token_hex(16).encode()
        # bound, never listening: the port is ours (a program holding it without SO_REUSEPORT
        # fails start-up here, not in a loop of workers that cannot bind)
        self.port_holder = reuseport_socket(host, port, listen=False)
        self.handoff_socket = socket.create_server(("127.0.0.1", 0), backlog=2048)
        self.handoff_port: int = self.handoff_socket.getsockname()[1]
        self._dir = tempfile.mkdtemp(prefix="hestia-ctl-")
        self.control_path = str(Path(self._dir) / "control.sock")
        self._worker_args = {
            "config": config_path,
            "log_format": log_format,
            "log_level": log_level,
        }
        self.generation = 0
        self._sent: dict[str, Any] | None = None
        self._links: dict[int, _Link] = {}
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.AbstractServer | None = None
        self._stopping = False
        self.restarts = 0
        self._delays: dict[int, float] = {}  # worker index -> wait before its next restart
        self._holding_all = False  # a config version is being applied: workers hand off all
        gateway.reloader.hold = self.hold_all
        gateway.metrics.sync = self.fresh_reports
        gateway.metrics.workers = self.info

    # -------------------------------------------------------------- the ASGI entry
    def wrap(self, app: ASGIApp) -> ASGIApp:
        token = self.token

        async def entry(scope: Scope, receive: Receive, send: Send) -> None:
            kind = scope["type"]
            if kind == "lifespan":
                await app(scope, self._lifespan_receive(receive), self._lifespan_send(send))
                return
            headers: list[tuple[bytes, bytes]] = scope["headers"]
            given = client = None
            for key, value in headers:
                if key == HANDOFF_TOKEN:
                    given = value
                elif key == HANDOFF_CLIENT:
                    client = value
            if given is not None or client is not None:
                scope = dict(scope)
                scope["headers"] = [
                    (k, v) for k, v in headers if k not in (HANDOFF_TOKEN, HANDOFF_CLIENT)
                ]
                if given is not None and secrets.compare_digest(given, token) and client:
                    ip, _, port = client.decode("latin-1").rpartition(" ")
                    scope["client"] = (ip, int(port) if port.isdigit() else 0)
            await app(scope, receive, send)

        return entry

    def _lifespan_send(self, send: Send) -> Send:
        async def wrapped(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "lifespan.startup.complete":
                await self.start()
            await send(message)

        return wrapped

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> MutableMapping[str, Any]:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.stop()
            return message

        return wrapped

    # -------------------------------------------------------------- workers
    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=self.control_path)
        os.chmod(self.control_path, 0o600)
        self._publish(force=True)
        for index in range(self.count):
            await self._spawn(index)
        self._tasks.append(asyncio.create_task(self._poll(), name="hestia-workers-table"))
        logger.info(
            "{} data-plane workers on {}:{} (SO_REUSEPORT), the controller on 127.0.0.1:{}",
            self.count,
            self.host,
            self.port,
            self.handoff_port,
        )

    async def _spawn(self, index: int) -> None:
        args = [
            sys.executable,
            "-m",
            "hestia.worker",
            "--index",
            str(index),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--control",
            self.control_path,
            "--handoff-port",
            str(self.handoff_port),
            "--log-format",
            self._worker_args["log_format"] or "json",
            "--log-level",
            self._worker_args["log_level"] or "INFO",
        ]
        if self._worker_args["config"]:
            args += ["--config", str(self._worker_args["config"])]
        env = {**os.environ, "HESTIA_HANDOFF_TOKEN": self.token.decode()}
        proc = await asyncio.create_subprocess_exec(*args, env=env)
        self._procs[index] = proc
        self._tasks.append(asyncio.create_task(self._watch(index, proc), name=f"worker-{index}"))

    async def _watch(self, index: int, proc: asyncio.subprocess.Process) -> None:
        born = time.monotonic()
        code = await proc.wait()
        if self._stopping or self._procs.get(index) is not proc:
            return
        # one that dies young is started again later each time (0.2 s doubling to 10 s)
        delay = RESPAWN_DELAY_S
        if time.monotonic() - born < RESPAWN_MAX_S:
            delay = min(self._delays.get(index, RESPAWN_DELAY_S / 2) * 2, RESPAWN_MAX_S)
        self._delays[index] = delay
        logger.warning(
            "data-plane worker {} (pid {}) exited with {}: its requests in flight are "
            "released and it is started again in {:g}s",
            index,
            proc.pid,
            code,
            delay,
        )
        self._drop(index)
        self.restarts += 1
        await asyncio.sleep(delay)
        if not self._stopping:
            await self._spawn(index)

    def _drop(self, index: int) -> None:
        link = self._links.pop(index, None)
        if link is not None:
            link.gone()
            link.writer.close()
            self._apply_busy()

    def info(self) -> dict[str, int]:
        """For the metrics: workers configured, connected to this controller now, and
        started again after one died (a number that keeps growing means a crash loop)."""
        return {"configured": self.count, "running": len(self._links), "restarts": self.restarts}

    @property
    def worker_pids(self) -> dict[int, int]:
        return {i: p.pid for i, p in self._procs.items() if p.returncode is None}

    def begin_shutdown(self) -> None:
        """SIGTERM: held requests are answered 503 (the gateway's own begin_shutdown), the
        workers stop accepting and finish what they carry (their hand-offs still reach this
        process, which drains at the same time); none is started again."""
        self.gateway.begin_shutdown()
        self._signal_workers()

    def _signal_workers(self) -> None:
        self._stopping = True
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    async def stop(self) -> None:
        self._signal_workers()
        for task in self._tasks:
            task.cancel()
        grace = self.gateway.config.server.shutdown_grace + 5
        for proc in self._procs.values():
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.port_holder.close()
        if self._server is not None:
            self._server.close()
        for link in self._links.values():
            link.writer.close()
        with contextlib.suppress(OSError):
            os.unlink(self.control_path)
            os.rmdir(self._dir)

    # -------------------------------------------------------------- the control channel
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link: _Link | None = None
        try:
            hello = json.loads(await reader.readline())
            index = int(hello["index"])
            link = _Link(index, writer)
            old = self._links.get(index)
            if old is not None:
                old.gone()
                old.writer.close()
            self._links[index] = link
            self._send_table(link)
            while line := await reader.readline():
                self._report(link, json.loads(line))
        except (ConnectionError, ValueError, KeyError, asyncio.IncompleteReadError):
            pass
        finally:
            if link is not None:
                link.gone()
                if self._links.get(link.index) is link:
                    del self._links[link.index]
                    self._apply_busy()
            writer.close()

    def _report(self, link: _Link, report: dict[str, Any]) -> None:
        services = self.gateway.registry.services
        now = time.monotonic()
        for name in report.get("touched", ()):
            svc = services.get(name)
            if svc is not None:
                svc.last_activity = max(svc.last_activity, now)
                svc.last_activity_wall = time.time()
        for name, c in report.get("counts", {}).items():
            m = self.gateway.metrics.service(name)
            for i in range(5):
                m.requests[i] += c[i]
            m.errors += c[5]
            m.upstream_errors += c[6]
            m.bytes_in += c[7]
            m.bytes_out += c[8]
        link.busy = {k: int(v) for k, v in report.get("busy", {}).items()}
        self._apply_busy()
        link.took(int(report.get("ack", -1)))

    def _apply_busy(self) -> None:
        totals: dict[str, int] = {}
        for link in self._links.values():
            for name, n in link.busy.items():
                totals[name] = totals.get(name, 0) + n
        for name, svc in self.gateway.registry.services.items():
            svc.workers_in_flight = totals.get(name, 0)

    def table(self) -> dict[str, Any]:
        # auth on: the workers admit service requests with a valid key themselves (the key
        # set travels in the table) and hand the rest, and every request from an address with
        # failures on record, to the controller; too many such addresses (an attack from many
        # addresses): every request goes to the controller while it lasts
        auth = self.gateway.auth
        auth_state = auth.worker_state()
        suspects = auth.limiter.suspects() if auth_state is not None else []
        overflow = len(suspects) > MAX_SUSPECTS
        hold_all = self._holding_all or overflow
        services = {}
        for name, svc in list(self.gateway.registry.services.items()):
            if svc.workers_barrier is None:
                svc.workers_barrier = self.barrier
            entry = None if hold_all else _entry(svc)
            if entry is not None:
                services[name] = entry
        router = self.gateway.router
        return {
            "services": services,
            "hosts": router.hosts,
            "keep": sorted(router.keep_prefix),
            "auth": auth_state,
            "suspects": [] if overflow else suspects,
            "handoff_all": overflow,
        }

    def _publish(self, force: bool = False) -> None:
        table = self.table()
        if not force and table == self._sent:
            return
        self._sent = table
        self.generation += 1
        for link in self._links.values():
            self._send_table(link)

    def _send_table(self, link: _Link) -> None:
        message = {"gen": self.generation, **(self._sent or {})}
        link.send(json.dumps(message).encode() + b"\n")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            self._publish()

    @contextlib.asynccontextmanager
    async def hold_all(self) -> AsyncIterator[None]:
        """While a config version is applied: every worker hands every request to the
        controller, acknowledged before the change starts, so none routes by the old version
        (a removed service, an old URL, no max_concurrency line) once the controller has the
        new one. Reloads are rare; the hold lasts a table round trip."""
        self._holding_all = True
        try:
            await self.barrier()
            yield
        finally:
            self._holding_all = False
            self._publish()

    async def fresh_reports(self) -> None:
        """Before the metrics or a status are read: every worker's counters as of now (a
        table round trip, bounded by SYNC_TIMEOUT_S; a slow worker's numbers are then up to
        REPORT_S old, and it is not killed for it)."""
        if not self._links:
            return
        self._publish(force=True)
        generation = self.generation
        waiting = [link.acknowledged(generation) for link in self._links.values()]
        await asyncio.wait(waiting, timeout=SYNC_TIMEOUT_S)

    async def barrier(self) -> None:
        """Send the table as it is now and wait until every worker has it (and has said what
        it still has in flight). A worker that does not answer in time is killed (and
        started again), so its in-flight requests cannot be counted on."""
        self._publish(force=True)
        generation = self.generation
        waiting = [link for link in self._links.values() if link.ack < generation]
        if not waiting:
            return
        await asyncio.wait(
            [link.acknowledged(generation) for link in waiting], timeout=BARRIER_TIMEOUT_S
        )
        for link in waiting:
            if link.ack < generation and self._links.get(link.index) is link:
                proc = self._procs.get(link.index)
                logger.error(
                    "data-plane worker {} did not acknowledge table {} within {:g}s: killing it",
                    link.index,
                    generation,
                    BARRIER_TIMEOUT_S,
                )
                if proc is not None and proc.returncode is None:
                    proc.kill()
                self._drop(link.index)
