"""The semaphore backend: host-level services (a systemd unit, a NAS app, a VM) started and
stopped by running Semaphore UI task templates (Ansible playbooks) through its REST API.

The only module that talks to Semaphore. One instance per service, known by the service's
name; it has no container, so:

- `inspect()` is a probe of the service's `url` (its health path over HTTP, or a TCP connect
  with `health.type: tcp`): an answer, whatever its status, means running. A service that is up
  without Hestia having started it is thereby adopted by the registry's reconcile. After a
  successful start task the service counts as running (booting) until it first answers, for
  at most its startup_timeout: a systemd unit may take a while to listen, and the lifecycle's
  readiness probe decides when it is ready.
- `start()` creates a task of the start template (`POST /api/project/{p}/tasks`) and follows it
  (tenacity: short intervals first, capped back-off) to a final status; `error` or `stopped`
  fail the start with the task id and the last lines of its output. When the start is
  cancelled (startup_timeout, a stop, shutdown) Hestia asks Semaphore to stop the task.
- `stop()` runs the stop template the same way, bounded by `semaphore.timeouts.stop_task`.
- `discover()` is empty and `events()` never yields: Semaphore knows tasks, not services.

Templates are named in the config by id or name and resolved through the project's templates
list once (cached; listed again when Semaphore refuses a task for one). Every failure names
Semaphore and says what to do; an answer of an unexpected shape names the API version this
module was written against (`SEMAPHORE_API_VERSION`), since Semaphore's API changes between
releases. See tests/semaphore_spec/CONTRACT.md for the contract, quirks included (a 400,
not a 404, for an unknown task; 500 for a task of an unknown template).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from loguru import logger
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    stop_never,
    wait_exponential,
    wait_fixed,
)

from hestia.address import upstream_from_url
from hestia.backends.base import BackendEvent, InstanceInfo, InstanceNotFound, StopResult
from hestia.config import SemaphoreConfig, ServiceConfig
from hestia.errors import BackendError, HestiaError
from hestia.probes import http_probe, tcp_probe
from hestia.readiness import probe_path

# The Semaphore release whose API (spec and Go handlers) this module was written against.
SEMAPHORE_API_VERSION = "v2.10.32 (develop d4a27137, 2024-10-25)"

# pkg/task_logger.TaskStatus at that version; unknown strings (newer releases add some, e.g.
# `rejected`) are taken as not final and logged once.
FINAL_STATUSES = frozenset({"success", "error", "stopped"})
KNOWN_STATUSES = FINAL_STATUSES | {
    "waiting",
    "starting",
    "waiting_confirmation",
    "confirmed",
    "running",
    "stopping",
}
# Following a task: the first look soon (a fast playbook is not kept waiting), then back off
# to at most one look a second (Semaphore itself picks queued tasks up every 5 s).
FOLLOW_FIRST_S = 0.1
FOLLOW_MAX_S = 1.0
# One look that fails to connect is retried this often before the follow gives up.
FOLLOW_TRANSIENT_ATTEMPTS = 3
OUTPUT_LINES = 20  # task output lines kept in an error's detail
MESSAGE_LINES = 5  # ... and in its message
PROBE_TIMEOUT_S = 2.0
CLEANUP_WAIT_S = 5.0  # close() waits this long for task stops asked by cancelled starts

Role = Literal["start", "stop"]


class SemaphoreUnreachable(BackendError):
    """No answer from Semaphore (refused, DNS, timeout)."""

    status = 503
    code = "backend_unreachable"


class SemaphoreBadAnswer(BackendError):
    """Semaphore answered something this module does not understand."""


class StartTaskFailed(BackendError):
    """The start template's task ended in `error` or `stopped`."""

    status = 503
    code = "start_failed"


class StopTaskFailed(BackendError):
    """The stop template's task failed or did not finish in time."""

    code = "stop_failed"


@dataclass(frozen=True)
class _Template:
    id: int
    name: str
    # None: Semaphore did not say (then Hestia does not second-guess it)
    has_environment: bool | None


@dataclass
class _Run:
    """One task Hestia created."""

    id: int
    role: Role
    template: _Template
    service: str
    status: str = "waiting"
    started: float = field(default_factory=time.monotonic)


class SemaphoreBackend:
    name = "semaphore"

    def __init__(
        self, config: SemaphoreConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        self.url = config.url
        self._project = f"/project/{config.project_id}"
        t = config.timeouts
        self._client = httpx.AsyncClient(
            base_url=f"{config.url}/api",
            headers={
                "Authorization": f"Bearer {config.api_token()}",
                # Semaphore redirects to its HTML 404 page when Accept mentions text/html
                "Accept": "application/json",
                "User-Agent": "hestia",
            },
            timeout=httpx.Timeout(t.request, connect=t.connect),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
            # Semaphore sits next to Hestia (LAN, compose network): HTTP(S)_PROXY variables
            # meant for the internet must not reroute it
            trust_env=False,
            transport=transport,
        )
        self._templates: dict[int | str, _Template] | None = None
        self._templates_lock = asyncio.Lock()
        self._booting: dict[str, float] = {}  # ref -> until (monotonic): started, not answering
        self._last_run: dict[str, _Run] = {}  # ref -> the last task Hestia ran for it
        self._cleanups: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self._warned: set[str] = set()

    # ---------------------------------------------------------------- protocol
    async def inspect(self, ref: str, spec: ServiceConfig) -> InstanceInfo:
        if spec.url is None:
            raise InstanceNotFound(
                f"service {spec.name!r} has no `url` to probe", service=spec.name
            )
        upstream = upstream_from_url(spec.url)
        if spec.health.type == "tcp":
            answers = await tcp_probe(upstream.host, upstream.port, PROBE_TIMEOUT_S)
        else:
            status = await http_probe(
                upstream.host,
                upstream.port,
                probe_path(spec.health, upstream),
                upstream.host_header.decode("latin-1"),
                PROBE_TIMEOUT_S,
            )
            answers = status is not None
        until = self._booting.get(ref)
        if answers:
            self._booting.pop(ref, None)
            running, word = True, "running"
        elif until is not None and time.monotonic() < until:
            running, word = True, "starting"  # started by its task, not listening yet
        else:
            self._booting.pop(ref, None)
            running, word = False, "stopped"
        return InstanceInfo(
            id=ref,
            name=ref,
            running=running,
            status=word,
            address=upstream.origin,
        )

    async def start(self, ref: str, spec: ServiceConfig) -> None:
        run = await self._run(spec, "start", ref)
        try:
            await self._follow(run)
        except asyncio.CancelledError:
            # the start was given up (startup_timeout, a stop, shutdown): the playbook must
            # not go on starting the service behind Hestia's back
            cleanup = asyncio.get_running_loop().create_task(
                self._stop_task(run, "its start was given up (startup_timeout, a stop, shutdown)"),
                name=f"hestia-semaphore-stop-{run.id}",
            )
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            await asyncio.shield(cleanup)
            raise
        if run.status != "success":
            raise await self._task_failed(run, StartTaskFailed)
        self._booting[ref] = time.monotonic() + spec.startup_timeout

    async def stop(self, ref: str, spec: ServiceConfig, timeout: float) -> StopResult:
        # `timeout` (stop_timeout) is an engine's grace before a kill; a playbook has none:
        # the stop task is followed up to semaphore.timeouts.stop_task instead
        self._booting.pop(ref, None)
        run = await self._run(spec, "stop", ref)
        limit = self.config.timeouts.stop_task
        try:
            async with asyncio.timeout(limit):
                await self._follow(run)
        except TimeoutError:
            await self._stop_task(run, "it ran longer than semaphore.timeouts.stop_task")
            raise StopTaskFailed(
                f"service {spec.name!r}: Semaphore task {run.id} (stop template "
                f"{run.template.name!r}) did not finish within semaphore.timeouts.stop_task "
                f"({limit:g}s); Hestia asked Semaphore to stop it. Check the task in Semaphore, "
                "or raise semaphore.timeouts.stop_task",
                service=spec.name,
                detail=self._run_detail(run),
            ) from None
        if run.status != "success":
            raise await self._task_failed(run, StopTaskFailed)
        return StopResult()

    async def logs_tail(self, ref: str, lines: int = 20) -> str:
        """The last lines of the last task Hestia ran for the service."""
        run = self._last_run.get(ref)
        if run is None:
            return ""
        try:
            output = await self._output(run)
        except HestiaError:
            return ""
        return "\n".join(output[-lines:])

    async def discover(self) -> list[InstanceInfo]:
        return []

    def events(self) -> AsyncIterator[BackendEvent]:
        return self._no_events()

    async def _no_events(self) -> AsyncIterator[BackendEvent]:
        await self._closed.wait()
        return
        yield  # an async generator that ends when the backend closes

    async def close(self) -> None:
        self._closed.set()
        if self._cleanups:
            # task stops asked by cancelled starts (shutdown cancels starts) get a moment
            await asyncio.wait(list(self._cleanups), timeout=CLEANUP_WAIT_S)
        await self._client.aclose()

    # ---------------------------------------------------------------- tasks
    async def _run(self, spec: ServiceConfig, role: Role, ref: str) -> _Run:
        """Create a task of the service's start or stop template."""
        wanted = spec.start_template if role == "start" else spec.stop_template
        if wanted is None:  # ServiceConfig requires both for backend semaphore
            raise BackendError(f"service {spec.name!r} has no {role}_template", service=spec.name)
        template = await self._template(wanted, role, spec.name)
        if spec.environment and template.has_environment is False:
            raise BackendError(
                f"service {spec.name!r}: Semaphore template {template.name!r} (id {template.id}) "
                "has no Environment, and Semaphore fails a task with extra vars then; give the "
                "template an Environment in Semaphore (an empty one will do), or remove "
                f"`environment` from services.{spec.name}",
                service=spec.name,
            )
        body: dict[str, Any] = {
            "template_id": template.id,
            "message": f"Hestia: {role} service {spec.name}",
        }
        if spec.environment:
            # a JSON object as a string, merged with the template's environment (whose keys
            # win on a clash)
            body["environment"] = json.dumps(spec.environment, default=str)
        what = f"running the {role} template {template.name!r} (id {template.id})"
        path = f"{self._project}/tasks"
        resp = await self._call("POST", path, spec.name, what, body=body, expect=(201,), fail=False)
        if resp.status_code in (400, 404, 500):
            # Semaphore answers 500 (not 404) for a template that is not in the project: the
            # cached list may be stale; look again once
            self._templates = None
            fresh = await self._template(wanted, role, spec.name)
            if fresh.id != template.id:
                body["template_id"] = fresh.id
                template = fresh
                resp = await self._call("POST", path, spec.name, what, body=body, expect=(201,))
            else:
                raise BackendError(
                    f"service {spec.name!r}: Semaphore at {self.url} refused to create a task "
                    f"{what.removeprefix('running ')} ({resp.status_code}"
                    f"{_error_text(resp)}); the template exists, so see Semaphore's log for why",
                    service=spec.name,
                    detail={"semaphore_status": resp.status_code},
                )
        task = self._object(resp, "a Task object with an integer `id`")
        task_id = task.get("id")
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise self._bad_answer(resp, "a Task object with an integer `id`")
        run = _Run(task_id, role, template, spec.name, _status_of(task) or "waiting")
        self._last_run[ref] = run
        logger.info(
            "service {}: Semaphore task {} runs the {} template {!r} (id {})",
            spec.name,
            run.id,
            role,
            template.name,
            template.id,
        )
        return run

    async def _follow(self, run: _Run) -> None:
        """Look at the task until its status is final (the caller bounds the time)."""
        if run.status in FINAL_STATUSES:
            return
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=FOLLOW_FIRST_S, max=FOLLOW_MAX_S),
            retry=retry_if_result(lambda status: status not in FINAL_STATUSES),
            stop=stop_never,
            reraise=True,
        )
        await retrying(self._look, run)

    async def _look(self, run: _Run) -> str:
        # a blip between two looks must not fail a start that Semaphore is carrying out
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(SemaphoreUnreachable),
            stop=stop_after_attempt(FOLLOW_TRANSIENT_ATTEMPTS),
            wait=wait_fixed(0.5),
            reraise=True,
        )
        status: str = await retrying(self._look_once, run)
        return status

    async def _look_once(self, run: _Run) -> str:
        path = f"{self._project}/tasks/{run.id}"
        what = f"following task {run.id} ({run.role} template {run.template.name!r})"
        resp = await self._call("GET", path, run.service, what, expect=(200,), fail=False)
        if resp.status_code == 400:  # Semaphore's answer for an unknown task id
            raise BackendError(
                f"service {run.service!r}: Semaphore task {run.id} is gone (Semaphore answered "
                "400 for it: deleted, or the project changed); see the task history in "
                "Semaphore",
                service=run.service,
                detail=self._run_detail(run),
            )
        if resp.status_code != 200:
            raise self._refused(resp, "GET", path, run.service, what)
        status = _status_of(self._object(resp, "a Task object with a string `status`"))
        if status is None:
            raise self._bad_answer(resp, "a Task object with a string `status`")
        if status not in KNOWN_STATUSES and status not in self._warned:
            self._warned.add(status)
            logger.warning(
                "Semaphore task {} has status {!r}, unknown to Hestia (written against {}); "
                "taken as not final",
                run.id,
                status,
                SEMAPHORE_API_VERSION,
            )
        run.status = status
        return status

    async def _stop_task(self, run: _Run, why: str) -> None:
        """Ask Semaphore to stop a task; never raises (a cleanup)."""
        path = f"{self._project}/tasks/{run.id}/stop"
        try:
            # force false: a queued task is dropped when dequeued, a running one is killed
            # (force true would only relabel a queued task, which could still run)
            await self._call(
                "POST",
                path,
                run.service,
                f"stopping task {run.id}",
                body={"force": False},
                expect=(204,),
            )
        except (HestiaError, TimeoutError) as exc:
            message = exc.message if isinstance(exc, HestiaError) else "timed out"
            logger.warning(
                "service {}: Semaphore task {} should be stopped ({}) and stopping it failed: {}",
                run.service,
                run.id,
                why,
                message,
            )
            return
        logger.warning("service {}: asked Semaphore to stop task {}: {}", run.service, run.id, why)

    async def _output(self, run: _Run) -> list[str]:
        path = f"{self._project}/tasks/{run.id}/output"
        what = f"reading the output of task {run.id}"
        resp = await self._call("GET", path, run.service, what, expect=(200,))
        expected = "an array of TaskOutput objects with a string `output`"
        try:
            data = resp.json()
        except ValueError:
            raise self._bad_answer(resp, expected) from None
        if not isinstance(data, list):
            raise self._bad_answer(resp, expected)
        lines = []
        for item in data:
            if not isinstance(item, dict) or not isinstance(item.get("output"), str):
                raise self._bad_answer(resp, expected)
            lines.append(item["output"])
        return lines

    async def _task_failed(self, run: _Run, kind: type[BackendError]) -> BackendError:
        try:
            output = (await self._output(run))[-OUTPUT_LINES:]
            shown = " | ".join(output[-MESSAGE_LINES:]) or "(no output)"
        except HestiaError as exc:
            output, shown = [], f"(its output could not be read: {exc.message})"
        return kind(
            f"service {run.service!r}: Semaphore task {run.id} ({run.role} template "
            f"{run.template.name!r}, id {run.template.id}) ended with status {run.status!r}; "
            f"last output: {shown}. See the task in Semaphore for the whole output",
            service=run.service,
            detail={**self._run_detail(run), "output": output},
        )

    def _run_detail(self, run: _Run) -> dict[str, Any]:
        return {
            "semaphore_task_id": run.id,
            "semaphore_task_status": run.status,
            "semaphore_template": run.template.name,
            "semaphore_template_id": run.template.id,
        }

    # ---------------------------------------------------------------- templates
    async def _template(self, wanted: int | str, role: Role, service: str) -> _Template:
        templates = self._templates
        if templates is None or wanted not in templates:
            async with self._templates_lock:
                if self._templates is None or wanted not in self._templates:
                    self._templates = await self._list_templates(service)
                templates = self._templates
        found = templates.get(wanted)
        if found is None:
            known = sorted({f"{t.name!r} (id {t.id})" for t in templates.values()})
            raise BackendError(
                f"service {service!r}: {role}_template {wanted!r} is not a template of Semaphore "
                f"project {self.config.project_id} at {self.url}; its templates: "
                f"{', '.join(known) or '(none)'}. Fix services.{service}.{role}_template",
                service=service,
            )
        return found

    async def _list_templates(self, service: str) -> dict[int | str, _Template]:
        path = f"{self._project}/templates"
        resp = await self._call("GET", path, service, "listing the project's templates")
        expected = "an array of Template objects with an integer `id` and a string `name`"
        try:
            data = resp.json()
        except ValueError:
            raise self._bad_answer(resp, expected) from None
        if not isinstance(data, list):
            raise self._bad_answer(resp, expected)
        out: dict[int | str, _Template] = {}
        names: dict[str, int] = {}
        for item in data:
            if not isinstance(item, dict):
                raise self._bad_answer(resp, expected)
            tid, name = item.get("id"), item.get("name")
            if not isinstance(tid, int) or isinstance(tid, bool) or not isinstance(name, str):
                raise self._bad_answer(resp, expected)
            env = item.get("environment_id", ...)
            template = _Template(tid, name, None if env is ... else env is not None)
            out[tid] = template
            names[name] = names.get(name, 0) + 1
            out.setdefault(name, template)
        for name, count in names.items():
            if count > 1:  # two templates, one name: refuse to guess
                del out[name]
        return out

    # ---------------------------------------------------------------- http
    async def _call(
        self,
        method: str,
        path: str,
        service: str,
        what: str,
        *,
        body: dict[str, Any] | None = None,
        expect: tuple[int, ...] = (200,),
        fail: bool = True,
    ) -> httpx.Response:
        """One API call. Unreachable -> SemaphoreUnreachable; 401/403/404 -> a BackendError
        saying what to fix; another unexpected status -> BackendError when `fail`."""
        try:
            resp = await self._client.request(method, path, json=body)
        except httpx.TimeoutException:
            raise SemaphoreUnreachable(
                f"Semaphore at {self.url} did not answer in time while {what} for service "
                f"{service!r} (semaphore.timeouts: connect "
                f"{self.config.timeouts.connect:g}s, request {self.config.timeouts.request:g}s); "
                "check that Semaphore runs and is not overloaded",
                service=service,
            ) from None
        except httpx.HTTPError as exc:
            raise SemaphoreUnreachable(
                f"Semaphore at {self.url} is unreachable while {what} for service {service!r} "
                f"({_reason(exc)}); check that Semaphore runs and that semaphore.url is right",
                service=service,
            ) from None
        if resp.status_code in expect:
            return resp
        if fail or resp.status_code in (401, 403):  # no caller can do better with these
            raise self._refused(resp, method, path, service, what)
        return resp

    def _refused(
        self, resp: httpx.Response, method: str, path: str, service: str, what: str
    ) -> BackendError:
        code = resp.status_code
        detail = {"semaphore_status": code}
        if code == 401:
            message = (
                f"Semaphore at {self.url} refused Hestia's API token (401 Unauthorized) while "
                f"{what} for service {service!r}: the token is wrong, expired or deleted. "
                "Create one (POST /api/user/tokens while logged in to Semaphore, see "
                "'Host services through Semaphore' in Hestia's README) and set semaphore.token"
            )
        elif code == 403:
            message = (
                f"Semaphore at {self.url} refused {what} for service {service!r} (403 "
                f"Forbidden{_error_text(resp)}): the token's user lacks the role in project "
                f"{self.config.project_id}; give it a role that may run tasks"
            )
        elif code == 404 and path.startswith(self._project):
            message = (
                f"Semaphore at {self.url} has no project {self.config.project_id} that the "
                f"token's user belongs to (404 while {what} for service {service!r}); check "
                "semaphore.project_id and the user's project membership"
            )
        else:
            message = (
                f"Semaphore at {self.url} answered {code} to {method} /api{path} while {what} "
                f"for service {service!r}{_error_text(resp)}"
            )
        return BackendError(message, service=service, detail=detail)

    def _object(self, resp: httpx.Response, expected: str) -> dict[str, Any]:
        try:
            data = resp.json()
        except ValueError:
            raise self._bad_answer(resp, expected) from None
        if not isinstance(data, dict):
            raise self._bad_answer(resp, expected)
        return data

    def _bad_answer(self, resp: httpx.Response, expected: str) -> SemaphoreBadAnswer:
        sample = resp.text[:200].strip() or "(empty)"
        return SemaphoreBadAnswer(
            f"Semaphore at {self.url} answered {resp.request.method} {resp.request.url.path} "
            f"with something Hestia does not understand (expected {expected}; got {sample!r}). "
            f"Hestia speaks Semaphore's API as of {SEMAPHORE_API_VERSION}: check Semaphore's "
            "version (GET /api/info), and report this if it is newer",
            detail={"semaphore_api_version": SEMAPHORE_API_VERSION},
        )


def _status_of(task: dict[str, Any]) -> str | None:
    status = task.get("status")
    return status if isinstance(status, str) and status else None


def _error_text(resp: httpx.Response) -> str:
    """Semaphore's `{"error": "..."}` body, when it sent one."""
    with contextlib.suppress(ValueError):
        data = resp.json()
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return f": {data['error']}"
    return ""


def _reason(exc: httpx.HTTPError) -> str:
    cause: BaseException | None = exc
    while cause is not None:  # the innermost OSError says it best (connection refused, DNS)
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno).lower()
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__
