"""The control API and the proxy over the memory backend: a real gateway on 127.0.0.1, real
instances listening on 127.0.0.1, no Docker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from hestia.backends.memory import MemoryBackend
from tests.conftest import wait_for

ON = {"hestia.enable": "true"}


@pytest.fixture
async def backend() -> AsyncIterator[MemoryBackend]:
    b = MemoryBackend()
    yield b
    await b.close()


async def _gateway(gateway_factory: Any, backend: MemoryBackend, **raw: Any) -> Any:
    raw.setdefault("docker", {"reconcile_interval": 0, "recreate_grace": "0.5s"})
    return await gateway_factory(raw, {"memory": backend})


async def test_list_status_start_stop_events(gateway_factory: Any, backend: MemoryBackend) -> None:
    inst = backend.add("chat", labels={**ON, "hestia.idle_timeout": "5m"}, start_delay=0.2)
    gw = await _gateway(gateway_factory, backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        listed = (await client.get("/v1/services")).json()["services"]
        assert [(s["name"], s["state"], s["source"]) for s in listed] == [
            ("chat", "stopped", "labels")
        ]
        r = await client.post("/v1/services/chat/start?wait=true")
        assert r.status_code == 200 and r.json()["state"] == "ready"
        assert inst.running
        status = (await client.get("/v1/services/chat/status")).json()
        assert status["backend"] == "memory" and status["idle_timeout_s"] == 300
        assert status["upstream"] == f"http://127.0.0.1:{inst.port}"
        r = await client.get("/services/chat/anything")
        assert (r.status_code, r.text) == (200, "chat\n")
        r = await client.post("/v1/services/chat/stop?wait=true")
        assert r.json()["state"] == "stopped" and not inst.running
        events = (await client.get("/v1/services/chat/events")).json()["events"]
        assert [(e["from_state"], e["to_state"], e["cause"]) for e in reversed(events)] == [
            ("stopped", "starting", "api"),
            ("starting", "ready", "api"),
            ("ready", "stopping", "api"),
            ("stopping", "stopped", "api"),
        ]


async def test_unknown_service_is_404_json(gateway_factory: Any, backend: MemoryBackend) -> None:
    gw = await _gateway(gateway_factory, backend)
    async with httpx.AsyncClient(base_url=gw.url) as client:
        for r in (
            await client.get("/v1/services/nope/status"),
            await client.post("/v1/services/nope/start"),
            await client.get("/services/nope/x"),
        ):
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "service_not_found"


async def test_cold_start_through_the_proxy_holds_then_serves(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    inst = backend.add("slow", labels=ON, start_delay=0.5)
    gw = await _gateway(gateway_factory, backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        results = await asyncio.gather(*(client.get("/services/slow/") for _ in range(20)))
    assert [r.status_code for r in results] == [200] * 20
    assert inst.starts == 1


async def test_start_failure_is_503_json_with_reason(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    backend.add("broken", labels=ON, fail_exit=3)
    gw = await _gateway(gateway_factory, backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        r = await client.get("/services/broken/")
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "start_failed" and err["detail"]["exit_code"] == 3
        assert "simulated failure, exiting 3" in err["message"]
        r = await client.post("/v1/services/broken/start?wait=true")
        assert r.status_code == 503 and r.json()["error"]["code"] == "start_failed"
        status = (await client.get("/v1/services/broken/status")).json()
        assert status["state"] == "failed" and status["last_error"]["code"] == "start_failed"


async def test_start_wait_cancelled_by_a_stop_is_409_json(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    backend.add("slow", labels=ON, start_delay=5)
    gw = await _gateway(gateway_factory, backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        waiting = asyncio.create_task(client.post("/v1/services/slow/start?wait=true"))
        await wait_for(lambda: gw.service("slow").state == "starting", 5, "starting")
        await client.post("/v1/services/slow/stop")
        r = await waiting
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "start_cancelled"


async def test_status_shows_conflicts(gateway_factory: Any, backend: MemoryBackend) -> None:
    backend.add("a", labels={**ON, "hestia.service": "web"})
    backend.add("b", labels={**ON, "hestia.service": "web"}, created=2e9)
    gw = await _gateway(gateway_factory, backend)
    async with httpx.AsyncClient(base_url=gw.url) as client:
        status = (await client.get("/v1/services/web/status")).json()
    assert status["container"] == "a"
    assert [c["instance"] for c in status["conflicts"]] == ["b"]


async def test_openapi_describes_the_api(gateway_factory: Any) -> None:
    gw = await gateway_factory({})
    async with httpx.AsyncClient(base_url=gw.url) as client:
        doc = (await client.get("/openapi.json")).json()
        health = (await client.get("/v1/health")).json()
    assert health["status"] == "ok"
    for path in (
        "/v1/health",
        "/v1/services",
        "/v1/services/{name}/status",
        "/v1/services/{name}/start",
        "/v1/services/{name}/stop",
        "/v1/services/{name}/events",
    ):
        assert path in doc["paths"], path
    responses = doc["paths"]["/v1/services/{name}/start"]["post"]["responses"]
    assert {"404", "409", "503", "504"} <= set(responses)


async def test_api_http_details(gateway_factory: Any) -> None:
    gw = await gateway_factory({})
    async with httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.head("/v1/health")
        assert r.status_code == 200 and r.content == b""
        r = await client.delete("/v1/health")
        assert r.status_code == 405
        assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
        assert r.json()["error"]["code"] == "method_not_allowed"
        # no redirect built from the request's Host header
        r = await client.get("/v1/services/", headers={"Host": "evil.example"})
        assert r.status_code == 404 and "location" not in r.headers
        assert "without the trailing slash" in r.json()["error"]["message"]


async def test_crash_mid_download_cuts_the_clients_stream(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    # the crashed instance's connection stays open and silent: only the gateway's reaction
    # to the crash (cutting the origin's connections) ends the client's stream
    inst = backend.add("dl", labels=ON, freeze_on_crash=True)
    gw = await _gateway(gateway_factory, backend)
    svc = gw.service("dl")
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        async with client.stream("GET", "/services/dl/stream") as r:
            chunks = r.aiter_raw()
            await anext(chunks)
            await backend.crash(inst.id)
            with pytest.raises(httpx.RemoteProtocolError):
                async with asyncio.timeout(10):
                    async for _ in chunks:
                        pass
    await wait_for(lambda: svc.in_flight == 0, 5, "the stream to be released")
    assert svc.state == "stopped"
