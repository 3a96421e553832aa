"""Smart management with real containers (busybox httpd listening after DELAY seconds) and a
real headless Chromium for the waiting page."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import Browser
from tests.conftest import ContainerFactory, new_scope, scoped_labels, wait_for

pytestmark = pytest.mark.docker


def _cfg(scope: str, **services: Any) -> dict[str, Any]:
    return {"docker": {"enabled": True, "scope": scope}, "services": services}


def _start_events(docker_client: Any, since: float, names: list[str]) -> list[str]:
    """Container start events of `names`, in order, from Docker's own event log."""
    events = docker_client.events(
        since=since, until=time.time(), decode=True, filters={"type": "container", "event": "start"}
    )
    return [
        e["Actor"]["Attributes"]["name"]
        for e in events
        if e["Actor"]["Attributes"]["name"] in names
    ]


async def test_queue_overflow_and_timeout(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    containers.create(
        "q",
        labels=scoped_labels(scope, "q", queue__max_waiting="2", queue__timeout="1s"),
        env={"DELAY": "60"},
    )
    gw = await gateway_factory(_cfg(scope), docker_backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        held = [asyncio.create_task(client.get("/services/q/")) for _ in range(2)]
        await wait_for(lambda: gw.service("q").waiting == 2, 10, "two held")
        full = await client.get("/services/q/")
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert full.headers["retry-after"]
        assert [r.status_code for r in await asyncio.gather(*held)] == [504, 504]


async def test_fifo_under_max_concurrency(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    containers.create("fifo", labels=scoped_labels(scope, "fifo", max_concurrency="1"), start=True)
    gw = await gateway_factory(_cfg(scope), docker_backend)
    svc = gw.service("fifo")
    await wait_for(lambda: svc.state == "ready", 15, "adoption")
    order: list[int] = []
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        # the first holds the one slot with a 1 s stream; the others line up in order
        first = asyncio.create_task(client.get("/services/fifo/cgi-bin/stream?5"))
        await wait_for(lambda: svc.in_flight == 1, 10, "the first in flight")

        async def one(i: int) -> None:
            r = await client.get("/services/fifo/index.html")
            assert r.status_code == 200
            order.append(i)

        rest = []
        for i in range(4):
            rest.append(asyncio.create_task(one(i)))
            await wait_for(lambda n=i + 1: svc.queued == n, 10, f"{i + 1} queued")  # type: ignore[misc]
        await first
        await asyncio.gather(*rest)
    assert order == [0, 1, 2, 3]


async def test_disconnecting_waiter_leaves_and_abandons_the_start(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    c = containers.create(
        "gone",
        labels=scoped_labels(scope, "gone", start__cancel_when_abandoned="true"),
        env={"DELAY": "60"},
    )
    gw = await gateway_factory(_cfg(scope), docker_backend)
    svc = gw.service("gone")
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /services/gone/ HTTP/1.1\r\nHost: gw\r\n\r\n")
    await writer.drain()
    await wait_for(lambda: svc.state == "starting" and svc.waiting == 1, 15, "a held request")
    writer.close()
    await wait_for(lambda: svc.waiting == 0, 5, "the waiter to leave at once")
    await wait_for(lambda: containers.state(c) == "exited", 20, "the abandoned start stopped")
    assert svc.refused["client_gone"] == 1


async def test_waiting_page_in_chromium_lands_on_the_service(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any, tmp_path: Path
) -> None:
    scope = new_scope()
    containers.create("page", labels=scoped_labels(scope, "page"), env={"DELAY": "3"})
    gw = await gateway_factory(_cfg(scope), docker_backend)
    async with Browser() as browser:
        await browser.goto(f"{gw.url}/services/page/")
        shown = await browser.wait_text("Hestia is starting this service", 15)
        assert "page" in shown
        await browser.screenshot(tmp_path / "waiting-page.png")
        await browser.wait_text("hello from busybox", 30)  # reloaded onto the service
        assert await browser.evaluate("location.pathname") == "/services/page/"


async def test_keep_warm_starts_at_startup(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    c = containers.create("warm", labels=scoped_labels(scope, "warm", keep_warm="true"))
    gw = await gateway_factory(_cfg(scope), docker_backend)
    await wait_for(lambda: gw.service("warm").state == "ready", 20, "started with Hestia")
    assert containers.state(c) == "running"
    assert gw.service("warm").idle_deadline is not None  # timer runs, but never stops it


async def test_schedule_window_with_an_injected_clock(
    containers: ContainerFactory, docker_backend: Any, tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    from hestia.app import Gateway
    from hestia.config import parse_config

    scope = new_scope()
    c = containers.create(
        "sched",
        labels=scoped_labels(scope, "sched", warm_schedule="Sat 10:00-12:00", idle_timeout="1s"),
    )
    now = [datetime(2026, 11, 28, 9, 0, tzinfo=UTC)]  # Saturday 09:00
    config = parse_config(
        {
            "docker": {"enabled": True, "scope": scope},
            "schedule": {"timezone": "UTC"},
            "database": {"url": f"sqlite:///{tmp_path}/s.db"},
        }
    )
    gw = Gateway(config, docker_backend, clock=lambda: now[0])
    await gw.startup()
    try:
        svc = gw.registry.get("sched")
        assert svc.state == "stopped"
        now[0] = now[0].replace(hour=10, minute=30)
        gw.warm_up()
        await wait_for(lambda: containers.state(c) == "running", 20, "started for the window")
        now[0] = now[0].replace(hour=12, minute=5)
        await wait_for(lambda: containers.state(c) == "exited", 40, "idle stop after it")
    finally:
        await gw.shutdown()


async def test_dependencies_start_first(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any, docker_client: Any
) -> None:
    scope = new_scope()
    db = containers.create("db", labels=scoped_labels(scope, "db"), env={"DELAY": "1"})
    app = containers.create("app", labels=scoped_labels(scope, "app", depends_on="db"))
    gw = await gateway_factory(_cfg(scope), docker_backend)
    since = time.time() - 1
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        assert (await client.get("/services/app/")).status_code == 200
    assert gw.service("db").state == "ready"
    assert _start_events(docker_client, since, [db.name, app.name]) == [db.name, app.name]


async def test_exclusive_group_swap_keeps_the_in_flight_stream(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    a = containers.create("gpu-a", labels=scoped_labels(scope, "a", exclusive_group="gpu"))
    b = containers.create("gpu-b", labels=scoped_labels(scope, "b", exclusive_group="gpu"))
    gw = await gateway_factory(_cfg(scope), docker_backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
        async with client.stream("GET", "/services/a/cgi-bin/stream?10") as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            first = await anext(lines)
            swap = asyncio.create_task(client.get("/services/b/index.html"))
            await wait_for(lambda: gw.service("a").state == "stopping", 10, "the swap")
            rest = [line async for line in lines]  # not cut: all ten lines arrive
        assert [first, *rest][-1] == '{"i":9}'
        assert (await swap).status_code == 200
    assert containers.state(a) == "exited" and containers.state(b) == "running"


async def test_ignored_paths_do_not_wake(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = new_scope()
    c = containers.create(
        "wake", labels=scoped_labels(scope, "wake", wake__ignore_paths="/favicon.ico,/robots.txt")
    )
    gw = await gateway_factory(_cfg(scope), docker_backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.get("/services/wake/favicon.ico")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_woken"
        assert containers.state(c) == "created"
        assert (await client.get("/services/wake/index.html")).status_code == 200
