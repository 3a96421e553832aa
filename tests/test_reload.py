"""Live configuration: the config file edited while the gateway runs (saved in place and by
rename, as editors do), under load and with a stream open; invalid and half-written versions
kept out; services added, changed and removed; SIGHUP and POST /v1/config/reload."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

from hestia.backends.memory import MemoryBackend
from tests.conftest import free_port, wait_for, wait_http_ok


def save_in_place(path: Path, text: str) -> None:
    """Truncate and write the same file (same inode), as `echo > file` or many editors do."""
    with open(path, "w") as f:
        f.write(text)


def save_by_rename(path: Path, text: str) -> None:
    """Write a new file beside it and rename it over (vim, IDEs): the inode changes."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def config_of(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/v1/config")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def watching(client: httpx.AsyncClient) -> None:
    async def on() -> bool:
        return bool((await config_of(client))["watching"])

    await wait_for(on, 20, "the config file to be watched")


async def test_edits_while_load_runs_and_a_stream_is_open(
    gateway_factory: Any, tmp_path: Path
) -> None:
    backend = MemoryBackend()
    steady_box = backend.add("steady-box")
    extra_box = backend.add("extra-box")
    path = tmp_path / "hestia_config.yml"
    raw: dict[str, Any] = {
        "docker": {"reconcile_interval": 0},
        "services": {"steady": {"container": "steady-box", "backend": "memory"}},
    }
    gw = await gateway_factory(raw, {"memory": backend}, config_path=path)
    steady = gw.service("steady")
    results: list[int | str] = []
    stop_load = asyncio.Event()

    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        await watching(client)
        assert (await client.get("/services/steady/")).status_code == 200
        first_hash = (await config_of(client))["hash"]

        async def load() -> None:
            while not stop_load.is_set():
                try:
                    r = await client.get("/services/steady/")
                    results.append(r.status_code)
                except httpx.HTTPError as exc:
                    results.append(repr(exc))

        lines: list[str] = []

        async def stream() -> None:
            async with client.stream("GET", "/services/steady/stream") as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    lines.append(line)
                    if stop_load.is_set() and len(lines) > 20:
                        return

        workers = [asyncio.create_task(load()) for _ in range(4)]
        streamer = asyncio.create_task(stream())
        await wait_for(lambda: len(lines) > 3 and len(results) > 20, 20, "load and a stream")

        # 1. a new service, saved by rename: routable without a restart
        raw["services"]["extra"] = {
            "container": "extra-box",
            "backend": "memory",
            "idle_timeout": "10m",
        }
        save_by_rename(path, yaml.safe_dump(raw))

        async def extra_answers() -> bool:
            return (await client.get("/services/extra/")).status_code == 200

        await wait_for(extra_answers, 20, "the added service to answer")
        assert extra_box.starts == 1

        # 2. a changed limit, saved in place: applies from the next request on
        raw["services"]["extra"]["max_concurrency"] = 3
        raw["services"]["extra"]["idle_timeout"] = "20m"
        save_in_place(path, yaml.safe_dump(raw))

        async def extra_changed() -> bool:
            s = (await client.get("/v1/services/extra/status")).json()
            return bool(s["max_concurrency"] == 3 and s["idle_timeout_s"] == 1200)

        await wait_for(extra_changed, 20, "the changed settings to apply")
        assert (await client.get("/services/extra/")).status_code == 200
        assert extra_box.starts == 1  # reconfigured, not restarted

        # 3. an invalid version: refused, the running one stays
        save_in_place(path, yaml.safe_dump(raw) + "  bogus_key: 1\n")

        async def refused() -> bool:
            return (await config_of(client))["error"] is not None

        await wait_for(refused, 20, "the invalid version to be refused")
        assert (await client.get("/services/extra/")).status_code == 200

        # 4. the service removed, saved by rename: no longer routed; its instance left alone
        del raw["services"]["extra"]
        save_by_rename(path, yaml.safe_dump(raw))

        async def extra_gone() -> bool:
            return (await client.get("/services/extra/")).status_code == 404

        await wait_for(extra_gone, 20, "the removed service to stop being routed")
        gone = (await client.get("/services/extra/")).json()["error"]
        assert gone["code"] == "service_not_found"
        assert extra_box.running  # reload.on_remove: leave (the default)

        stop_load.set()
        await asyncio.wait_for(asyncio.gather(*workers), 20)
        await asyncio.wait_for(streamer, 20)
        status = await config_of(client)

    # nothing the unchanged service served failed, and it never noticed the reloads
    assert results and all(code == 200 for code in results), {str(r) for r in results}
    assert len(lines) > 20 and all(line == "steady-box" for line in lines if line)
    assert steady_box.starts == 1 and steady_box.stops == 0
    assert gw.service("steady") is steady and steady.state.value == "ready"
    # the file is back to its first version, byte for byte
    assert status["error"] is None and status["hash"] == first_hash
    assert status["last_reload"]["result"] == "applied"
    assert status["last_reload"]["changes"]["removed"] == ["extra"]
    await backend.close()


async def test_invalid_and_half_written_versions_are_not_applied(
    gateway_factory: Any, tmp_path: Path
) -> None:
    backend = MemoryBackend()
    backend.add("a-box")
    path = tmp_path / "hestia_config.yml"
    raw: dict[str, Any] = {
        "docker": {"reconcile_interval": 0},
        "services": {"a": {"container": "a-box", "backend": "memory", "idle_timeout": "5m"}},
    }
    gw = await gateway_factory(raw, {"memory": backend}, config_path=path)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        await watching(client)
        good = (await config_of(client))["hash"]

        # a wrong value: the key path and the reason, in GET /v1/config and the API's answer
        raw["services"]["a"]["idle_timeout"] = "soon"
        save_in_place(path, yaml.safe_dump(raw))

        async def error() -> dict[str, Any] | None:
            found: dict[str, Any] | None = (await config_of(client))["error"]
            return found

        await wait_for(lambda: _truthy(error()), 20, "the wrong value to be refused")
        err = await error()
        assert err is not None and err["file"] == str(path)
        assert err["errors"][0]["path"] == "services.a.idle_timeout"
        assert "soon" in err["errors"][0]["reason"]
        status = await config_of(client)
        assert status["hash"] == good  # the running version is still the good one
        assert gw.service("a").config.idle_timeout == 300
        r = await client.post("/v1/config/reload")
        assert r.status_code == 422
        body = r.json()["error"]
        assert body["code"] == "config_invalid"
        assert body["detail"]["errors"][0]["path"] == "services.a.idle_timeout"

        # half-written: an editor that writes the file in two steps, caught in between
        raw["services"]["a"]["idle_timeout"] = "7m"
        text = yaml.safe_dump(raw)
        half = text[: text.index("idle_timeout") + len("idle_tim")]
        save_in_place(path, half)

        async def refused_half() -> bool:
            err = await error()
            return err is not None and err["hash"] != (status["error"] or {}).get("hash")

        await wait_for(refused_half, 20, "the half-written version to be refused")
        assert gw.service("a").config.idle_timeout == 300

        # an empty file (truncated, not yet written) would remove every service: refused
        save_in_place(path, "")
        await wait_for(
            lambda: _contains(error(), "the file is empty"), 20, "the empty file to be refused"
        )
        assert "a" in gw.gateway.registry.services

        # the rest of the save arrives: applied, the error cleared
        save_in_place(path, text)

        async def applied() -> bool:
            return (await config_of(client))["error"] is None

        await wait_for(applied, 20, "the complete version to be applied")
        assert gw.service("a").config.idle_timeout == 420
        assert (await config_of(client))["hash"] != good
    await backend.close()


async def _truthy(value: Any) -> bool:
    return bool(await value)


async def _contains(value: Any, needle: str) -> bool:
    found = await value
    return found is not None and needle in found["message"]


async def test_a_removed_service_answers_its_waiting_requests(
    gateway_factory: Any, tmp_path: Path
) -> None:
    backend = MemoryBackend()
    slow = backend.add("slow-box", start_delay=60)
    leaving = backend.add("leaving-box")
    path = tmp_path / "hestia_config.yml"
    raw: dict[str, Any] = {
        "docker": {"reconcile_interval": 0},
        "reload": {"watch": False, "on_remove": "stop"},
        "services": {
            "slow": {"container": "slow-box", "backend": "memory", "startup_timeout": "2m"},
            "leaving": {"container": "leaving-box", "backend": "memory"},
        },
    }
    gw = await gateway_factory(raw, {"memory": backend}, config_path=path)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        assert (await config_of(client))["watching"] is False  # reload.watch: false
        assert (await client.get("/services/leaving/")).status_code == 200
        held = asyncio.create_task(client.get("/services/slow/"))

        async def waiting() -> bool:
            return bool((await client.get("/v1/services/slow/status")).json()["waiting"])

        await wait_for(waiting, 10, "the request to be held for the start")
        save_by_rename(path, yaml.safe_dump({**raw, "services": {}}))
        r = await client.post("/v1/config/reload")
        assert r.status_code == 200, r.text
        assert sorted(r.json()["last_reload"]["changes"]["removed"]) == ["leaving", "slow"]
        answer = await asyncio.wait_for(held, 10)
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "service_removed"
        assert "removed from the config file" in answer.json()["error"]["message"]
        assert (await client.get("/v1/services")).json()["services"] == []
        # reload.on_remove: stop: the running instance is stopped
        await wait_for(lambda: not leaving.running, 10, "the removed service's instance to stop")
        assert slow.starts == 1
    await backend.close()


async def test_sighup_reloads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "hestia_config.yml"
    base = (
        f"database:\n  url: sqlite:///{tmp_path}/h.db\n"
        "docker:\n  enabled: false\n"
        "reload:\n  watch: false\n"  # only the signal can have done it
        "services:\n  first:\n    url: http://127.0.0.1:9\n"
    )
    path.write_text(base)
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child that outlives this coroutine
        [sys.executable, "-m", "hestia", "serve", "--config", str(path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            await wait_http_ok(client, "/v1/health")
            save_in_place(path, base + "  second:\n    url: http://127.0.0.1:10\n")
            proc.send_signal(signal.SIGHUP)

            async def second() -> bool:
                names = [s["name"] for s in (await client.get("/v1/services")).json()["services"]]
                return names == ["first", "second"]

            await wait_for(second, 20, "SIGHUP to load the second service")
            status = (await client.get("/v1/config")).json()
            assert status["last_reload"]["cause"] == "SIGHUP"
            assert status["last_reload"]["result"] == "applied"
            assert proc.poll() is None  # SIGHUP did not end it
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_an_entry_removed_for_a_labelled_instance_falls_back_to_its_labels(
    gateway_factory: Any, tmp_path: Path
) -> None:
    backend = MemoryBackend()
    box = backend.add("lab", labels={"hestia.enable": "true", "hestia.idle_timeout": "3m"})
    path = tmp_path / "hestia_config.yml"
    raw: dict[str, Any] = {
        "docker": {"reconcile_interval": 0},
        "reload": {"watch": False, "on_remove": "stop"},
        "services": {"lab": {"container": "lab", "backend": "memory", "idle_timeout": "9m"}},
    }
    gw = await gateway_factory(raw, {"memory": backend}, config_path=path)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        assert (await client.get("/services/lab/")).status_code == 200
        svc = gw.service("lab")
        assert svc.config.idle_timeout == 540 and svc.config.source == "config+labels"
        save_in_place(path, yaml.safe_dump({**raw, "services": {}}))
        r = await client.post("/v1/config/reload")
        assert r.status_code == 200, r.text
        changes = r.json()["last_reload"]["changes"]
        assert changes["removed"] == [] and changes["changed"] == ["lab"]
        # the same service, now on its labels alone; its instance kept serving
        assert gw.service("lab") is svc and svc.config.source == "labels"
        assert svc.config.idle_timeout == 180
        assert (await client.get("/services/lab/")).status_code == 200
        assert box.starts == 1 and box.running
    await backend.close()


async def test_what_cannot_be_applied_live_is_said(gateway_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "hestia_config.yml"
    raw: dict[str, Any] = {
        "reload": {"watch": False},
        "services": {"web": {"url": "http://127.0.0.1:9"}},
    }
    gw = await gateway_factory(raw, config_path=path)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        # a service for a backend this gateway does not run: refused, with its key path
        bad = {**raw, "services": {**raw["services"], "box": {"container": "box"}}}
        save_by_rename(path, yaml.safe_dump(bad))
        r = await client.post("/v1/config/reload")
        assert r.status_code == 422
        [problem] = r.json()["error"]["detail"]["errors"]
        assert problem["path"] == "services.box.backend"
        assert "'docker' backend is not enabled" in problem["reason"]
        assert sorted(gw.gateway.registry.services) == ["web"]

        # a section that needs a restart: the rest applies, the section keeps its value
        changed = {**raw, "server": {"port": 1234}, "routing": {"subdomains": True}}
        save_by_rename(path, yaml.safe_dump(changed))
        r = await client.post("/v1/config/reload")
        assert r.status_code == 200, r.text
        assert r.json()["restart_required"] == ["server"]
        assert r.json()["error"] is None
        assert gw.gateway.config.server.port == 8080  # the running value
        assert gw.gateway.registry.hosts == {"web.localhost": "web"}  # routing applied
        answer = await client.get("/", headers={"Host": "web.localhost"})
        assert answer.status_code == 502  # routed to web's (closed) upstream by host name
