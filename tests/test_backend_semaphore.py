"""The semaphore backend end to end: a real gateway on 127.0.0.1, a fake Semaphore that
follows the contract (tests/fake_semaphore.py, served by uvicorn) and a real host service (a
`python -m http.server` process the fake's playbooks start and stop).

Every answer the fake gives is checked against Semaphore's own spec (tests/semaphore_spec/
api-docs.yml) when each test ends, so the fake cannot drift from the real API."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hestia.backends import build_backends
from hestia.backends.semaphore import SEMAPHORE_API_VERSION
from hestia.config import expand_env, parse_config
from hestia.errors import ConfigError
from hestia.lifecycle import State
from hestia.probes import tcp_probe
from tests.conftest import free_port, wait_for
from tests.fake_semaphore import (
    FakeSemaphore,
    FakeTemplate,
    HostService,
    Recorded,
    failing_playbook,
    hanging_playbook,
    no_op_playbook,
)

SPEC_DIR = Path(__file__).parent / "semaphore_spec"
TOKEN_ENV = "HESTIA_TEST_SEMAPHORE_TOKEN"


# ------------------------------------------------------------------ the spec check
def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((SPEC_DIR / "api-docs.yml").read_text())
    return spec


# Fields the spec types as non-null that Semaphore's Go structs send as null (CONTRACT.md,
# "code wins over spec"): a null is accepted there and nowhere else.
NULLABLE_BY_CODE: dict[str, set[str]] = {
    "Template": {
        "inventory_id",
        "environment_id",
        "view_id",
        "arguments",
        "description",
        "git_branch",
        "survey_vars",
        "last_task",
    },
    "Task": set(),
    "TaskOutput": set(),
}
# Statuses the code gives that the spec leaves out (CONTRACT.md), by operation; their bodies
# are empty or {"error": "..."}.
CODE_ONLY_STATUSES: dict[tuple[str, str], set[int]] = {
    ("get", "/project/{project_id}/templates"): {400, 401, 404},
    ("get", "/project/{project_id}/templates/{template_id}"): {400, 401, 404},
    ("get", "/project/{project_id}/tasks"): {400, 401, 404},
    ("post", "/project/{project_id}/tasks"): {400, 401, 403, 404, 500},
    ("get", "/project/{project_id}/tasks/{task_id}"): {400, 401, 404},
    ("get", "/project/{project_id}/tasks/{task_id}/output"): {400, 401, 404},
    ("post", "/project/{project_id}/tasks/{task_id}/stop"): {400, 401, 403, 404},
}
# What a client may set in a task creation (CONTRACT.md's table; the spec lists fewer).
TASK_BODY_FIELDS = {
    "template_id",
    "debug",
    "dry_run",
    "diff",
    "playbook",
    "environment",
    "secret",
    "limit",
    "arguments",
    "git_branch",
    "inventory_id",
    "message",
    "build_task_id",
}


def _types_of(schema: dict[str, Any]) -> list[str]:
    t = schema.get("type")
    return t if isinstance(t, list) else [t] if t else []


def schema_problems(
    spec: dict[str, Any], schema: dict[str, Any], value: Any, where: str, definition: str = ""
) -> list[str]:
    """What in `value` breaks a Swagger 2.0 `schema`: types, nulls, `minimum`, `date-time`,
    and every property the spec lists being present (Go marshals every struct field)."""
    if "$ref" in schema:
        definition = schema["$ref"].rsplit("/", 1)[-1]
        merged = dict(spec["definitions"][definition])
        if "properties" in schema:  # siblings of a $ref in the spec: merged in
            merged["properties"] = {**merged.get("properties", {}), **schema["properties"]}
        schema = merged
    types = _types_of(schema)
    if value is None:
        return [] if "null" in types or not types else [f"{where}: null, spec says {types}"]
    checks = {
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    if types and not any(checks[t](value) for t in types if t in checks):
        return [f"{where}: {value!r} is not {types}"]
    problems: list[str] = []
    if "minimum" in schema and isinstance(value, int) and value < schema["minimum"]:
        problems.append(f"{where}: {value} < minimum {schema['minimum']}")
    if schema.get("format") == "date-time" and isinstance(value, str):
        try:
            dt.datetime.fromisoformat(value)
        except ValueError:
            problems.append(f"{where}: {value!r} is not a date-time")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += schema_problems(spec, schema["items"], item, f"{where}[{i}]", definition)
    if isinstance(value, dict):
        nullable = NULLABLE_BY_CODE.get(definition, set())
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value:
                problems.append(f"{where}.{key}: missing")
            elif value[key] is None and key in nullable:
                continue
            else:
                problems += schema_problems(spec, sub, value[key], f"{where}.{key}")
        for key in schema.get("required") or []:
            if key not in value:
                problems.append(f"{where}.{key}: required, missing")
    return problems


def response_problems(spec: dict[str, Any], rec: Recorded) -> list[str]:
    """How one recorded answer of the fake departs from the spec (and CONTRACT.md)."""
    where = f"{rec.method} {rec.path} -> {rec.status}"
    if rec.operation is None:  # an unknown path under /api
        ok = rec.status == 404 and rec.response == b"Not Found"
        return [] if ok else [f"{where}: an unknown path is 404 'Not Found'"]
    method = "get" if rec.method == "HEAD" else rec.method.lower()
    operation = spec["paths"][rec.operation].get(method)
    if operation is None:
        return [f"{where}: the spec has no {method} {rec.operation}"]
    documented = operation["responses"]
    if rec.status not in documented:
        if rec.status not in CODE_ONLY_STATUSES.get((method, rec.operation), set()):
            return [f"{where}: status not in the spec nor in CONTRACT.md"]
        if rec.response == b"":
            return []
        body = json.loads(rec.response)
        ok = isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str)
        return [] if ok else [f"{where}: an error body is empty or {{'error': '...'}}"]
    schema = documented[rec.status].get("schema")
    if schema is None:
        return [] if rec.response == b"" else [f"{where}: the spec says no body"]
    if rec.operation == "/ping":
        ok = rec.content_type.startswith("text/plain") and rec.response == b"pong"
        return [] if ok else [f"{where}: ping answers pong as text/plain"]
    if rec.content_type != "application/json":
        return [f"{where}: content-type {rec.content_type!r}"]
    return schema_problems(spec, schema, json.loads(rec.response), where)


def request_problems(spec: dict[str, Any], rec: Recorded) -> list[str]:
    """A task creation body (what Hestia sends) against the spec and CONTRACT.md's table."""
    if rec.operation != "/project/{project_id}/tasks" or rec.method != "POST":
        return []
    where = f"request {rec.method} {rec.path}"
    (param,) = [
        p for p in spec["paths"][rec.operation]["post"]["parameters"] if p.get("in") == "body"
    ]
    try:
        body = rec.json
    except ValueError:
        return []  # a test's deliberately broken request (the fake answers 400)
    unknown = set(body) - TASK_BODY_FIELDS
    problems = [f"{where}: fields Semaphore ignores: {sorted(unknown)}"] if unknown else []
    schema = dict(param["schema"])
    listed = {k: v for k, v in schema["properties"].items() if k in body}
    schema["properties"] = listed  # a client sends only what it sets
    problems += schema_problems(spec, schema, body, where)
    if "environment" in body:
        extra = json.loads(body["environment"])
        if not isinstance(extra, dict):
            problems.append(f"{where}: environment is a JSON object as a string")
    return problems


def spec_problems(requests: list[Recorded]) -> list[str]:
    spec = load_spec()
    problems: list[str] = []
    for rec in requests:
        if not rec.off_spec:
            problems += response_problems(spec, rec)
        problems += request_problems(spec, rec)
    return problems


# ------------------------------------------------------------------ fixtures
@pytest.fixture
async def fake() -> AsyncIterator[FakeSemaphore]:
    server = FakeSemaphore()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
    assert spec_problems(server.requests) == []


@pytest.fixture
def host(tmp_path: Path) -> Iterator[HostService]:
    service = HostService(tmp_path / "www")
    try:
        yield service
    finally:
        service.reap()


def templates(fake: FakeSemaphore, host: HostService) -> tuple[FakeTemplate, FakeTemplate]:
    return (
        fake.add_template("start web", host.start_playbook()),
        fake.add_template("stop web", host.stop_playbook()),
    )


async def gateway(
    gateway_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    host: HostService,
    *,
    token: str,
    project_id: int = 1,
    **service: Any,
) -> Any:
    monkeypatch.setenv(TOKEN_ENV, token)
    raw: dict[str, Any] = {
        "docker": {"enabled": False, "reconcile_interval": 0},
        "semaphore": {"url": url, "token": "${" + TOKEN_ENV + "}", "project_id": project_id},
        "services": {
            "web": {
                "backend": "semaphore",
                "url": host.url,
                "start_template": "start web",
                "stop_template": "stop web",
                "environment": {"unit": "web"},
                "startup_timeout": "30s",
                **service,
            }
        },
    }
    backends = build_backends(parse_config(raw))
    assert set(backends) == {"semaphore"}
    return await gateway_factory(raw, backends)


def client(gw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gw.url, timeout=60)


# ------------------------------------------------------------------ the whole path
async def test_request_starts_the_host_service_by_a_task_and_idle_stops_it(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    start, stop = templates(fake, host)
    gw = await gateway(
        gateway_factory, monkeypatch, fake.url, host, token=fake.token, idle_timeout="1s"
    )
    async with client(gw) as c:
        r = await c.get("/services/web/")
        assert r.status_code == 200 and "hello from the host service" in r.text
        (created,) = fake.created()
        assert created.headers["authorization"] == f"Bearer {fake.token}"
        assert created.json == {
            "template_id": start.id,
            "message": "Hestia: start service web",
            "environment": json.dumps({"unit": "web"}),
        }
        (task,) = fake.tasks_of(start)
        assert task.history == ["waiting", "starting", "running", "success"]
        assert host.starts == 1

        # idle: the stop template runs, the process is gone and its port closed
        svc = gw.service("web")
        await wait_for(lambda: svc.state is State.STOPPED, 20, "the idle stop")
        (stopped,) = fake.tasks_of(stop)
        assert stopped.status == "success" and stopped.extra_vars == {"unit": "web"}
        assert not host.running and host.stops == 1
        assert not await tcp_probe("127.0.0.1", host.port)
        status = (await c.get("/v1/services/web/status")).json()
        assert status["backend"] == "semaphore" and status["state"] == "stopped"
        assert status["last_stop"]["cause"] == "idle"

        # the next request starts it again, with the template already resolved
        r = await c.get("/services/web/index.html")
        assert r.status_code == 200 and len(fake.tasks_of(start)) == 2
        lists = [q for q in fake.requests if q.path.endswith("/templates")]
        assert len(lists) == 1


async def test_a_task_ending_in_error_is_503_with_task_id_and_output(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    fake.add_template("start web", failing_playbook("Could not find the requested service web"))
    stop = fake.add_template("stop web", host.stop_playbook())
    gw = await gateway(gateway_factory, monkeypatch, fake.url, host, token=fake.token)
    async with client(gw) as c:
        r = await c.get("/services/web/")
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "start_failed" and err["service"] == "web"
        (task,) = fake.tasks.values()
        assert task.status == "error"
        assert f"Semaphore task {task.id}" in err["message"]
        assert "Could not find the requested service web" in err["message"]
        assert err["detail"]["semaphore_task_id"] == task.id
        assert err["detail"]["semaphore_task_status"] == "error"
        assert any("FAILED!" in line for line in err["detail"]["output"])
        status = (await c.get("/v1/services/web/status")).json()
        assert status["state"] == "failed"
        assert status["last_error"]["detail"]["semaphore_task_id"] == task.id
    assert fake.tasks_of(stop) == []  # nothing was running: nothing to stop


async def test_a_wrong_token_is_a_clear_error_naming_semaphore_and_the_401(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    templates(fake, host)
    gw = await gateway(gateway_factory, monkeypatch, fake.url, host, token="not-the-token")
    async with client(gw) as c:
        r = await c.get("/services/web/")
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "backend_error" and err["detail"]["semaphore_status"] == 401
    assert "Semaphore" in err["message"] and "401" in err["message"]
    assert "semaphore.token" in err["message"]
    assert [q.status for q in fake.requests] == [401]
    assert fake.tasks == {}


async def test_a_project_the_user_cannot_see_is_named(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    templates(fake, host)
    gw = await gateway(gateway_factory, monkeypatch, fake.url, host, token=fake.token, project_id=7)
    async with client(gw) as c:
        r = await c.get("/services/web/")
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    assert "has no project 7" in message and "semaphore.project_id" in message


async def test_semaphore_down_is_a_clear_503(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, host: HostService
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    gw = await gateway(gateway_factory, monkeypatch, down, host, token="t")
    async with client(gw) as c:
        r = await c.get("/services/web/")
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "backend_unreachable"
        assert f"Semaphore at {down} is unreachable" in err["message"]
        assert "(connection refused)" in err["message"]
        assert "semaphore.url" in err["message"]
        status = (await c.get("/v1/services/web/status")).json()
        assert status["state"] == "failed" and "Semaphore" in status["last_error"]["message"]


async def test_a_start_timeout_stops_the_task_in_semaphore(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    start = fake.add_template("start web", hanging_playbook())
    fake.add_template("stop web", host.stop_playbook())
    gw = await gateway(
        gateway_factory, monkeypatch, fake.url, host, token=fake.token, startup_timeout="1.5s"
    )
    async with client(gw) as c:
        r = await c.get("/services/web/")
    assert r.status_code == 504 and r.json()["error"]["code"] == "start_timeout"
    (task,) = fake.tasks_of(start)
    await wait_for(lambda: task.status == "stopped", 10, "the task to be stopped")
    assert task.history == ["waiting", "starting", "running", "stopping", "stopped"]
    (asked,) = [q for q in fake.requests if q.path.endswith(f"/tasks/{task.id}/stop")]
    assert asked.json == {"force": False} and asked.status == 204


async def test_a_task_that_succeeds_without_a_service_times_out_and_runs_the_stop(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    # success but nothing listens: counted as booting (not exited) until startup_timeout;
    # then on_start_failure: stop runs the stop template
    fake.add_template("start web", no_op_playbook())
    stop = fake.add_template("stop web", host.stop_playbook())
    gw = await gateway(
        gateway_factory, monkeypatch, fake.url, host, token=fake.token, startup_timeout="1.5s"
    )
    async with client(gw) as c:
        r = await c.get("/services/web/")
    assert r.status_code == 504 and r.json()["error"]["code"] == "start_timeout"
    await wait_for(
        lambda: [t.status for t in fake.tasks_of(stop)] == ["success"], 10, "the stop task"
    )
    assert gw.service("web").state is State.FAILED


async def test_a_host_service_running_without_hestia_is_adopted(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    _, stop = templates(fake, host)
    host.spawn()
    await wait_for(lambda: tcp_probe("127.0.0.1", host.port), 10, "the host service")
    gw = await gateway(gateway_factory, monkeypatch, fake.url, host, token=fake.token)
    svc = gw.service("web")
    await wait_for(lambda: svc.state is State.READY, 10, "the adoption")
    async with client(gw) as c:
        r = await c.get("/services/web/")
        assert r.status_code == 200
        assert fake.created() == []  # adopted, not started
        r = await c.post("/v1/services/web/stop?wait=true")
        assert r.status_code == 200 and r.json()["state"] == "stopped"
    assert [t.status for t in fake.tasks_of(stop)] == ["success"]
    assert not host.running


async def test_a_host_service_stopped_outside_hestia_is_started_by_the_next_request(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    start, _ = templates(fake, host)
    host.spawn()
    await wait_for(lambda: tcp_probe("127.0.0.1", host.port), 10, "the host service")
    gw = await gateway(gateway_factory, monkeypatch, fake.url, host, token=fake.token)
    await wait_for(lambda: gw.service("web").state is State.READY, 10, "the adoption")
    await host.terminate()  # `systemctl stop` by hand
    async with client(gw) as c:
        r = await c.get("/services/web/")  # refused, noticed, held for the start task
    assert r.status_code == 200 and "hello from the host service" in r.text
    assert [t.status for t in fake.tasks_of(start)] == ["success"]


async def test_a_failed_stop_task_leaves_the_service_failed_with_the_reason(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    fake.add_template("start web", host.start_playbook())
    fake.add_template("stop web", failing_playbook("Unit web.service is masked", "stop"))
    host.spawn()
    await wait_for(lambda: tcp_probe("127.0.0.1", host.port), 10, "the host service")
    gw = await gateway(gateway_factory, monkeypatch, fake.url, host, token=fake.token)
    await wait_for(lambda: gw.service("web").state is State.READY, 10, "the adoption")
    async with client(gw) as c:
        await c.post("/v1/services/web/stop?wait=true")
        status = (await c.get("/v1/services/web/status")).json()
    assert status["state"] == "failed"
    assert status["last_error"]["code"] == "stop_failed"
    assert "Unit web.service is masked" in status["last_error"]["message"]


async def test_template_names_resolve_once_and_again_when_semaphore_refuses_one(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    start, _ = templates(fake, host)
    gw = await gateway(gateway_factory, monkeypatch, fake.url, host, token=fake.token)
    async with client(gw) as c:
        assert (await c.get("/services/web/")).status_code == 200
        await c.post("/v1/services/web/stop?wait=true")
        # the template is re-created in Semaphore (a new id): the cached id gets a 500
        del fake.templates[start.id]
        again = fake.add_template("start web", host.start_playbook())
        assert again.id != start.id
        assert (await c.get("/services/web/")).status_code == 200
    tries = [(q.json["template_id"], q.status) for q in fake.created()]
    assert tries[-2:] == [(start.id, 500), (again.id, 201)]


async def test_an_unknown_template_names_the_ones_there_are(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    templates(fake, host)
    gw = await gateway(
        gateway_factory, monkeypatch, fake.url, host, token=fake.token, start_template="strat web"
    )
    async with client(gw) as c:
        r = await c.get("/services/web/")
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    assert "start_template 'strat web' is not a template of Semaphore project 1" in message
    assert "'start web' (id 1)" in message and "services.web.start_template" in message
    assert fake.tasks == {}


async def test_extra_vars_for_a_template_without_environment_are_refused_up_front(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    fake.add_template("start web", host.start_playbook(), environment_id=None)
    fake.add_template("stop web", host.stop_playbook())
    gw = await gateway(gateway_factory, monkeypatch, fake.url, host, token=fake.token)
    async with client(gw) as c:
        r = await c.get("/services/web/")
    assert r.status_code == 502 and "has no Environment" in r.json()["error"]["message"]
    assert fake.created() == []


async def test_an_answer_of_an_unexpected_shape_names_the_api_version(
    gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, fake: FakeSemaphore, host: HostService
) -> None:
    templates(fake, host)
    fake.templates_as_object = True  # as if a newer Semaphore wrapped its lists
    gw = await gateway(gateway_factory, monkeypatch, fake.url, host, token=fake.token)
    async with client(gw) as c:
        r = await c.get("/services/web/")
    assert r.status_code == 502
    err = r.json()["error"]
    assert "Semaphore" in err["message"] and SEMAPHORE_API_VERSION in err["message"]
    assert err["detail"]["semaphore_api_version"] == SEMAPHORE_API_VERSION


# ------------------------------------------------------------------ the fake against the spec
async def test_every_answer_of_the_fake_follows_semaphores_spec(
    fake: FakeSemaphore, host: HostService
) -> None:
    start, _ = templates(fake, host)
    auth = {"Authorization": f"Bearer {fake.token}"}
    async with httpx.AsyncClient(base_url=f"{fake.url}/api", headers=auth, timeout=10) as api:
        assert (await api.get("/ping", headers={"Authorization": ""})).text == "pong"
        assert (await api.get("/project/1/templates", headers={"Authorization": "x"})).status_code
        templates_list = (await api.get("/project/1/templates")).json()
        assert [t["name"] for t in templates_list] == ["start web", "stop web"]
        assert (await api.get(f"/project/1/templates/{start.id}")).status_code == 200
        assert (await api.get("/project/1/templates/99")).status_code == 404
        assert (await api.get("/project/x/templates")).status_code == 400
        assert (await api.get("/project/2/templates")).status_code == 404
        assert (await api.get("/nothing/here")).status_code == 404
        r = await api.post("/project/1/tasks", json={"template_id": start.id, "environment": "{}"})
        assert r.status_code == 201 and r.json()["status"] == "waiting"
        task_id = r.json()["id"]
        assert (await api.post("/project/1/tasks", content=b"{not json")).status_code == 400
        assert (await api.post("/project/1/tasks", json={"template_id": 99})).status_code == 500
        await wait_for(lambda: fake.tasks[task_id].status == "success", 10, "the task")
        assert (await api.get(f"/project/1/tasks/{task_id}")).json()["status"] == "success"
        output = (await api.get(f"/project/1/tasks/{task_id}/output")).json()
        assert output[0]["output"] == f"Task {task_id} added to queue"
        assert (await api.get("/project/1/tasks")).status_code == 200
        assert (await api.get("/project/1/tasks/99")).status_code == 400  # (code) not 404
        assert (await api.get("/project/1/tasks/99/output")).status_code == 400
        assert (await api.post("/project/1/tasks/99/stop", json={})).status_code == 400
        assert (await api.post(f"/project/1/tasks/{task_id}/stop")).status_code == 400  # no body
        assert (await api.post(f"/project/1/tasks/{task_id}/stop", json={})).status_code == 204
        assert fake.tasks[task_id].status == "stopped"  # (code) even after success
    used = {(q.method, q.operation) for q in fake.requests if q.status < 300}
    assert {
        ("GET", "/project/{project_id}/templates"),
        ("POST", "/project/{project_id}/tasks"),
        ("GET", "/project/{project_id}/tasks/{task_id}"),
        ("GET", "/project/{project_id}/tasks/{task_id}/output"),
        ("POST", "/project/{project_id}/tasks/{task_id}/stop"),
    } <= used
    assert spec_problems(fake.requests) == []


def test_the_spec_check_catches_a_drifting_fake() -> None:
    spec = load_spec()
    task = {
        "id": 1,
        "template_id": 1,
        "status": "success",
        "debug": False,
        "playbook": "",
        "environment": "",
        "secret": "",
        "limit": "",
        "git_branch": None,
    }
    good = Recorded(
        "GET", "/api/project/1/tasks/1", "/project/{project_id}/tasks/{task_id}", {}, b""
    )
    good.status, good.content_type = 200, "application/json"
    good.response = json.dumps(task).encode()
    assert response_problems(spec, good) == []
    for drift, expected in [
        ({**task, "status": 3}, "status"),
        ({k: v for k, v in task.items() if k != "secret"}, "secret: missing"),
        ({**task, "id": None}, ".id: null"),
    ]:
        good.response = json.dumps(drift).encode()
        problems = response_problems(spec, good)
        assert problems and expected in problems[0], (drift, problems)
    good.status, good.response = 201, b""  # a status neither the spec nor the code gives
    assert response_problems(spec, good) != []


# ------------------------------------------------------------------ config
def _raw(**semaphore: Any) -> dict[str, Any]:
    return {
        "semaphore": {"url": "http://semaphore:3000", "project_id": 1, **semaphore},
        "services": {
            "web": {
                "backend": "semaphore",
                "url": "http://127.0.0.1:8096",
                "start_template": 1,
                "stop_template": "stop web",
            }
        },
    }


def test_token_from_env_from_file_and_the_errors_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HESTIA_T_TOKEN", "abc")
    monkeypatch.setenv("HESTIA_T_EMPTY", "")
    config = parse_config(_raw(token="${HESTIA_T_TOKEN}"))
    assert config.semaphore is not None and config.semaphore.api_token() == "abc"
    assert "abc" not in repr(config.semaphore)
    secret = tmp_path / "token"
    secret.write_text("from-a-file\n")
    config = parse_config(_raw(token_file=str(secret)))
    assert config.semaphore is not None and config.semaphore.api_token() == "from-a-file"
    spec = config.resolve("web")
    assert spec.instance == "web" and spec.start_template == 1
    assert spec.stop_template == "stop web"
    for raw, message in [
        (_raw(token="${HESTIA_T_MISSING}"), "semaphore.token: the environment variable "),
        (_raw(token_file=str(tmp_path / "nope")), "semaphore.token_file: the file "),
        (_raw(), "semaphore: give exactly one of `token`"),
        (_raw(token="${HESTIA_T_EMPTY}"), "semaphore.token: is empty"),
        ({"services": _raw()["services"]}, "services.web.backend: `semaphore` needs the top"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config(raw, source="hestia_config.yml")
        assert message in info.value.message and "hestia_config.yml" in info.value.message


def test_expand_env_substitutes_and_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HESTIA_T_A", "x")
    assert expand_env("pre-${HESTIA_T_A}-${HESTIA_T_A}") == "pre-x-x"
    assert expand_env("$${HESTIA_T_A}") == "${HESTIA_T_A}"
    assert expand_env(3) == 3
    with pytest.raises(ValueError, match="not an environment variable reference"):
        expand_env("${not valid}")


@pytest.mark.parametrize(
    ("service", "message"),
    [
        ({"start_template": None}, "backend 'semaphore' needs `start_template`"),
        ({"url": None}, "backend 'semaphore' needs `url`"),
        ({"container": "web"}, "container: a semaphore service has no container"),
        ({"health": {"type": "docker"}}, "health.type: `docker` needs a Docker HEALTHCHECK"),
        ({"start_template": True}, "services.web.start_template: a Semaphore template is"),
        ({"backend": "docker", "container": "web"}, "start_template: only for services with"),
    ],
)
def test_semaphore_service_keys_are_validated(service: dict[str, Any], message: str) -> None:
    raw = _raw(token="t")
    entry = {**raw["services"]["web"], **service}
    raw["services"]["web"] = {k: v for k, v in entry.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert message in info.value.message


def test_the_example_playbooks_are_plays_with_tasks() -> None:
    examples = Path(__file__).resolve().parents[1] / "examples" / "semaphore"
    playbooks = sorted(examples.glob("*.yml"))
    assert {p.name for p in playbooks} >= {"start-unit.yml", "stop-unit.yml"}
    for path in playbooks:
        plays = yaml.safe_load(path.read_text())
        assert isinstance(plays, list) and plays, path.name
        for play in plays:
            assert play.get("hosts") and play.get("tasks"), path.name
