"""Data-plane workers (`server.workers: 2`), end to end: `hestia serve` as a real process tree
(the controller and its workers), real host processes as services (`backend: process`), real
SIGSTOP and SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

from hestia.workers import usable_cpus, worker_count
from tests.conftest import free_port, tagged_pids, wait_for
from tests.test_access_log import _upstream
from tests.test_backend_process import SERVER
from tests.test_proxy import UpstreamApp


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _kill_tree(pid: int) -> None:
    for child in _children(pid):
        _kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Gateway:
    """`hestia serve` with `server.workers: 2`; its stdout goes to a file."""

    def __init__(self, tmp_path: Path, services: dict[str, Any], **extra: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server = {"host": "127.0.0.1", "port": self.port, "workers": 2, **extra.pop("server", {})}
        config = {
            "server": server,
            "docker": {"enabled": False},
            "database": {"url": f"sqlite:///{tmp_path}/h.db"},
            "process": {"state_dir": str(tmp_path / "state")},
            "services": services,
            **extra,
        }
        cfg = tmp_path / "hestia_config.yml"
        cfg.write_text(json.dumps(config))
        self.log = tmp_path / "hestia.log"
        env = {k: v for k, v in os.environ.items() if k != "HESTIA_LOG_FORMAT"}
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hestia", "serve", "--config", str(cfg)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
        )

    async def ready(self, client: httpx.AsyncClient) -> None:
        async def workers_up() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            if len(self.workers()) != 2:
                return False
            try:
                return (await client.get(f"{self.url}/v1/health")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(workers_up, 30, "the controller and two workers")

    def workers(self) -> list[int]:
        return _children(self.proc.pid)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                _kill_tree(self.proc.pid)
                self.proc.wait(5)
        self._out.close()


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    running: list[Gateway] = []
    yield running
    for gw in running:
        workers = gw.workers()
        gw.stop()
        for pid in workers:
            _kill_tree(pid)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        yield c


def process_service(tag: str, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "backend": "process",
        "command": [sys.executable, str(SERVER), "--port", "${PORT}", "--tag", tag],
        "startup_timeout": "30s",
        "stop_timeout": "5s",
    }
    entry.update(extra)
    return entry


async def status(client: httpx.AsyncClient, gw: Gateway, name: str) -> dict[str, Any]:
    answer: dict[str, Any] = (await client.get(f"{gw.url}/v1/services/{name}/status")).json()
    return answer


async def served_by_a_worker(
    client: httpx.AsyncClient, gw: Gateway, path: str, headers: dict[str, str] | None = None
) -> None:
    """Wait until `path` is answered while the controller is stopped (SIGSTOP): the workers
    have the service on their fast path. (Between tries the controller runs, so that it can
    send the workers its table.)"""

    async def answered_alone() -> bool:
        os.kill(gw.proc.pid, signal.SIGSTOP)
        try:
            answer = await client.get(gw.url + path, headers=headers, timeout=0.5)
            return answer.status_code == 200
        except httpx.HTTPError:
            return False
        finally:
            os.kill(gw.proc.pid, signal.SIGCONT)

    await wait_for(answered_alone, 20, f"{path} served by a worker alone")


def test_worker_count(tmp_path: Path) -> None:
    assert worker_count(1) == 1
    assert worker_count(3) == 3
    cpus = len(os.sched_getaffinity(0))

    def auto(n: int) -> int:  # the rule: one per CPU up to 8, one process below 3 CPUs
        return 1 if n < 3 else min(n, 8)

    none = tmp_path / "none"  # no cgroup files: the affinity
    assert worker_count("auto", none) == auto(cpus)
    # a container's CPU quota (cgroup v2 cpu.max, then v1), rounded up, caps it
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(v2) == 1 and worker_count("auto", v2) == 1
    (v2 / "cpu.max").write_text("250000 100000\n")
    assert usable_cpus(v2) == min(cpus, 3) and worker_count("auto", v2) == auto(min(cpus, 3))
    (v2 / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(v2) == cpus and worker_count("auto", v2) == auto(cpus)
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(v1.parent) == min(cpus, 2)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(v1.parent) == cpus


async def test_a_wait_for_one_table_ends_when_that_table_is_acknowledged() -> None:
    """Waits are per generation: tables sent after it (a metrics read sends one) never keep a
    stop's barrier waiting past its own table's acknowledgement; a gone worker ends them."""
    from hestia.workers import _Link

    class _Writer:
        def is_closing(self) -> bool:
            return False

        def write(self, data: bytes) -> None:
            pass

    link = _Link(0, _Writer())  # type: ignore[arg-type]
    link.took(3)
    assert link.acknowledged(3).done()
    for_5, for_6, for_9 = link.acknowledged(5), link.acknowledged(6), link.acknowledged(9)
    link.took(5)  # tables 6..9 sent meanwhile: the wait for 5 is over all the same
    assert for_5.done() and not for_6.done() and not for_9.done()
    link.took(7)
    assert for_6.done() and not for_9.done()
    link.gone()
    assert for_9.done()


async def test_workers_serve_alone_and_every_request_is_counted_once(
    tmp_path: Path, gateways: list[Gateway], client: httpx.AsyncClient
) -> None:
    listener, stop = _upstream()
    try:
        gw = Gateway(tmp_path, {"ok": {"url": f"http://127.0.0.1:{listener.getsockname()[1]}"}})
        gateways.append(gw)
        await gw.ready(client)
        # the controller paused: requests for a ready service are still answered, by workers
        await served_by_a_worker(client, gw, "/services/ok/x")
        n = 400
        answers = await asyncio.gather(
            *(
                client.get(f"{gw.url}/services/ok/{i}", headers={"X-Request-ID": f"r-{i}"})
                for i in range(n)
            )
        )
        assert [a.status_code for a in answers] == [200] * n
        assert (await client.get(f"{gw.url}/services/nope/x")).status_code == 404

        # the metrics ask the workers for their counters before they answer: all are in
        metrics = (await client.get(f"{gw.url}/v1/metrics")).json()
        served = metrics["services"]["ok"]["requests"]["2xx"]
        assert served >= n + 1  # and the tries of served_by_a_worker
        assert metrics["services"]["<unknown>"]["requests"]["4xx"] == 1
        assert (await status(client, gw, "ok"))["workers_in_flight"] == 0
        gw.stop()
        lines = gw.lines()  # every line parses
    finally:
        stop.set()
        listener.close()
    access = [line for line in lines if line.get("event") == "access"]
    ids = [line["request_id"] for line in access if line["request_id"].startswith("r-")]
    assert sorted(ids) == sorted(f"r-{i}" for i in range(n))  # each exactly once
    ok_lines = [line for line in access if line["service"] == "ok"]
    assert len(ok_lines) == served  # the metrics count what the access log shows
    assert all(line["client"] == "127.0.0.1" for line in access)


async def test_a_reload_reaches_every_worker_before_it_applies(
    tmp_path: Path, gateways: list[Gateway], client: httpx.AsyncClient
) -> None:
    """A new version takes `ok` off the workers' fast path (a max_concurrency line is the
    controller's): once the reload has answered, no worker answers for `ok` on its own."""
    listener, stop = _upstream()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        gw = Gateway(tmp_path, {"ok": {"url": url}}, reload={"watch": False})
        gateways.append(gw)
        await gw.ready(client)
        await served_by_a_worker(client, gw, "/services/ok/x")
        path = tmp_path / "hestia_config.yml"
        config = json.loads(path.read_text())
        config["services"]["ok"]["max_concurrency"] = 1
        path.write_text(json.dumps(config))
        reloaded = await client.post(f"{gw.url}/v1/config/reload")
        assert reloaded.status_code == 200, reloaded.text
        os.kill(gw.proc.pid, signal.SIGSTOP)  # the controller paused right after its answer
        try:
            with pytest.raises(httpx.HTTPError):  # handed to the paused controller: no answer
                await client.get(f"{gw.url}/services/ok/x", timeout=0.5)
        finally:
            os.kill(gw.proc.pid, signal.SIGCONT)
        assert (await client.get(f"{gw.url}/services/ok/x")).status_code == 200
        assert (await status(client, gw, "ok"))["max_concurrency"] == 1
    finally:
        stop.set()
        listener.close()


async def test_auth_turned_on_by_a_reload_covers_the_workers(
    tmp_path: Path, gateways: list[Gateway], client: httpx.AsyncClient
) -> None:
    """Workers read the config file once, at their start; auth turned on by a live edit
    still covers every request they take, from the moment the reload has answered."""
    listener, stop = _upstream()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        gw = Gateway(tmp_path, {"ok": {"url": url}}, reload={"watch": False})
        gateways.append(gw)
        await gw.ready(client)
        await served_by_a_worker(client, gw, "/services/ok/x")
        path = tmp_path / "hestia_config.yml"
        config = json.loads(path.read_text())
        key = "k-" + "x" * 40
        config["auth"] = {
            "enabled": True,
            "keys": [{"name": "me", "key": key, "scopes": ["admin"]}],
        }
        path.write_text(json.dumps(config))
        assert (await client.post(f"{gw.url}/v1/config/reload")).status_code == 200
        answers = await asyncio.gather(
            *(client.get(f"{gw.url}/services/ok/{i}") for i in range(40))
        )
        assert {a.status_code for a in answers} == {401}
        signed = await client.get(f"{gw.url}/services/ok/x", headers={"X-API-Key": key})
        assert signed.status_code == 200
    finally:
        stop.set()
        listener.close()


async def not_answered_alone(
    client: httpx.AsyncClient, gw: Gateway, path: str, headers: dict[str, str]
) -> None:
    """With the controller paused, `path` gets no answer: a worker handed it to the
    controller."""
    os.kill(gw.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(httpx.HTTPError):
            await client.get(gw.url + path, headers=headers, timeout=0.5)
    finally:
        os.kill(gw.proc.pid, signal.SIGCONT)


async def test_workers_admit_valid_keys_and_leave_the_rest_to_the_controller(
    tmp_path: Path,
    gateways: list[Gateway],
    client: httpx.AsyncClient,
    upstream: tuple[UpstreamApp, int],
) -> None:
    """With auth on, a request with a valid key (or session cookie) for a service its key may
    use is served by a worker alone, without the gateway's credential; a wrong key, a key
    without the scope and anything from an address with failed keys on record go to the
    controller, which answers, logs and counts them (a block covers the workers too)."""
    app, port = upstream
    user, admin = "wu-" + "u" * 40, "wa-" + "a" * 40
    url = f"http://127.0.0.1:{port}"
    gw = Gateway(
        tmp_path,
        {"up": {"url": url}, "other": {"url": url}},
        auth={
            "enabled": True,
            "keys": [
                {"name": "user", "key": user, "scopes": ["service:up"]},
                {"name": "adm", "key": admin, "scopes": ["admin"]},
            ],
        },
    )
    gateways.append(gw)
    await gw.ready(client)
    mine = {"X-API-Key": user, "Authorization": "Bearer svc-own", "Cookie": "theme=dark"}
    await served_by_a_worker(client, gw, "/services/up/x", mine)
    seen = app.seen[-1]["headers"]
    assert "x-api-key" not in seen
    assert seen["authorization"] == "Bearer svc-own" and seen["cookie"] == "theme=dark"
    # a browser session made by the controller's /login is good in the workers too
    login = await client.post(f"{gw.url}/login", data={"key": user, "next": "/"})
    assert login.status_code == 303
    cookie = {"Cookie": "hestia_session=" + login.cookies["hestia_session"]}
    await served_by_a_worker(client, gw, "/services/up/y", cookie)
    assert "cookie" not in app.seen[-1]["headers"]
    async with ws_connect(
        f"ws://127.0.0.1:{gw.port}/services/up/ws", additional_headers={"X-API-Key": user}
    ) as ws:
        await ws.send("hi")
        assert await ws.recv() == "echo:hi"
    # not for a worker: the wrong key, and a key on a service outside its scopes
    wrong = {"X-API-Key": "nope-" + "n" * 30}
    await not_answered_alone(client, gw, "/services/up/x", wrong)
    await not_answered_alone(client, gw, "/services/other/x", {"X-API-Key": user})
    assert (await client.get(f"{gw.url}/services/other/x", headers=mine)).status_code == 403
    assert (
        await client.get(f"{gw.url}/services/other/x", headers={"X-API-Key": admin})
    ).status_code == 200
    # failures from this address: from now on its requests are the controller's, and after
    # ten of them even the right key is refused 429, whoever would have served it
    for _ in range(10):
        await client.get(f"{gw.url}/services/up/x", headers=wrong)

    async def refused() -> bool:
        return (await client.get(f"{gw.url}/services/up/x", headers=mine)).status_code == 429

    await wait_for(refused, 10, "the block")
    answers = await asyncio.gather(
        *(client.get(f"{gw.url}/services/up/{i}", headers=mine) for i in range(40))
    )
    assert {a.status_code for a in answers} == {429}
    await not_answered_alone(client, gw, "/services/up/x", mine)
    failed = [line for line in gw.lines() if line.get("event") == "auth_failed"]
    assert len(failed) >= 10 and {line["key"] for line in failed} >= {"unknown key", "key 'user'"}


async def test_cold_start_through_workers_starts_once(
    tmp_path: Path, gateways: list[Gateway], client: httpx.AsyncClient, tag: str
) -> None:
    spawns = tmp_path / "spawns.log"
    svc = process_service(tag, env={"DELAY": "0.5", "SPAWN_LOG": str(spawns)})
    gw = Gateway(tmp_path, {"llm": svc})
    gateways.append(gw)
    await gw.ready(client)
    answers = await asyncio.gather(*(client.get(f"{gw.url}/services/llm/") for _ in range(100)))
    assert [a.status_code for a in answers] == [200] * 100
    assert len({a.json()["pid"] for a in answers}) == 1
    assert len(spawns.read_text().splitlines()) == 1
    metrics = (await client.get(f"{gw.url}/v1/metrics")).json()
    assert metrics["services"]["llm"]["cold_starts"] == 1


@pytest.mark.parametrize("auth", [False, True])
async def test_a_request_whose_instance_died_under_a_worker_waits_for_the_restart(
    tmp_path: Path, gateways: list[Gateway], client: httpx.AsyncClient, tag: str, auth: bool
) -> None:
    """A worker that finds a fast service's address dead does not answer 502 on its own: it
    hands the request to the controller, which finds the instance gone and answers after a
    new start, as the single process does. With auth on, the hand-off carries the key the
    worker had already stripped for the upstream."""
    spawns = tmp_path / "spawns.log"
    extra: dict[str, Any] = {}
    key = {"X-API-Key": "wk-" + "k" * 40} if auth else {}
    if auth:
        extra["auth"] = {
            "enabled": True,
            "keys": [{"name": "me", "key": key["X-API-Key"], "scopes": ["admin"]}],
        }
    svc = process_service(tag, env={"SPAWN_LOG": str(spawns)})
    gw = Gateway(tmp_path, {"llm": svc}, **extra)
    gateways.append(gw)
    await gw.ready(client)
    first = await client.get(f"{gw.url}/services/llm/", headers=key)  # cold start
    assert first.status_code == 200
    await served_by_a_worker(client, gw, "/services/llm/", key)
    os.kill(gw.proc.pid, signal.SIGSTOP)  # the table stays as it is: llm is fast
    try:
        for pid in tagged_pids(tag):
            os.kill(pid, signal.SIGKILL)
        pending = asyncio.ensure_future(client.get(f"{gw.url}/services/llm/", headers=key))
        done, _ = await asyncio.wait({pending}, timeout=1.0)
        assert not done, "a worker answered on its own: " + pending.result().text
    finally:
        os.kill(gw.proc.pid, signal.SIGCONT)
    answer = await pending
    assert answer.status_code == 200, answer.text
    assert answer.json()["pid"] != first.json()["pid"]
    assert len(spawns.read_text().splitlines()) == 2
    access = [line for line in gw.lines() if line.get("event") == "access"]
    assert [line["status"] for line in access if line["service"] == "llm"][-1] == 200
    assert not [line for line in access if line["status"] == 502]


async def test_idle_stop_never_cuts_a_stream_in_a_worker(
    tmp_path: Path, gateways: list[Gateway], client: httpx.AsyncClient, tag: str
) -> None:
    release = tmp_path / "release"
    spawns = tmp_path / "spawns.log"
    svc = process_service(
        tag, idle_timeout="1s", env={"RELEASE": str(release), "SPAWN_LOG": str(spawns)}
    )
    gw = Gateway(tmp_path, {"llm": svc})
    gateways.append(gw)
    await gw.ready(client)
    assert (await client.get(f"{gw.url}/services/llm/")).status_code == 200  # cold start
    await served_by_a_worker(client, gw, "/services/llm/")
    ticks = 0
    async with client.stream("GET", f"{gw.url}/services/llm/stream") as resp:
        assert resp.status_code == 200
        t0 = time.monotonic()
        async for line in resp.aiter_lines():
            if line.endswith("tick"):
                ticks += 1
            if line.endswith("done"):
                break
            if ticks == 60:  # about 3 s: three idle timeouts with the stream going
                now = await status(client, gw, "llm")
                assert now["state"] == "ready"
                assert now["workers_in_flight"] == 1 and now["in_flight"] == 0
                release.write_text("")
    assert time.monotonic() - t0 >= 2.5
    assert ticks >= 60

    # once the stream ended, the idle timer stops it
    async def stopped() -> bool:
        return bool((await status(client, gw, "llm"))["state"] == "stopped")

    await wait_for(stopped, 20, "the idle stop after the stream")
    final = await status(client, gw, "llm")
    assert final["last_stop"]["cause"] == "idle"
    assert len(spawns.read_text().splitlines()) == 1


async def test_a_killed_worker_is_restarted_and_its_requests_released(
    tmp_path: Path, gateways: list[Gateway], client: httpx.AsyncClient
) -> None:
    listener, stop = _upstream()
    try:
        gw = Gateway(tmp_path, {"ok": {"url": f"http://127.0.0.1:{listener.getsockname()[1]}"}})
        gateways.append(gw)
        await gw.ready(client)
        await served_by_a_worker(client, gw, "/services/ok/x")
        before = set(gw.workers())
        victim = min(before)
        outcomes: list[int] = []
        loading = True

        async def load() -> None:
            while loading:
                try:
                    async with httpx.AsyncClient(timeout=10) as fresh:  # new connections
                        outcomes.append((await fresh.get(f"{gw.url}/services/ok/y")).status_code)
                except httpx.HTTPError:
                    outcomes.append(0)  # a connection the dead worker had

        tasks = [asyncio.create_task(load()) for _ in range(10)]
        await wait_for(lambda: len(outcomes) > 50, 20, "load")
        os.kill(victim, signal.SIGKILL)
        await wait_for(
            lambda: len(set(gw.workers()) - before) == 1 and len(gw.workers()) == 2,
            20,
            "the worker started again",
        )
        mark = len(outcomes)
        await wait_for(lambda: len(outcomes) > mark + 200, 30, "load on the new workers")
        loading = False
        await asyncio.gather(*tasks)
        assert outcomes[mark + 50 :].count(200) == len(outcomes[mark + 50 :])
        assert victim not in gw.workers()

        async def released() -> bool:
            return bool((await status(client, gw, "ok"))["workers_in_flight"] == 0)

        await wait_for(released, 10, "in-flight counts back to 0")
        # the metrics say a worker died and was replaced (a crash loop would show here)
        assert (await client.get(f"{gw.url}/v1/metrics")).json()["workers"] == {
            "configured": 2,
            "running": 2,
            "restarts": 1,
        }
        prometheus = (await client.get(f"{gw.url}/metrics")).text
        assert "hestia_worker_restarts_total 1.0" in prometheus
        assert "hestia_workers 2.0" in prometheus
        gw.stop()
        text = gw.log.read_text()
    finally:
        stop.set()
        listener.close()
    assert f"(pid {victim}) exited with -9" in text


async def test_sigterm_answers_held_requests_through_the_workers(
    tmp_path: Path, gateways: list[Gateway], client: httpx.AsyncClient, tag: str
) -> None:
    svc = process_service(tag, env={"DELAY": "60"})  # never ready while the test runs
    gw = Gateway(tmp_path, {"llm": svc})
    gateways.append(gw)
    await gw.ready(client)
    workers = gw.workers()
    held = [asyncio.create_task(client.get(f"{gw.url}/services/llm/")) for _ in range(20)]

    async def all_waiting() -> bool:
        return bool((await status(client, gw, "llm"))["waiting"] == 20)

    await wait_for(all_waiting, 20, "20 requests held by the controller")
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    answers = await asyncio.gather(*held)
    assert [a.status_code for a in answers] == [503] * 20
    assert all(a.json()["error"]["code"] == "shutting_down" for a in answers)
    assert time.monotonic() - t0 < 10
    await wait_for(lambda: gw.proc.poll() is not None, 30, "the controller to exit")
    assert gw.proc.returncode == 0
    await wait_for(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 10, "workers gone"
    )


async def gateway_for(
    where: str,
    tmp_path: Path,
    gateways: list[Gateway],
    client: httpx.AsyncClient,
    port: int,
    **extra: Any,
) -> Gateway:
    """A gateway in front of the upstream on `port` as service `up`, with the requests to it
    served by a worker (`where="worker"`) or by the controller (a max_concurrency line is the
    controller's, never a worker's)."""
    up: dict[str, Any] = {"url": f"http://127.0.0.1:{port}"}
    if where == "controller":
        up["max_concurrency"] = 4
    gw = Gateway(tmp_path, {"up": up}, **extra)
    gateways.append(gw)
    await gw.ready(client)
    if where == "worker":
        await served_by_a_worker(client, gw, "/services/up/x")
    return gw


@pytest.mark.parametrize("where", ["worker", "controller"])
async def test_websockets_through_a_worker_and_handed_off(
    tmp_path: Path,
    gateways: list[Gateway],
    client: httpx.AsyncClient,
    upstream: tuple[UpstreamApp, int],
    where: str,
) -> None:
    app, port = upstream
    # the client is a trusted reverse proxy: the chain it sends is kept and appended to, once
    trusted = {"trusted_proxies": ["127.0.0.1/32"]}
    gw = await gateway_for(where, tmp_path, gateways, client, port, server=trusted)
    async with ws_connect(
        f"ws://127.0.0.1:{gw.port}/services/up/ws?x=1",
        additional_headers={"X-Forwarded-For": "203.0.113.7"},
    ) as ws:
        await ws.send("hi")
        assert await ws.recv() == "echo:hi"
        assert app.ws_seen[-1]["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
        await ws.send(b"\x01\x02\x03")
        assert await ws.recv() == b"\x03\x02\x01"
        counted = "workers_in_flight" if where == "worker" else "in_flight"

        async def open_counts() -> bool:
            return bool((await status(client, gw, "up"))[counted] == 1)

        await wait_for(open_counts, 10, f"the open WebSocket in {counted}")
    await asyncio.wait_for(app.disconnected.wait(), 10)

    async def closed() -> bool:
        now = await status(client, gw, "up")
        return bool(now["in_flight"] == 0 and now["workers_in_flight"] == 0)

    await wait_for(closed, 10, "in-flight counts back to 0")


@pytest.mark.parametrize("where", ["worker", "controller"])
async def test_bodies_streams_and_headers_are_the_same_both_ways(
    tmp_path: Path,
    gateways: list[Gateway],
    client: httpx.AsyncClient,
    upstream: tuple[UpstreamApp, int],
    where: str,
) -> None:
    import hashlib

    app, port = upstream
    gw = await gateway_for(where, tmp_path, gateways, client, port)
    # the headers the upstream sees, and those the client gets back
    app.seen.clear()
    r = await client.get(
        f"{gw.url}/services/up/x?q=1", headers={"X-Request-ID": "same-1", "X-Custom": "c"}
    )
    assert r.status_code == 200 and r.text == "root of upstream"
    assert r.headers["x-request-id"] == "same-1" and r.headers["x-upstream"] == "1"
    assert len(r.headers.get_list("date")) <= 1
    seen = app.seen[-1]
    assert seen["raw_path"] == b"/x" and seen["query"] == b"q=1"
    assert seen["headers"]["x-request-id"] == "same-1"
    assert seen["headers"]["x-custom"] == "c"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert not any(k.startswith("x-hestia") for k in seen["headers"])
    # request bodies, with a length and chunked
    payload = os.urandom(3 << 20)
    digest = hashlib.sha256(payload).hexdigest()
    r = await client.post(f"{gw.url}/services/up/upload", content=payload)
    assert r.json() == {"bytes": len(payload), "sha256": digest}

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    r = await client.post(f"{gw.url}/services/up/upload", content=chunks())
    assert r.json() == {"bytes": len(payload), "sha256": digest}
    # a streamed response, and a client that leaves one that never ends
    r = await client.get(f"{gw.url}/services/up/download?2000000")
    assert len(r.content) == 2_000_000
    app.disconnected.clear()
    async with client.stream("GET", f"{gw.url}/services/up/forever") as resp:
        async for line in resp.aiter_lines():
            if line == "data: tick":
                break
    await asyncio.wait_for(app.disconnected.wait(), 10)  # the upstream saw the client go


def test_a_port_held_by_another_program_stops_start_up(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:  # no SO_REUSEPORT
        port = taken.getsockname()[1]
        cfg = tmp_path / "hestia_config.yml"
        cfg.write_text(
            json.dumps(
                {
                    "server": {"host": "127.0.0.1", "port": port, "workers": 2},
                    "docker": {"enabled": False},
                    "database": {"url": f"sqlite:///{tmp_path}/h.db"},
                }
            )
        )
        done = subprocess.run(
            [sys.executable, "-m", "hestia", "serve", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port} for the workers" in done.stderr
