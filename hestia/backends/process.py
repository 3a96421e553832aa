"""The process backend: host processes Hestia runs itself (`backend: process`), llama-swap's
model inside Hestia: `llama-server --port ${PORT}` started on the first request, stopped when
idle, swapped within an `exclusive_group`.

One instance per service, known by the service's name (`config.INSTANCE_IS_SERVICE`):

- Start: the service's `command` (an argv list, never a shell; `${PORT}`, `${NAME}` from its
  `env` and from Hestia's environment expanded) runs in a session and process group of its
  own (`start_new_session`), in `cwd`, with `env` added to Hestia's environment and PORT set.
  PORT is the port of the service's `url`, or a free one on its host when the url says
  `${PORT}`. The backend reports the URL of each run (`InstanceInfo.url`); readiness is the
  lifecycle's, as for any service.
- Output: stdout and stderr go to a file the process holds itself, never to a pipe to Hestia,
  so a process outlives Hestia cleanly (`process.keep_on_exit`, a crash of Hestia, an
  upgrade): a pipe whose reader is gone kills the writer with SIGPIPE, or fails its every log
  line with EPIPE. The file is `log_file`, appended to, or one Hestia keeps per service under
  `process.state_dir` (truncated at each start, rotated past `process.log_max_size`).
  `logs_tail()` reads at most the last 64 KiB of the current run's output: the bounded tail
  that feeds `last_error` and the 503 body, as Docker's logs do for a container.
- Exit: noticed at once through a pidfd (`pidfd_open`, readable when the process ends; a
  0.25 s poll where the kernel has none) and reported as a `die` event with the exit code
  (128+N for a signal, as a shell says), the last output lines, and `crashed` for a non-zero
  exit Hestia did not ask for. Whatever the leader left in its group is stopped.
- Stop: `stop_signal` (default SIGTERM) to the whole group, SIGKILL to the group after
  `stop_timeout`; a stop returns once no process of the group is left (zombies aside).
- Adoption: each run is recorded in `<state_dir>/<service>.json` (written atomically at
  start, removed at exit) with its PID, process group, start time (field 22 of
  /proc/<pid>/stat, clock ticks since boot) and the boot id. A restarted Hestia adopts a
  process only if that PID still runs with that start time in that boot: a recycled PID
  never matches. A pidfd is opened before the check, so the process checked is the one
  watched. A JSON file per service, not a table in the state database: the record must be on
  disk before the start returns (the store writes in batches, in the background, and may be
  unavailable for a while) and is read and written by this module alone.
- Shutdown (`close()`): stops every process unless `process.keep_on_exit` (then the records
  stay for the next Hestia).

A child that leaves its process group (setsid, a daemon's double fork) is out of reach: run
such programs in the foreground (most servers have a flag for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loguru import logger

from hestia.backends.base import BackendEvent, InstanceInfo, StopResult
from hestia.config import DEFAULT_PROCESS_URL, ProcessConfig, ServiceConfig, substitute_vars
from hestia.errors import BackendError

RECORD_VERSION = 1
TAIL_BYTES = 64 * 1024  # logs_tail() reads at most this much of the output file
KILL_WAIT_S = 5.0  # after SIGKILL, how long the group may take to vanish
GROUP_POLL_S = 0.05  # how often a stop looks for what is left of the group
EXIT_POLL_S = 0.25  # without pidfds: how often a run is looked at
ROTATE_EVERY_S = 30.0  # how often Hestia's own output files are checked for size
MESSAGE_LINES = 5  # output lines in an error message (logs_tail gives the lines asked)
_PIDFD = hasattr(os, "pidfd_open")  # Linux >= 5.3; tests turn it off to check the poll


class ProcessStartFailed(BackendError):
    """The command could not be run (not found, not executable, no cwd, port taken)."""

    status = 503
    code = "start_failed"


class ProcessStopFailed(BackendError):
    """Processes of the group survived SIGKILL (stuck in the kernel)."""

    code = "stop_failed"


@dataclass
class _Run:
    """One process Hestia started (or adopted) for a service."""

    service: str
    pid: int
    start_ticks: int
    url: str
    host: str
    port: int
    log_path: Path
    own_log: bool  # Hestia's output file (rotated by Hestia), not the user's log_file
    log_offset: int  # where this run's output begins in the file
    started_at: float  # wall clock
    spec: ServiceConfig
    proc: subprocess.Popen[bytes] | None = None  # None: adopted from a previous Hestia
    exit_code: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False  # Hestia asked it to end: its exit is no failure
    pidfd: int | None = None
    poller: asyncio.Task[None] | None = None

    @property
    def pgid(self) -> int:
        return self.pid  # a session leader's group is its own pid

    @property
    def running(self) -> bool:
        return not self.exited.is_set()


class ProcessBackend:
    name = "process"

    def __init__(self, config: ProcessConfig, state_dir: str | os.PathLike[str]) -> None:
        self.config = config
        self.dir = Path(state_dir)
        self._runs: dict[str, _Run] = {}  # by service: the current or last run
        self._subscribers: list[asyncio.Queue[BackendEvent | None]] = []
        self._cleanups: set[asyncio.Task[Any]] = set()
        self._rotator: asyncio.Task[None] | None = None
        self._closed = False
        self._boot_id = _boot_id()
        self.spawns: dict[str, int] = {}  # processes started per service (status, tests)

    # ---------------------------------------------------------------- protocol
    async def inspect(self, ref: str, spec: ServiceConfig) -> InstanceInfo:
        run = self._current(ref, spec)
        if run is None:
            return InstanceInfo(id=ref, name=ref, running=False, status="stopped")
        if spec.name == ref:  # (the registry inspects with a placeholder spec at times)
            run.spec = spec
        return InstanceInfo(
            id=ref,
            name=ref,
            running=run.running,
            status="running" if run.running else "exited",
            exit_code=run.exit_code,
            address=(run.host, run.port),
            url=run.url,
            created=run.started_at,
            started_at=datetime.fromtimestamp(run.started_at, UTC).isoformat(),
        )

    async def start(self, ref: str, spec: ServiceConfig) -> None:
        if self._closed:
            raise BackendError(f"service {ref!r}: Hestia is shutting down", service=ref)
        run = self._current(ref, spec)
        if run is not None and run.running:
            return
        if run is not None and _members(run.pgid):
            # what the last run left in its group is still being stopped: not two at once
            await self._stop_run(run, spec.stop_timeout)
        self._runs[ref] = self._spawn(ref, spec)

    async def stop(self, ref: str, spec: ServiceConfig, timeout: float) -> StopResult:
        run = self._current(ref, spec)
        if run is None:
            return StopResult()
        if spec.name == ref:
            run.spec = spec
        return await self._stop_run(run, timeout)

    async def logs_tail(self, ref: str, lines: int = 20) -> str:
        run = self._runs.get(ref)
        if run is None:
            return ""
        return await asyncio.to_thread(_tail, run, lines)

    async def discover(self) -> list[InstanceInfo]:
        return []  # process services are declared in the config file only

    def events(self) -> AsyncIterator[BackendEvent]:
        queue: asyncio.Queue[BackendEvent | None] = asyncio.Queue()
        self._subscribers.append(queue)
        return self._follow(queue)

    async def _follow(
        self, queue: asyncio.Queue[BackendEvent | None]
    ) -> AsyncIterator[BackendEvent]:
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._subscribers.remove(queue)

    async def close(self) -> None:
        self._closed = True
        if self._rotator is not None:
            self._rotator.cancel()
        live = [run for run in self._runs.values() if run.running]
        if self.config.keep_on_exit:
            for run in live:
                self._unwatch(run)
                if run.proc is not None and run.proc.returncode is None:
                    # let go of it: a Popen with a returncode neither warns about a running
                    # child when collected nor reaps it (the process is the next Hestia's)
                    run.proc.returncode = 0
            if live:
                logger.info(
                    "leaving {} process service(s) running (process.keep_on_exit): {}; the "
                    "next Hestia adopts them",
                    len(live),
                    ", ".join(f"{r.service} (pid {r.pid})" for r in live),
                )
        else:
            # a process nobody else would stop: each gets its stop_signal and stop_timeout
            results = await asyncio.gather(
                *(self._stop_run(run, run.spec.stop_timeout) for run in live),
                return_exceptions=True,
            )
            for run, result in zip(live, results, strict=True):
                if isinstance(result, BaseException):
                    logger.error("service {}: stopping its process failed: {}", run.service, result)
        if self._cleanups:
            await asyncio.wait(list(self._cleanups), timeout=KILL_WAIT_S)
        for queue in self._subscribers:
            queue.put_nowait(None)

    # ---------------------------------------------------------------- start
    def _spawn(self, ref: str, spec: ServiceConfig) -> _Run:
        """Run the service's command now (fork and exec take milliseconds, and a start that
        is cancelled halfway must not leave a process nobody knows)."""
        assert spec.command is not None  # ServiceConfig requires it for backend process
        template = spec.process_url or DEFAULT_PROCESS_URL
        host = urlsplit(template.replace("${PORT}", "1")).hostname or "127.0.0.1"
        if "${PORT}" in template:
            port = _free_port(host)
        else:
            port = urlsplit(template).port or 80
            _check_port_free(ref, host, port, template)
        url = template.replace("${PORT}", str(port))
        variables = {**os.environ, "PORT": str(port)}
        try:
            env = {k: substitute_vars(v, variables) for k, v in (spec.env or {}).items()}
            variables.update(env)
            argv = [substitute_vars(arg, variables) for arg in spec.command]
            cwd = substitute_vars(spec.cwd, variables) if spec.cwd else None
            log_file = substitute_vars(spec.log_file, variables) if spec.log_file else None
        except ValueError as exc:  # Hestia's environment changed since the config was read
            raise ProcessStartFailed(f"service {ref!r}: {exc}", service=ref) from None
        if cwd is not None and not Path(cwd).is_dir():
            raise ProcessStartFailed(
                f"service {ref!r}: its cwd {cwd} is not a directory; create it or fix "
                f"services.{ref}.cwd",
                service=ref,
            )
        own_log = log_file is None
        log_path = Path(log_file) if log_file is not None else self.dir / f"{ref}.log"
        out_fd = self._open_output(ref, log_path, truncate=own_log)
        try:
            offset = os.fstat(out_fd).st_size
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env={**os.environ, "PORT": str(port), **env},
                stdin=subprocess.DEVNULL,
                stdout=out_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session and process group
                close_fds=True,
            )
        except OSError as exc:
            raise ProcessStartFailed(
                f"service {ref!r}: cannot run {argv[0]!r}: {_why(exc, argv[0], cwd)}",
                service=ref,
                detail={"command": argv},
            ) from None
        finally:
            os.close(out_fd)
        stat = _stat(proc.pid)  # not reaped yet, so it is there even if it already exited
        run = _Run(
            service=ref,
            pid=proc.pid,
            start_ticks=stat.start_ticks if stat is not None else 0,
            url=url,
            host=host,
            port=port,
            log_path=log_path,
            own_log=own_log,
            log_offset=0 if own_log else offset,
            started_at=time.time(),
            spec=spec,
            proc=proc,
        )
        self.spawns[ref] = self.spawns.get(ref, 0) + 1
        self._write_record(run)
        logger.info(
            "service {}: started process {} (port {}): {}; output in {}",
            ref,
            proc.pid,
            port,
            " ".join(argv),
            log_path,
        )
        self._watch(run)
        return run

    def _open_output(self, ref: str, path: Path, *, truncate: bool) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        if truncate:
            flags |= os.O_TRUNC
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND: every write lands at the end, also after a rotation truncated the file
            return os.open(path, flags, 0o640)
        except OSError as exc:
            key = f"services.{ref}.log_file" if not truncate else "process.state_dir"
            raise ProcessStartFailed(
                f"service {ref!r}: cannot open its output file {path}: "
                f"{exc.strerror or exc}; fix {key} or its permissions",
                service=ref,
            ) from None

    # ---------------------------------------------------------------- exit
    def _watch(self, run: _Run) -> None:
        """Notice the run's end as it happens: its pidfd turns readable."""
        loop = asyncio.get_running_loop()
        if self._rotator is None and not self._closed:
            self._rotator = loop.create_task(self._rotate_loop(), name="hestia-process-logs")
        if run.pidfd is None and _PIDFD:
            with contextlib.suppress(OSError):
                run.pidfd = os.pidfd_open(run.pid)
        if run.pidfd is not None:
            try:
                loop.add_reader(run.pidfd, self._on_pidfd, run)
                return
            except (OSError, NotImplementedError, ValueError):
                os.close(run.pidfd)
                run.pidfd = None
        run.poller = loop.create_task(self._poll(run), name=f"hestia-process-{run.service}")

    def _unwatch(self, run: _Run) -> None:
        if run.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(run.pidfd)
            os.close(run.pidfd)
            run.pidfd = None
        if run.poller is not None:
            run.poller.cancel()
            run.poller = None

    def _on_pidfd(self, run: _Run) -> None:
        self._unwatch(run)
        self._ended(run, _exit_code(run.proc.poll()) if run.proc is not None else None)

    async def _poll(self, run: _Run) -> None:
        while True:
            await asyncio.sleep(EXIT_POLL_S)
            if run.proc is not None:
                code = run.proc.poll()
                if code is not None:
                    break
            elif not _same_process(run.pid, run.start_ticks):
                code = None
                break
        run.poller = None
        self._ended(run, _exit_code(code) if run.proc is not None else None)

    def _ended(self, run: _Run, code: int | None) -> None:
        if run.exited.is_set():
            return
        run.exit_code = code
        run.exited.set()
        if self._runs.get(run.service) is run:
            self._drop_record(run.service)
        lines = _tail(run, MESSAGE_LINES).splitlines()
        shown = f"last output: {' | '.join(lines) or '(none)'}"
        crashed = not run.stopping and code not in (0, None)
        if not run.stopping:
            logger.log(
                "WARNING" if crashed else "INFO",
                "service {}: process {} exited on its own with code {}; {}",
                run.service,
                run.pid,
                "unknown (adopted)" if code is None else code,
                shown,
            )
            if _members(run.pgid):
                # what the leader left in its group (a model server's workers) must not
                # outlive it: nothing else would stop them
                self._background(self._stop_run(run, run.spec.stop_timeout))
        event = BackendEvent(
            "die", run.service, run.service, exit_code=code, reason=shown, crashed=crashed
        )
        for queue in self._subscribers:
            queue.put_nowait(event)

    # ---------------------------------------------------------------- stop
    async def _stop_run(self, run: _Run, timeout: float) -> StopResult:
        if not run.running and not _members(run.pgid):
            return StopResult()
        run.stopping = True
        sig = signal.Signals[run.spec.stop_signal or "SIGTERM"]
        _signal_group(run.pgid, sig)
        if await self._gone(run, timeout):
            logger.info("service {}: process {} stopped ({})", run.service, run.pid, sig.name)
            return StopResult()
        logger.warning(
            "service {}: process group {} still there {:g}s after {} (stop_timeout): SIGKILL",
            run.service,
            run.pgid,
            timeout,
            sig.name,
        )
        _signal_group(run.pgid, signal.SIGKILL)
        if await self._gone(run, KILL_WAIT_S):
            return StopResult(killed=True)
        left = _members(run.pgid)
        raise ProcessStopFailed(
            f"service {run.service!r}: processes {', '.join(map(str, left))} of its process "
            f"group {run.pgid} are still there {KILL_WAIT_S:g}s after SIGKILL (stuck in the "
            f"kernel?); look at them with `ps -o pid,stat,wchan,cmd -g {run.pgid}`",
            service=run.service,
            detail={"pids": left},
        )

    async def _gone(self, run: _Run, timeout: float) -> bool:
        """Wait until no process of the run's group is left (zombies aside)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if run.running:
            if run.pidfd is None and run.poller is None:  # closed with keep_on_exit
                self._watch(run)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await run.exited.wait()
            if run.running:
                return False
        while _members(run.pgid):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(GROUP_POLL_S)
        return True

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        task.add_done_callback(_log_failure)

    # ---------------------------------------------------------------- records
    def _record_path(self, ref: str) -> Path:
        return self.dir / f"{ref}.json"

    def _write_record(self, run: _Run) -> None:
        record = {
            "version": RECORD_VERSION,
            "service": run.service,
            "pid": run.pid,
            "start_ticks": run.start_ticks,
            "boot_id": self._boot_id,
            "url": run.url,
            "host": run.host,
            "port": run.port,
            "log_path": str(run.log_path),
            "own_log": run.own_log,
            "log_offset": run.log_offset,
            "started_at": run.started_at,
        }
        path = self._record_path(run.service)
        tmp = path.with_suffix(".json.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with tmp.open("w", encoding="utf-8") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning(
                "service {}: cannot record process {} in {} ({}): a restarted Hestia will not "
                "adopt it",
                run.service,
                run.pid,
                path,
                exc.strerror or exc,
            )

    def _drop_record(self, ref: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._record_path(ref).unlink()

    def _current(self, ref: str, spec: ServiceConfig) -> _Run | None:
        """The service's run: the one in memory, or one a previous Hestia recorded."""
        run = self._runs.get(ref)
        if run is None and not self._closed:
            run = self._adopt(ref, spec)
            if run is not None:
                self._runs[ref] = run
        return run

    def _adopt(self, ref: str, spec: ServiceConfig) -> _Run | None:
        path = self._record_path(ref)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            pid, ticks = int(record["pid"]), int(record["start_ticks"])
            boot, url, host = str(record["boot_id"]), str(record["url"]), str(record["host"])
            port, started = int(record["port"]), float(record["started_at"])
            log_path, own = Path(record["log_path"]), bool(record["own_log"])
            offset = int(record.get("log_offset", 0))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("service {}: ignoring the unreadable record {}: {}", ref, path, exc)
            self._drop_record(ref)
            return None
        pidfd = None
        if _PIDFD:  # pin the process before checking it: the checked one is the watched one
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)
        if boot != self._boot_id or not _same_process(pid, ticks):
            if pidfd is not None:
                os.close(pidfd)
            logger.info(
                "service {}: its recorded process {} is gone (the PID is free or another "
                "process's now); not adopted",
                ref,
                pid,
            )
            self._drop_record(ref)
            return None
        run = _Run(
            service=ref,
            pid=pid,
            start_ticks=ticks,
            url=url,
            host=host,
            port=port,
            log_path=log_path,
            own_log=own,
            log_offset=offset,
            started_at=started,
            spec=spec,
            pidfd=pidfd,
        )
        logger.info("service {}: adopted its running process {} ({})", ref, pid, url)
        self._watch(run)
        return run

    # ---------------------------------------------------------------- output files
    async def _rotate_loop(self) -> None:
        while True:
            await asyncio.sleep(ROTATE_EVERY_S)
            for run in list(self._runs.values()):
                if run.running and run.own_log:
                    await asyncio.to_thread(_rotate, run.log_path, self.config.log_max_size)


# -------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class _Stat:
    state: str
    pgrp: int
    start_ticks: int


def _stat(pid: int) -> _Stat | None:
    """/proc/<pid>/stat's state, process group and start time, or None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold anything, ')' included
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return _Stat(fields[0].decode(), int(fields[2]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def _same_process(pid: int, start_ticks: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat.state != "Z" and stat.start_ticks == start_ticks


def _members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the group."""
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat.pgrp == pgid and stat.state != "Z":
                found.append(int(entry))
    return found


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _exit_code(returncode: int | None) -> int | None:
    """Popen's -N for a signal -> 128+N, as a shell (and Docker) says."""
    if returncode is None:
        return None
    return 128 - returncode if returncode < 0 else returncode


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, 0))
            return int(s.getsockname()[1])
        except OSError:  # not an address of this machine: any free port will do
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_port_free(ref: str, host: str, port: int, url: str) -> None:
    """A fixed port that something already listens on would make the readiness probe
    succeed against the wrong process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:  # not a local address: no verdict
                return
            raise ProcessStartFailed(
                f"service {ref!r}: something already listens on {host}:{port} (the port of "
                f"its url {url}); stop it, or use ${{PORT}} in url for a free port",
                service=ref,
            ) from None


def _why(exc: OSError, program: str, cwd: str | None) -> str:
    if isinstance(exc, FileNotFoundError) and "/" not in program:
        return (
            f"no such program on PATH ({os.environ.get('PATH', '')}); install it or give its "
            "full path"
        )
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename or program} does not exist"
    if isinstance(exc, PermissionError):
        return f"permission denied ({exc.filename or program}): is it executable?"
    return exc.strerror or str(exc)


def _tail(run: _Run, lines: int) -> str:
    """The last `lines` lines of the run's output (at most TAIL_BYTES of it)."""
    chunks: list[list[str]] = []
    paths = [run.log_path]
    if run.own_log:
        paths.append(run.log_path.with_name(run.log_path.name + ".1"))  # before a rotation
    for i, path in enumerate(paths):
        try:
            with path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = run.log_offset if i == 0 and size >= run.log_offset else 0
                begin = max(start, size - TAIL_BYTES)
                f.seek(begin)
                data = f.read(TAIL_BYTES)
        except OSError:
            break
        text = data.decode("utf-8", errors="replace").splitlines()
        if begin > start and text:
            text = text[1:]  # cut mid-line
        chunks.insert(0, text)
        if sum(len(c) for c in chunks) >= lines or size - start >= TAIL_BYTES:
            break
    out = [line for chunk in chunks for line in chunk]
    return "\n".join(out[-lines:]) if lines > 0 else ""


def _rotate(path: Path, limit: int) -> None:
    """Copy-truncate, as logrotate's copytruncate: the process keeps writing to its file
    (O_APPEND: at the new end); lines written between the copy and the truncate are lost."""
    try:
        if path.stat().st_size <= limit:
            return
        shutil.copyfile(path, path.with_name(path.name + ".1"))
        os.truncate(path, 0)
    except OSError as exc:
        logger.warning("cannot rotate the process output file {}: {}", path, exc)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("process cleanup failed: {}", task.exception())
