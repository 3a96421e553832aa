"""The lifecycle against a real Docker engine, through a real gateway on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.conftest import ContainerFactory, new_scope, scoped_labels, wait_for

pytestmark = pytest.mark.docker


def _cfg(scope: str, **services: Any) -> dict[str, Any]:
    return {
        "docker": {"enabled": True, "scope": scope, "reconcile_interval": "1s"},
        "services": services,
    }


async def test_cold_start_through_proxy_then_idle_stop(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    c = containers.create(
        "cold", labels=scoped_labels(scope, "web", idle_timeout="2s"), env={"DELAY": "1"}
    )
    gw = await gateway_factory(_cfg(scope), docker_backend)
    assert gw.service("web").state == "stopped"
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.get("/services/web/index.html")
        assert r.status_code == 200
        assert r.text == "hello from busybox\n"
        assert containers.state(c) == "running"
        status = (await client.get("/v1/services/web/status")).json()
        assert status["state"] == "ready"
        assert status["backend"] == "docker"
        assert status["idle_timeout_s"] == 2.0
        # idle stop: 2 s after the last request ends
        t_end = time.monotonic()
        await wait_for(lambda: containers.state(c) == "exited", 15, "idle stop")
        assert time.monotonic() - t_end >= 1.9
        await wait_for(lambda: gw.service("web").state == "stopped", 5, "state stopped")
        # and it comes back on the next request
        r = await client.get("/services/web/")
        assert r.status_code == 200
        assert containers.state(c) == "running"


async def test_many_concurrent_requests_one_start(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    # busybox httpd listens with a backlog of 9 and forks per connection: 200 simultaneous
    # connects overflow it and some wait out SYN retransmits for a minute (measured without
    # Hestia too). max_concurrency is the knob that protects such an upstream.
    c = containers.create(
        "burst",
        labels=scoped_labels(scope, "burst", max_concurrency="8", queue__max_waiting="500"),
        env={"DELAY": "1"},
    )
    gw = await gateway_factory(_cfg(scope), docker_backend)
    starts = 0
    real_start = docker_backend.start

    async def counting_start(ref: str, spec: Any) -> None:
        nonlocal starts
        starts += 1
        await real_start(ref, spec)

    docker_backend.start = counting_start
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as client:
        results = await asyncio.gather(*(client.get("/services/burst/") for _ in range(200)))
    assert [r.status_code for r in results] == [200] * 200
    assert starts == 1
    c.reload()
    assert c.attrs["RestartCount"] == 0


async def test_container_exits_during_start_gives_503_with_reason(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    containers.create(
        "dies", labels=scoped_labels(scope, "dies"), env={"DELAY": "0.5", "EXIT_CODE": "3"}
    )
    gw = await gateway_factory(_cfg(scope), docker_backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        t0 = time.monotonic()
        r = await client.get("/services/dies/")
        assert r.status_code == 503
        assert time.monotonic() - t0 < 10  # at once, not after startup_timeout
        err = r.json()["error"]
        assert err["code"] == "start_failed"
        assert err["service"] == "dies"
        assert "exited with code 3" in err["message"]
        assert "simulated failure" in err["message"]
        status = (await client.get("/v1/services/dies/status")).json()
        assert status["state"] == "failed"
        assert status["last_error"]["code"] == "start_failed"


async def test_startup_timeout_gives_504(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    containers.create(
        "slow", labels=scoped_labels(scope, "slow", startup_timeout="1s"), env={"DELAY": "30"}
    )
    gw = await gateway_factory(_cfg(scope), docker_backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        t0 = time.monotonic()
        r = await client.get("/services/slow/")
        took = time.monotonic() - t0
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "start_timeout"
    assert 0.9 <= took < 5


async def test_docker_healthcheck_is_used_for_readiness(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    # the HEALTHCHECK passes once /tmp/up exists (1 s after start); failures within the
    # start period do not count, so the container goes starting -> healthy
    hc = {
        "test": ["CMD", "sh", "-c", "test -f /tmp/up"],
        "interval": 200_000_000,
        "timeout": 1_000_000_000,
        "retries": 3,
        "start_period": 20_000_000_000,
    }
    c = containers.create(
        "hc", labels=scoped_labels(scope, "hc"), env={"DELAY": "1"}, healthcheck=hc
    )
    gw = await gateway_factory(_cfg(scope), docker_backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.get("/services/hc/")
        assert r.status_code == 200
    c.reload()
    assert c.attrs["State"]["Health"]["Status"] == "healthy"


async def test_unhealthy_container_gives_503_with_health_output(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    hc = {
        "test": ["CMD", "sh", "-c", "echo database unreachable; exit 1"],
        "interval": 200_000_000,
        "timeout": 1_000_000_000,
        "retries": 1,
    }
    containers.create("sick", labels=scoped_labels(scope, "sick"), healthcheck=hc)
    gw = await gateway_factory(_cfg(scope), docker_backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.get("/services/sick/")
    assert r.status_code == 503
    assert "database unreachable" in r.json()["error"]["message"]


async def test_running_container_is_adopted_not_restarted(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    c = containers.create("adopt", labels=scoped_labels(scope, "adopt"), start=True)
    c.reload()
    started_at = c.attrs["State"]["StartedAt"]
    gw = await gateway_factory(_cfg(scope), docker_backend)
    await wait_for(lambda: gw.service("adopt").state == "ready", 10, "adoption")
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.get("/services/adopt/")
    assert r.status_code == 200
    c.reload()
    assert c.attrs["State"]["StartedAt"] == started_at


async def test_container_labelled_after_start_is_found_and_unlabelled_untouched(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    gw = await gateway_factory(_cfg(scope), docker_backend)
    plain = containers.create("plain", labels={"hestia.scope": scope, "hestia.service": "plain"})
    late = containers.create("late", labels=scoped_labels(scope, "late"))
    await wait_for(lambda: "late" in gw.gateway.registry.services, 10, "the late container")
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.get("/services/late/")
        assert r.status_code == 200
        r = await client.get("/services/plain/")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "service_not_found"
        r = await client.post(f"/v1/services/{plain.name}/start")
        assert r.status_code == 404
    assert containers.state(plain) == "created"
    assert containers.state(late) == "running"
    # removing the container removes the service
    late.remove(force=True)
    await wait_for(lambda: "late" not in gw.gateway.registry.services, 10, "removal")


async def test_stream_outlives_idle_timeout(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    c = containers.create("stream", labels=scoped_labels(scope, "stream", idle_timeout="1s"))
    gw = await gateway_factory(_cfg(scope), docker_backend)
    lines = []
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        # 20 lines 0.2 s apart: a 4 s stream against a 1 s idle timeout
        async with client.stream("GET", "/services/stream/cgi-bin/stream?20") as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)
                    assert containers.state(c) == "running"
    assert len(lines) == 20
    assert lines[-1] == '{"i":19}'
    await wait_for(lambda: containers.state(c) == "exited", 10, "idle stop after the stream")


async def test_api_start_and_stop(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    c = containers.create("api", labels=scoped_labels(scope, "api"))
    gw = await gateway_factory(_cfg(scope), docker_backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.post("/v1/services/api/start?wait=true")
        assert r.status_code == 200
        assert r.json()["state"] == "ready"
        assert containers.state(c) == "running"
        listing = (await client.get("/v1/services")).json()["services"]
        assert [s["name"] for s in listing] == ["api"]
        r = await client.post("/v1/services/api/stop?wait=true")
        assert r.status_code == 200
        assert r.json()["state"] == "stopped"
        assert containers.state(c) == "exited"
        r = await client.post("/v1/services/nope/start")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "service_not_found"


async def test_container_stopped_by_hand_is_noticed(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    c = containers.create("hand", labels=scoped_labels(scope, "hand"))
    gw = await gateway_factory(_cfg(scope), docker_backend)
    c.start()
    await wait_for(lambda: gw.service("hand").state == "ready", 10, "started by hand")
    c.stop(timeout=1)
    await wait_for(lambda: gw.service("hand").state == "stopped", 10, "stopped by hand")


async def test_config_service_names_container(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    # no labels at all: being named in the config file is the opt-in
    c = containers.create("cfg", labels={})
    gw = await gateway_factory(
        _cfg(scope, files={"container": c.name, "port": 80, "health": {"path": "/missing"}}),
        docker_backend,
    )
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        # a 404 on the health path still means "up"
        r = await client.get("/services/files/index.html")
        assert r.status_code == 200
    assert containers.state(c) == "running"


async def test_renamed_container_is_followed(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    # no hestia.service label: the service is named after the container
    c = containers.create("ren", labels={"hestia.enable": "true", "hestia.scope": scope})
    gw = await gateway_factory(_cfg(scope), docker_backend)
    await wait_for(lambda: c.name in gw.gateway.registry.services, 10, "discovery")
    new_name = containers.name("renamed")
    c.rename(new_name)
    await wait_for(
        lambda: (
            new_name in gw.gateway.registry.services and c.name not in gw.gateway.registry.services
        ),
        10,
        "the rename to be followed",
    )
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.get(f"/services/{new_name}/")
    assert r.status_code == 200
