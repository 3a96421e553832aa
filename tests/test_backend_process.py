"""The process backend with real processes: tests/process_server.py (a small HTTP server, run
with sys.executable, that listens after a delay) behind a real gateway on 127.0.0.1.

Every process a test starts carries the test's unique tag in its command line; the `tag`
fixture kills whatever still carries it when the test ends, so nothing outlives a test even
when it fails."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hestia.backends import build_backends
from hestia.backends import process as process_module
from hestia.backends.base import BackendEvent
from hestia.backends.process import ProcessBackend
from hestia.config import ProcessConfig, parse_config, parse_config_text
from hestia.errors import ConfigError
from hestia.lifecycle import State
from tests.conftest import free_port, wait_for

SERVER = Path(__file__).with_name("process_server.py")
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers
def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start ticks) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[2]), int(fields[19])


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def group(pgid: int) -> list[int]:
    """Live processes of a process group."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pgid and stat[0] != "Z":
                found.append(int(entry))
    return found


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# a marker for this test's processes (tests/conftest.py `tag`); autouse here: set up first,
# so that what still carries it is killed after the gateways are torn down
pytestmark = pytest.mark.usefixtures("tag")


def service(tag: str, name: str = "llm", **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "backend": "process",
        "command": [sys.executable, str(SERVER), "--port", "${PORT}", "--tag", tag, "--name", name],
        "startup_timeout": "30s",
        "stop_timeout": "5s",
    }
    entry.update(extra)
    return entry


def config(tmp_path: Path, services: dict[str, Any], **process: Any) -> dict[str, Any]:
    return {
        "docker": {"enabled": False},
        "process": {"state_dir": str(tmp_path / "state"), **process},
        "services": services,
    }


async def gateway(gateway_factory: Any, raw: dict[str, Any]) -> Any:
    backends = build_backends(parse_config(raw))
    assert list(backends) == ["process"]
    return await gateway_factory(raw, backends)


def backend_of(gw: Any) -> ProcessBackend:
    backend = gw.gateway.backends["process"]
    assert isinstance(backend, ProcessBackend)
    return backend


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        yield c


# ------------------------------------------------------------------ start, idle, failures
async def test_cold_start_100_concurrent_requests_one_spawn(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    spawns = tmp_path / "spawns.log"
    raw = config(tmp_path, {"llm": service(tag, env={"DELAY": "0.5", "SPAWN_LOG": str(spawns)})})
    gw = await gateway(gateway_factory, raw)
    url = f"{gw.url}/services/llm/"
    answers = await asyncio.gather(*(client.get(url) for _ in range(100)))
    assert [r.status_code for r in answers] == [200] * 100
    bodies = [r.json() for r in answers]
    assert len({b["pid"] for b in bodies}) == 1
    assert len(spawns.read_text().splitlines()) == 1
    assert backend_of(gw).spawns == {"llm": 1}
    # ${PORT}: a free port, given in the argv and as PORT, and the one Hestia proxies to
    port = bodies[0]["port"]
    assert bodies[0]["env"]["PORT"] == str(port)
    status = (await client.get(f"{gw.url}/v1/services/llm/status")).json()
    assert status["backend"] == "process"
    assert status["state"] == "ready"
    assert status["upstream"] == f"http://127.0.0.1:{port}"
    metrics = (await client.get(f"{gw.url}/v1/metrics")).json()
    assert metrics["services"]["llm"]["cold_starts"] == 1
    record = json.loads((tmp_path / "state" / "llm.json").read_text())
    assert record["pid"] == bodies[0]["pid"]
    assert record["start_ticks"] == _stat(record["pid"])[2]  # type: ignore[index]


async def test_idle_stop_ends_the_process_group_and_closes_the_port(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    raw = config(tmp_path, {"llm": service(tag, idle_timeout="300ms")})
    gw = await gateway(gateway_factory, raw)
    body = (await client.get(f"{gw.url}/services/llm/")).json()
    pid, port = body["pid"], body["port"]
    svc = gw.service("llm")
    await wait_for(lambda: svc.state is State.STOPPED, 20, "the idle stop")
    assert svc.last_stop["cause"] == "idle" and not svc.last_stop["killed"]
    assert group(pid) == []
    assert port_closed(port)
    assert not (tmp_path / "state" / "llm.json").exists()
    # the next request starts it again, on a new process
    again = (await client.get(f"{gw.url}/services/llm/")).json()
    assert again["pid"] != pid
    assert backend_of(gw).spawns == {"llm": 2}


async def test_a_command_that_exits_3_fails_the_held_requests_at_once(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    log = tmp_path / "logs" / "llm.log"
    env = {"EXIT_CODE": "3", "EXIT_MESSAGE": "error: cannot open model /models/qwen.gguf"}
    raw = config(tmp_path, {"llm": service(tag, env=env, startup_timeout="10m", log_file=str(log))})
    gw = await gateway(gateway_factory, raw)
    t0 = time.monotonic()
    answers = await asyncio.gather(*(client.get(f"{gw.url}/services/llm/") for _ in range(5)))
    # at once: long before the 10 minute startup_timeout
    assert time.monotonic() - t0 < 60
    for r in answers:
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "start_failed"
        assert error["service"] == "llm"
        assert "exited with code 3 while starting" in error["message"]
        assert "cannot open model /models/qwen.gguf" in error["message"]
        assert error["detail"]["exit_code"] == 3
    status = (await client.get(f"{gw.url}/v1/services/llm/status")).json()
    assert status["state"] == "failed"
    assert "cannot open model" in status["last_error"]["message"]
    assert backend_of(gw).spawns == {"llm": 1}
    assert "cannot open model /models/qwen.gguf" in log.read_text()  # log_file has it all


async def test_a_missing_program_says_so(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    raw = config(tmp_path, {"llm": {"backend": "process", "command": ["no-such-llama", tag]}})
    gw = await gateway(gateway_factory, raw)
    r = await client.get(f"{gw.url}/services/llm/")
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "start_failed"
    assert "cannot run 'no-such-llama'" in error["message"]
    assert "PATH" in error["message"]


async def test_a_child_of_the_server_is_gone_after_stop(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    raw = config(tmp_path, {"llm": service(tag, env={"SPAWN_CHILD": "1"})})
    gw = await gateway(gateway_factory, raw)
    body = (await client.get(f"{gw.url}/services/llm/")).json()
    pid, child = body["pid"], body["child"]
    assert alive(child) and _stat(child)[1] == pid  # type: ignore[index]
    r = await client.post(f"{gw.url}/v1/services/llm/stop", params={"wait": "true"})
    assert r.json()["state"] == "stopped"
    assert not alive(child)
    assert group(pid) == []


async def test_sigkill_after_stop_timeout_for_a_server_that_ignores_sigterm(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    raw = config(tmp_path, {"llm": service(tag, env={"IGNORE_TERM": "1"}, stop_timeout="500ms")})
    gw = await gateway(gateway_factory, raw)
    pid = (await client.get(f"{gw.url}/services/llm/")).json()["pid"]
    r = await client.post(f"{gw.url}/v1/services/llm/stop", params={"wait": "true"})
    status = r.json()
    assert status["state"] == "stopped"
    assert status["last_stop"]["killed"] is True
    assert group(pid) == []


async def test_a_stop_signal_of_choice(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    """SIGINT ends the server (Python's KeyboardInterrupt), with no SIGKILL needed."""
    raw = config(tmp_path, {"llm": service(tag, stop_signal="INT", stop_timeout="20s")})
    gw = await gateway(gateway_factory, raw)
    pid = (await client.get(f"{gw.url}/services/llm/")).json()["pid"]
    status = (await client.post(f"{gw.url}/v1/services/llm/stop", params={"wait": "true"})).json()
    assert status["last_stop"]["killed"] is False
    assert group(pid) == []
    log = (tmp_path / "state" / "llm.log").read_text()
    assert "KeyboardInterrupt" in log  # it was SIGINT, not SIGTERM


async def test_an_exit_while_ready_stops_or_fails_and_the_next_request_starts_again(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    raw = config(tmp_path, {"llm": service(tag, env={"SPAWN_CHILD": "1"})})
    gw = await gateway(gateway_factory, raw)
    svc = gw.service("llm")
    first = (await client.get(f"{gw.url}/services/llm/")).json()
    await client.get(f"{gw.url}/services/llm/exit/0")
    await wait_for(lambda: svc.state is State.STOPPED, 10, "stopped after exit 0")
    assert svc.last_error is None
    # what the leader left in its group goes too
    await wait_for(lambda: not alive(first["child"]), 10, "the orphaned child to be stopped")

    second = (await client.get(f"{gw.url}/services/llm/")).json()
    assert second["pid"] != first["pid"]
    await client.get(f"{gw.url}/services/llm/exit/5")
    await wait_for(lambda: svc.state is State.FAILED, 10, "failed after exit 5")
    assert svc.last_error is not None
    assert svc.last_error["code"] == "instance_exited"
    assert svc.last_error["detail"]["exit_code"] == 5
    assert "GET /exit/5" in svc.last_error["message"]  # its last output lines

    third = (await client.get(f"{gw.url}/services/llm/")).json()
    assert third["pid"] not in (first["pid"], second["pid"])
    assert svc.state is State.READY
    assert backend_of(gw).spawns == {"llm": 3}


async def test_port_env_cwd_substitution(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    fixed = free_port()
    work = tmp_path / "work"
    work.mkdir()
    entry = service(
        tag,
        url=f"http://127.0.0.1:{fixed}",
        cwd="${T_WORK}",
        env={"T_GREETING": "hello on ${PORT}", "T_NAME": "named-${PORT}", "T_WORK": str(work)},
    )
    entry["command"][-1] = "${T_NAME}"  # --name ${T_NAME}: env keys are variables too
    gw = await gateway(gateway_factory, config(tmp_path, {"llm": entry}))
    body = (await client.get(f"{gw.url}/services/llm/")).json()
    assert body["port"] == fixed  # the url's port is PORT
    assert body["env"]["PORT"] == str(fixed)
    assert body["env"]["T_GREETING"] == f"hello on {fixed}"
    assert body["name"] == f"named-{fixed}"
    assert body["cwd"] == str(work)


async def test_a_fixed_port_in_use_is_refused(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    """Something else on the url's port would pass the readiness probe: not started."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        raw = config(tmp_path, {"llm": service(tag, url=f"http://127.0.0.1:{port}")})
        gw = await gateway(gateway_factory, raw)
        r = await client.get(f"{gw.url}/services/llm/")
        assert r.status_code == 503
        assert f"something already listens on 127.0.0.1:{port}" in r.json()["error"]["message"]
        assert backend_of(gw).spawns == {}


# ------------------------------------------------------------------ restarts and adoption
async def test_keep_on_exit_and_adoption_by_the_next_gateway(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    first = await gateway(
        gateway_factory, config(tmp_path, {"llm": service(tag)}, keep_on_exit=True)
    )
    body = (await client.get(f"{first.url}/services/llm/")).json()
    pid = body["pid"]
    await first.stop()
    assert alive(pid), "keep_on_exit: the process outlives Hestia"
    assert (tmp_path / "state" / "llm.json").exists()

    second = await gateway(gateway_factory, config(tmp_path, {"llm": service(tag)}))
    svc = second.service("llm")
    await wait_for(lambda: svc.state is State.READY, 20, "the process to be adopted")
    again = (await client.get(f"{second.url}/services/llm/")).json()
    assert again["pid"] == pid
    assert backend_of(second).spawns == {}
    await second.stop()  # without keep_on_exit: Hestia's shutdown stops it
    assert group(pid) == []
    assert not (tmp_path / "state" / "llm.json").exists()


async def test_adoption_after_the_gateway_was_killed(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    """A real `hestia serve` killed with SIGKILL: its process lives on (its output goes to a
    file, not to a pipe whose reader died) and the next gateway adopts it."""
    raw = config(tmp_path, {"llm": service(tag)})
    raw["database"] = {"url": f"sqlite:///{tmp_path}/killed.db"}
    (tmp_path / "hestia.yml").write_text(json.dumps(raw))  # JSON is YAML
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = ["serve", "--config", str(tmp_path / "hestia.yml"), "--port", str(port)]
    hestia = subprocess.Popen(  # noqa: ASYNC220 - the gateway under test, killed below
        [sys.executable, "-m", "hestia", *argv, "--host", "127.0.0.1", "--log-format", "text"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        async def served() -> bool:
            try:
                return (await client.get(f"{url}/services/llm/")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(served, 60, "the killed-to-be gateway to serve llm")
        body = (await client.get(f"{url}/services/llm/")).json()
    finally:
        hestia.kill()
        hestia.wait(10)
    pid, own_port = body["pid"], body["port"]
    assert alive(pid)
    # it still serves (and logs each request) with its parent gone
    direct = await client.get(f"http://127.0.0.1:{own_port}/")
    assert direct.json()["pid"] == pid

    second = await gateway(gateway_factory, raw)
    again = (await client.get(f"{second.url}/services/llm/")).json()
    assert again["pid"] == pid
    assert backend_of(second).spawns == {}
    await second.stop()
    assert group(pid) == []


@pytest.mark.parametrize("mismatch", ["start_time", "boot_id"])
async def test_a_recycled_pid_is_never_adopted(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str, mismatch: str
) -> None:
    """A record whose PID now belongs to another process (another start time, or another
    boot) is dropped: that process is neither adopted nor stopped."""
    stranger = subprocess.Popen(  # noqa: ASYNC220 - a process Hestia must leave alone
        [sys.executable, "-c", "import time; time.sleep(120)", tag]
    )
    try:
        await wait_for(lambda: _stat(stranger.pid) is not None, 10, "the stranger")
        ticks = _stat(stranger.pid)[2]  # type: ignore[index]
        state = tmp_path / "state"
        state.mkdir()
        record = {
            "version": 1,
            "service": "llm",
            "pid": stranger.pid,
            "start_ticks": ticks + 1 if mismatch == "start_time" else ticks,
            "boot_id": process_module._boot_id()
            if mismatch == "start_time"
            else "00000000-0000-0000-0000-000000000000",
            "url": "http://127.0.0.1:9",
            "host": "127.0.0.1",
            "port": 9,
            "log_path": str(state / "llm.log"),
            "own_log": True,
            "log_offset": 0,
            "started_at": time.time(),
        }
        (state / "llm.json").write_text(json.dumps(record))
        gw = await gateway(gateway_factory, config(tmp_path, {"llm": service(tag)}))
        body = (await client.get(f"{gw.url}/services/llm/")).json()
        assert body["pid"] != stranger.pid
        assert backend_of(gw).spawns == {"llm": 1}
        await gw.stop()
        assert alive(stranger.pid), "a process Hestia did not start was stopped"
        assert group(body["pid"]) == []
    finally:
        stranger.kill()
        stranger.wait(10)


# ------------------------------------------------------------------ with the rest of Hestia
async def test_exclusive_group_swap_lets_the_stream_finish_first(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    release = tmp_path / "release"
    env = {"RELEASE": str(release)}
    raw = config(
        tmp_path,
        {
            "a": service(tag, "a", env=env, exclusive_group="gpu"),
            "b": service(tag, "b", env=env, exclusive_group="gpu"),
        },
    )
    gw = await gateway(gateway_factory, raw)
    backend = backend_of(gw)
    a, b = gw.service("a"), gw.service("b")
    a_pid = (await client.get(f"{gw.url}/services/a/")).json()["pid"]
    async with client.stream("GET", f"{gw.url}/services/a/stream") as stream:
        lines = stream.aiter_lines()
        assert await anext(lines) == "a tick"
        swap = asyncio.create_task(client.get(f"{gw.url}/services/b/"))
        await wait_for(lambda: a.state is State.STOPPING, 10, "a to be stopping for b")
        # a drains: its process runs on, b is not started while a's stream is open
        assert alive(a_pid)
        assert backend.spawns.get("b", 0) == 0
        assert b.state is State.STARTING
        release.touch()
        rest = [line async for line in lines]
    assert rest[-1] == "a done"
    answer = await asyncio.wait_for(swap, 30)
    assert answer.status_code == 200
    assert answer.json()["name"] == "b"
    assert (a.state, b.state) == (State.STOPPED, State.READY)
    assert group(a_pid) == []
    assert a.last_stop["cause"] == "exclusive"


async def test_keep_warm_starts_a_process_service_without_a_request(
    gateway_factory: Any, tmp_path: Path, tag: str
) -> None:
    gw = await gateway(gateway_factory, config(tmp_path, {"llm": service(tag, keep_warm=True)}))
    svc = gw.service("llm")
    await wait_for(lambda: svc.state is State.READY, 20, "keep_warm to start it")
    assert backend_of(gw).spawns == {"llm": 1}


async def test_reconfigure_takes_effect_at_the_next_start(
    gateway_factory: Any, client: httpx.AsyncClient, tmp_path: Path, tag: str
) -> None:
    """Live reload: a changed env or command never kills the running process; the next start
    uses it."""
    raw = config(tmp_path, {"llm": service(tag, env={"T_VERSION": "1"})})
    gw = await gateway(gateway_factory, raw)
    svc = gw.service("llm")
    first = (await client.get(f"{gw.url}/services/llm/")).json()
    # what a live reload does: the registry re-derives the services from the new config
    registry = gw.gateway.registry
    registry.config = parse_config(config(tmp_path, {"llm": service(tag, env={"T_VERSION": "2"})}))
    await registry.reconcile()
    assert svc.config.env == {"T_VERSION": "2"}
    still = (await client.get(f"{gw.url}/services/llm/")).json()
    assert (still["pid"], still["env"]["T_VERSION"]) == (first["pid"], "1")
    await client.post(f"{gw.url}/v1/services/llm/stop", params={"wait": "true"})
    fresh = (await client.get(f"{gw.url}/services/llm/")).json()
    assert fresh["pid"] != first["pid"]
    assert fresh["env"]["T_VERSION"] == "2"


# ------------------------------------------------------------------ the backend alone
@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "poll"])
async def test_exit_is_reported_as_a_die_event(
    tmp_path: Path, tag: str, pidfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_module, "_PIDFD", pidfd and process_module._PIDFD)
    raw = config(tmp_path, {"llm": service(tag, env={"EXIT_CODE": "7", "EXIT_MESSAGE": "boom"})})
    spec = parse_config(raw).resolve("llm")
    backend = ProcessBackend(ProcessConfig(), tmp_path / "state")
    events = backend.events()
    try:
        await backend.start("llm", spec)
        event: BackendEvent = await asyncio.wait_for(anext(events), 20)
        assert (event.kind, event.id, event.exit_code, event.crashed) == ("die", "llm", 7, True)
        assert "boom" in event.reason
        info = await backend.inspect("llm", spec)
        assert (info.running, info.status, info.exit_code) == (False, "exited", 7)
        assert (await backend.logs_tail("llm", 1)) == "boom"
    finally:
        await backend.close()


async def test_output_files_are_rotated_past_log_max_size(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    path.write_bytes(b"old line\n" * 20000)  # 180 KB
    process_module._rotate(path, 64 * 1024)
    assert path.stat().st_size == 0
    assert path.with_name("svc.log.1").stat().st_size == 180000
    process_module._rotate(path, 64 * 1024)  # under the limit: left alone
    assert path.with_name("svc.log.1").stat().st_size == 180000


# ------------------------------------------------------------------ config
BAD: list[tuple[dict[str, Any], str]] = [
    ({"backend": "process"}, "services.x: backend 'process' needs `command`"),
    ({"backend": "process", "command": "llama-server --port 1"}, "services.x.command: a list"),
    ({"backend": "process", "command": []}, "needs at least the program"),
    ({"backend": "process", "command": ["a", "${NOPE_NOT_SET}"]}, "command[1]: ${NOPE_NOT_SET}"),
    ({"backend": "process", "command": ["a"], "env": {"PORT": "1"}}, "env: PORT is Hestia's"),
    ({"backend": "process", "command": ["a"], "env": {"A": True}}, "env: A: quote the value"),
    ({"backend": "process", "command": ["a"], "env": {"A": "${NOPE_X}"}}, "env.A: ${NOPE_X}"),
    ({"backend": "process", "command": ["a"], "stop_signal": "SIGSTOP"}, "stop_signal: 'SIGSTOP'"),
    ({"backend": "process", "command": ["a"], "stop_signal": "NOPE"}, "stop_signal: 'NOPE'"),
    ({"backend": "process", "command": ["a"], "port": 8080}, "port: a process service's port"),
    ({"backend": "process", "command": ["a"], "container": "c"}, "container: a process"),
    ({"backend": "process", "command": ["a"], "url": "http://h:${PORT}/${X}"}, "url: "),
    ({"backend": "process", "command": ["a"], "url": "http://${PORT}:80"}, "goes in the port"),
    ({"backend": "process", "command": ["a"], "url": "https://h:${PORT}"}, "url: 'https://h:1'"),
    ({"backend": "process", "command": ["a"], "health": {"type": "docker"}}, "health.type"),
    ({"container": "c", "command": ["a"]}, "command: only for services with `backend: process`"),
    ({"url": "http://h:1", "env": {"A": "1"}}, "env: only for services with `backend: process`"),
]


@pytest.mark.parametrize(("entry", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_process_config_names_the_key(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"services": {"x": entry}}, source="hestia.yml")
    assert caught.value.message.startswith("invalid config in hestia.yml: services.x")
    assert message in caught.value.message


def test_process_config_values() -> None:
    cfg = parse_config(
        {
            "database": {"url": "sqlite:////var/lib/hestia/hestia.db"},
            "services": {
                "x": {
                    "backend": "process",
                    "command": ["llama-server", "--threads", 8, "--port", "${PORT}"],
                    "env": {"CUDA_VISIBLE_DEVICES": 0},
                    "stop_signal": "int",
                    "url": "http://127.0.0.1:${PORT}/v1",
                }
            },
        }
    )
    spec = cfg.resolve("x")
    assert spec.command == ["llama-server", "--threads", "8", "--port", "${PORT}"]
    assert spec.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert spec.stop_signal == "SIGINT"
    # the url is the backend's (its port is known at start only): never a fixed upstream
    assert (spec.url, spec.process_url) == (None, "http://127.0.0.1:${PORT}/v1")
    assert (spec.instance, spec.backend_key) == ("x", "process")
    assert cfg.process_state_dir() == Path("/var/lib/hestia/processes")
    assert cfg.process.keep_on_exit is False


def test_the_process_backend_is_off_in_the_container_unless_enabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entry = {"backend": "process", "command": ["llama-server"]}
    monkeypatch.setenv("HESTIA_IN_CONTAINER", "1")
    with pytest.raises(ConfigError, match="Hestia runs in its Docker image"):
        parse_config({"services": {"x": entry}})
    on = parse_config({"process": {"enabled": True}, "docker": {"enabled": False}})
    assert list(build_backends(on)) == ["process"]
    monkeypatch.delenv("HESTIA_IN_CONTAINER")
    with pytest.raises(ConfigError, match=r"process\.enabled is false"):
        parse_config({"process": {"enabled": False}, "services": {"x": entry}})
    # built only when a service uses it (or process.enabled says so)
    assert build_backends(parse_config({"docker": {"enabled": False}})) == {}
    used = parse_config({"docker": {"enabled": False}, "services": {"x": entry}})
    assert list(build_backends(used)) == ["process"]


def test_the_readme_process_example_loads() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Host processes on demand", 1)[1].split("\n## ", 1)[0]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = parse_config_text(example, source="README.md")
    spec = cfg.resolve("qwen")
    assert spec.command == ["llama-server", "-m", "/models/qwen.gguf", "--port", "${PORT}"]
    assert (spec.process_url, spec.stop_signal, spec.exclusive_group) == (
        "http://127.0.0.1:${PORT}",
        "SIGTERM",
        "gpu",
    )
    assert list(build_backends(cfg)) == ["process"]
