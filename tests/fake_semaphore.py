"""A fake Semaphore UI server for the semaphore backend's tests: a small ASGI app served by
uvicorn on 127.0.0.1, following the contract in tests/semaphore_spec/CONTRACT.md (Semaphore
v2.10.32 + 31 commits), quirks included:

- bearer tokens (the whole Authorization header lower-cased, as the real server does); any
  auth failure is 401 with an empty body; `/api/ping` needs none;
- the templates list, and task creation decoded like `db.Task` (unknown keys ignored; a body
  that is not JSON: 400; a template not in the project: 500, not 404; extra vars for a
  template without an environment: 500 and the task stored as `error`);
- task status progression with the exact names: waiting -> starting -> running -> success |
  error, and stopping/stopped through `POST .../stop` (which needs a JSON body: `{}` or
  `{"force": bool}`; an empty body is 400);
- an unknown task id is 400 with an empty body (not 404), for the task, its output and stop;
- a project that does not exist is 404 with an empty body; a bad integer path parameter 400;
  an unknown path under /api 404 with the text "Not Found".

A template's "playbook" is an async callable run when the task runs: it logs lines (as
Ansible's output) and raises PlaybookFailed for an `error` ending. `HostService` is what the
playbooks start and stop: a real `python -m http.server` process on 127.0.0.1.

Every request and every response is recorded, so tests can check the body and token Hestia
sent, and test_backend_semaphore.py checks every response against Semaphore's own spec
(api-docs.yml), so this fake cannot drift from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from tests.conftest import free_port, wait_for

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ACTIVE = ("waiting", "starting", "waiting_confirmation", "confirmed", "running", "stopping")


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PlaybookFailed(Exception):
    """Raised by a fake playbook: the task ends in `error`."""


@dataclass
class FakeTask:
    id: int
    template_id: int
    project_id: int
    environment: str
    message: str
    playbook: str
    status: str = "waiting"
    created: str = field(default_factory=now_rfc3339)
    start: str | None = None
    end: str | None = None
    output: list[tuple[str, str]] = field(default_factory=list)  # (time, line)
    history: list[str] = field(default_factory=list)  # every status it had, in order
    stop_asked: bool = False
    job: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.history.append(self.status)

    def log(self, line: str) -> None:
        self.output.append((now_rfc3339(), line))

    def set_status(self, status: str) -> None:
        self.status = status
        self.history.append(status)

    @property
    def extra_vars(self) -> dict[str, Any]:
        return dict(json.loads(self.environment)) if self.environment else {}

    def to_json(self, *, created_now: bool = False) -> dict[str, Any]:
        return {
            "id": self.id,
            "template_id": self.template_id,
            "project_id": self.project_id,
            "status": self.status,
            "debug": False,
            "dry_run": False,
            "diff": False,
            "playbook": self.playbook,
            "environment": self.environment,
            "limit": "",
            # the creation answer shows the stored "{}", later GETs an empty string
            "secret": "{}" if created_now else "",
            "arguments": None,
            "git_branch": None,
            "user_id": 1,
            "integration_id": None,
            "schedule_id": None,
            "created": self.created,
            "start": self.start,
            "end": self.end,
            "message": self.message,
            "commit_hash": None,
            "commit_message": "",
            "build_task_id": None,
            "version": None,
            "inventory_id": None,
        }


Playbook = Callable[[FakeTask], Awaitable[None]]


@dataclass
class FakeTemplate:
    id: int
    name: str
    playbook: Playbook
    project_id: int = 1
    environment_id: int | None = 1
    tasks: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project_id": self.project_id,
            "inventory_id": 1,
            "repository_id": 1,
            "environment_id": self.environment_id,
            "view_id": None,
            "name": self.name,
            "playbook": f"{self.name.replace(' ', '-')}.yml",
            "arguments": None,
            "allow_override_args_in_task": False,
            "description": None,
            "type": "",
            "app": "ansible",
            "git_branch": None,
            "survey_vars": None,
            "vaults": None,
            "start_version": None,
            "build_template_id": None,
            "autorun": False,
            "suppress_success_alerts": False,
            "tasks": self.tasks,
            "last_task": None,
        }


@dataclass
class Recorded:
    method: str
    path: str
    operation: str | None  # the spec's path template, e.g. /project/{project_id}/tasks
    headers: dict[str, str]
    body: bytes
    status: int = 0
    content_type: str = ""
    response: bytes = b""
    # a response made wrong on purpose (a test of Hestia's "unexpected answer" error)
    off_spec: bool = False

    @property
    def json(self) -> Any:
        return json.loads(self.body)


_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", tpl) + "$"), tpl)
    for method, tpl in [
        ("GET", "/ping"),
        ("GET", "/project/{project_id}/templates"),
        ("GET", "/project/{project_id}/templates/{template_id}"),
        ("GET", "/project/{project_id}/tasks"),
        ("POST", "/project/{project_id}/tasks"),
        ("GET", "/project/{project_id}/tasks/{task_id}"),
        ("GET", "/project/{project_id}/tasks/{task_id}/output"),
        ("POST", "/project/{project_id}/tasks/{task_id}/stop"),
    ]
]


class FakeSemaphore:
    def __init__(
        self, token: str = "hestia-test-token-0123456789abcdef=", *, project_id: int = 1
    ) -> None:
        self.token = token
        self.project_id = project_id
        self.queue_delay = 0.05  # waiting -> starting (the real queue is polled every 5 s)
        self.templates: dict[int, FakeTemplate] = {}
        self.tasks: dict[int, FakeTask] = {}
        self.requests: list[Recorded] = []
        # switches that make answers wrong on purpose (recorded as off_spec)
        self.templates_as_object = False
        self._server: uvicorn.Server | None = None
        self._serve: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_template(
        self, name: str, playbook: Playbook, *, environment_id: int | None = 1
    ) -> FakeTemplate:
        tid = max(self.templates, default=0) + 1
        template = FakeTemplate(tid, name, playbook, self.project_id, environment_id)
        self.templates[tid] = template
        return template

    def tasks_of(self, template: FakeTemplate) -> list[FakeTask]:
        return [t for t in self.tasks.values() if t.template_id == template.id]

    def created(self) -> list[Recorded]:
        """The task creations that were asked, in order."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/tasks")]

    # ---------------------------------------------------------------- serving
    async def start(self) -> str:
        self.port = free_port()
        config = uvicorn.Config(
            self, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._serve = asyncio.create_task(self._server.serve())
        server = self._server
        serve = self._serve
        await wait_for(lambda: server.started or serve.done(), 10, "the fake Semaphore")
        if serve.done():
            serve.result()
        return self.url

    async def stop(self) -> None:
        for task in self.tasks.values():
            if task.job is not None and not task.job.done():
                task.job.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task.job
        if self._server is not None and self._serve is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._serve, 10)
            self._server = None

    # ---------------------------------------------------------------- ASGI
    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        method = scope["method"]
        api_path = path[len("/api") :] if path.startswith("/api/") else None
        operation, params = None, {}
        if api_path is not None:
            for route_method, pattern, tpl in _ROUTES:
                m = pattern.match(api_path)
                if m and (route_method == method or (method == "HEAD" and tpl == "/ping")):
                    operation, params = tpl, m.groupdict()
                    break
        rec = Recorded(method, path, operation, headers, body)
        self.requests.append(rec)
        status, ctype, out = self._answer(rec, params, headers)
        rec.status, rec.content_type, rec.response = status, ctype, out
        response_headers = [(b"content-length", str(len(out)).encode())]
        if ctype:
            response_headers.append((b"content-type", ctype.encode()))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": out})

    def _answer(
        self, rec: Recorded, params: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, str, bytes]:
        if rec.operation is None:
            return 404, "text/plain; charset=utf-8", b"Not Found"
        if rec.operation == "/ping":
            return 200, "text/plain; charset=utf-8", b"pong"
        # api/router.go: the header is lower-cased whole; "bearer " then the token
        auth = headers.get("authorization", "").lower()
        if "bearer" not in auth or auth.partition("bearer ")[2] != self.token.lower():
            return 401, "", b""
        try:
            project_id = int(params["project_id"])
        except ValueError:
            return _json(400, {"error": "Invalid project ID"})
        if project_id != self.project_id:
            return 404, "", b""
        op = rec.operation
        if op == "/project/{project_id}/templates":
            templates = sorted(self.templates.values(), key=lambda t: t.name)
            items = [t.to_json() for t in templates]
            if self.templates_as_object:
                rec.off_spec = True
                return _json(200, {"templates": items})
            return _json(200, items)
        if op == "/project/{project_id}/templates/{template_id}":
            tid = _int(params["template_id"])
            if tid is None:
                return 400, "", b""
            template = self.templates.get(tid)
            return _json(200, template.to_json()) if template else (404, "", b"")
        if op == "/project/{project_id}/tasks" and rec.method == "GET":
            tasks = sorted(self.tasks.values(), key=lambda t: -t.id)
            return _json(200, [t.to_json() for t in tasks])
        if op == "/project/{project_id}/tasks":
            return self._create_task(rec)
        tid = _int(params["task_id"])
        task = self.tasks.get(tid) if tid is not None else None
        if task is None:
            return 400, "", b""  # (code) not 404
        if op == "/project/{project_id}/tasks/{task_id}":
            return _json(200, task.to_json())
        if op == "/project/{project_id}/tasks/{task_id}/output":
            return _json(
                200,
                [
                    {"task_id": task.id, "task": "", "time": at, "output": line}
                    for at, line in task.output
                ],
            )
        return self._stop_task(task, rec.body)

    def _create_task(self, rec: Recorded) -> tuple[int, str, bytes]:
        try:
            body = json.loads(rec.body)
        except ValueError:
            return 400, "", b""
        if not isinstance(body, dict):
            return 400, "", b""
        template = self.templates.get(body.get("template_id"))  # type: ignore[arg-type]
        if template is None:
            return 500, "", b""  # (code) not 404
        environment = body.get("environment") or ""
        task = FakeTask(
            id=max(self.tasks, default=0) + 1,
            template_id=template.id,
            project_id=self.project_id,
            environment=environment,
            message=str(body.get("message") or ""),
            playbook=str(body.get("playbook") or ""),
        )
        self.tasks[task.id] = task
        template.tasks += 1
        if environment and environment != "{}" and template.environment_id is None:
            # (code) preparation fails: the task is stored as error and the API answers 500
            task.set_status("error")
            return 500, "", b""
        task.log(f"Task {task.id} added to queue")
        task.job = asyncio.get_running_loop().create_task(self._run(task, template))
        return _json(201, task.to_json(created_now=True))

    async def _run(self, task: FakeTask, template: FakeTemplate) -> None:
        await asyncio.sleep(self.queue_delay)
        if task.stop_asked:  # stopped while queued: dropped when dequeued
            if task.status != "stopped":
                task.set_status("stopped")
            return
        task.set_status("starting")
        task.log(f"Preparing: {task.id}")
        task.start = now_rfc3339()
        task.set_status("running")
        task.log(f"Started: {task.id}")
        try:
            await template.playbook(task)
        except asyncio.CancelledError:  # killed by a stop
            if task.status != "stopped":
                task.set_status("stopped")
            task.end = now_rfc3339()
            raise
        except PlaybookFailed as exc:
            task.log(str(exc))
            task.set_status("error")
        else:
            task.set_status("success")
        task.end = now_rfc3339()

    def _stop_task(self, task: FakeTask, raw: bytes) -> tuple[int, str, bytes]:
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, "", b""  # (code) the body must be JSON, `{}` at least
        force = bool(body.get("force")) if isinstance(body, dict) else False
        if task.status not in ACTIVE:
            task.set_status("stopped")  # (code) even a finished task, even `success`
            return 204, "", b""
        task.stop_asked = True
        if force:
            task.set_status("stopped")
        elif task.status != "waiting":
            task.set_status("stopping")
        if task.status != "waiting" and task.job is not None and not task.job.done():
            task.job.cancel()  # the playbook process is killed
        return 204, "", b""


def _json(status: int, data: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(data).encode() + b"\n"


def _int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


# ------------------------------------------------------------------ the host service
class HostService:
    """A service on the host, as a systemd unit would run it: `python -m http.server` on
    127.0.0.1, started and stopped by the fake playbooks."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "index.html").write_text("hello from the host service\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stops = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        if self.running:
            return
        self.starts += 1
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1"],
            cwd=self.root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        self.stops += 1
        proc.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 5)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    def reap(self) -> None:
        """Test teardown: nothing may outlive the test."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    # the "playbooks": Ansible-like output, a delay, then the unit's new state
    def start_playbook(self, delay: float = 0.2) -> Playbook:
        async def play(task: FakeTask) -> None:
            unit = task.extra_vars.get("unit", "web")
            task.log(f"PLAY [start {unit}] ***")
            task.log(f"TASK [ansible.builtin.systemd: {unit} started] ***")
            await asyncio.sleep(delay)
            self.spawn()
            task.log("changed: [localhost]")
            task.log("PLAY RECAP *** localhost : ok=1 changed=1 failed=0")

        return play

    def stop_playbook(self, delay: float = 0.1) -> Playbook:
        async def play(task: FakeTask) -> None:
            unit = task.extra_vars.get("unit", "web")
            task.log(f"PLAY [stop {unit}] ***")
            task.log(f"TASK [ansible.builtin.systemd: {unit} stopped] ***")
            await asyncio.sleep(delay)
            await self.terminate()
            task.log("changed: [localhost]")
            task.log("PLAY RECAP *** localhost : ok=1 changed=1 failed=0")

        return play


def failing_playbook(message: str, action: str = "start") -> Playbook:
    async def play(task: FakeTask) -> None:
        task.log(f"PLAY [{action} web] ***")
        state = {"start": "started", "stop": "stopped"}[action]
        task.log(f"TASK [ansible.builtin.systemd: web {state}] ***")
        raise PlaybookFailed(f'fatal: [localhost]: FAILED! => {{"msg": "{message}"}}')

    return play


def hanging_playbook() -> Playbook:
    """Runs until stopped (cancelled), like a playbook waiting on a host that never answers."""

    async def play(task: FakeTask) -> None:
        task.log("PLAY [start web] ***")
        task.log("TASK [wait_for: port 8096] ***")
        await asyncio.Event().wait()

    return play


def no_op_playbook() -> Playbook:
    """Succeeds without starting anything (a playbook that started the wrong unit)."""

    async def play(task: FakeTask) -> None:
        task.log("PLAY [start web] ***")
        task.log("ok: [localhost]")

    return play
