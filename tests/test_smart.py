"""Smart management on the memory backend (fast; the same behaviours against real containers
are in test_smart_docker.py): bounded queues, the waiting page and its probe, hot standby
(keep_warm, schedules, idle_timeout: auto), dependencies, exclusive groups, wake filters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from hestia.backends.memory import MemoryBackend
from hestia.config import parse_config
from hestia.errors import ConfigError
from hestia.schedule import Schedule, parse_window
from tests.conftest import wait_for

ON = {"hestia.enable": "true"}
BROWSER = {
    "accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "sec-fetch-mode": "navigate",
}


@pytest.fixture
async def backend() -> AsyncIterator[MemoryBackend]:
    b = MemoryBackend()
    yield b
    await b.close()


async def _gateway(gateway_factory: Any, backend: MemoryBackend, **raw: Any) -> Any:
    raw.setdefault("docker", {"reconcile_interval": 0, "recreate_grace": "0.5s"})
    return await gateway_factory(raw, {"memory": backend})


def _svc(**settings: Any) -> dict[str, Any]:
    return {"container": settings.pop("container"), "backend": "memory", **settings}


# ------------------------------------------------------------------ queue
async def test_queue_full_is_503_with_retry_after_and_timeout_is_504(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    backend.add("slow", start_delay=30)
    gw = await _gateway(
        gateway_factory,
        backend,
        services={
            "slow": _svc(container="slow", queue={"max_waiting": 2, "timeout": "0.5s"}),
        },
    )
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        held = [asyncio.create_task(client.get("/services/slow/")) for _ in range(2)]
        await wait_for(lambda: gw.service("slow").waiting == 2, 5, "two waiting")
        r = await client.get("/services/slow/")
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
        answers = await asyncio.gather(*held)
        assert [a.status_code for a in answers] == [504, 504]  # queue.timeout, not 2 min
        metrics = (await client.get("/v1/metrics")).json()["services"]["slow"]
    assert metrics["refused"] == {"queue_full": 1, "start_timeout": 2}
    assert gw.service("slow").status()["max_waiting"] == 2


async def test_max_concurrency_line_is_fifo_and_counts_toward_max_waiting(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    backend.add("one")
    gw = await _gateway(
        gateway_factory,
        backend,
        services={"one": _svc(container="one", max_concurrency=1, queue={"max_waiting": 3})},
    )
    svc = gw.service("one")
    await svc.acquire()  # the one slot is taken
    order: list[int] = []

    async def wait_turn(i: int) -> None:
        await svc.acquire()
        order.append(i)
        svc.release()

    waiters = []
    for i in range(3):
        waiters.append(asyncio.create_task(wait_turn(i)))
        await wait_for(lambda n=i + 1: svc.queued == n, 5, f"{i + 1} in line")  # type: ignore[misc]
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        r = await client.get("/services/one/")  # the line is full
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
    svc.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2]


async def test_a_client_that_leaves_leaves_the_queue_and_abandons_the_start(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    inst = backend.add("big", start_delay=30)
    gw = await _gateway(
        gateway_factory,
        backend,
        services={"big": _svc(container="big", start={"cancel_when_abandoned": True})},
    )
    svc = gw.service("big")
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /services/big/ HTTP/1.1\r\nHost: gw\r\n\r\n")
    await writer.drain()
    await wait_for(lambda: svc.waiting == 1 and svc.state == "starting", 5, "a waiter")
    writer.close()  # the client gives up
    await wait_for(lambda: svc.waiting == 0, 5, "the waiter to leave at once")
    await wait_for(lambda: svc.state == "stopped" and not inst.running, 5, "the start dropped")
    assert svc.refused.get("client_gone") == 1


# ------------------------------------------------------------------ waiting page
async def test_browser_gets_the_waiting_page_programs_are_held(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    backend.add("web", labels=ON, start_delay=0.5)
    gw = await _gateway(gateway_factory, backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        page = await client.get("/services/web/", headers=BROWSER)
        assert page.status_code == 503 and page.headers["retry-after"]
        assert page.headers["content-type"].startswith("text/html")
        assert "web" in page.text and "starting" in page.text
        probe = await client.get("/services/web/", headers={"x-hestia-wait": "1"})
        assert probe.headers["x-hestia-wait"] == "1"
        assert probe.json()["state"] in ("starting", "ready")
        # an API client (no text/html) is held and answered by the service, never the page
        api = await client.get("/services/web/api", headers={"accept": "application/json"})
        assert (api.status_code, api.text) == (200, "web\n")
        xhr = await client.get("/services/web/", headers={**BROWSER, "sec-fetch-mode": "cors"})
        assert xhr.status_code == 200
        # ready: the probe is no longer answered by Hestia (the page then reloads)
        ready = await client.get("/services/web/", headers={"x-hestia-wait": "1"})
        assert "x-hestia-wait" not in ready.headers and ready.text == "web\n"


def test_schedule_windows() -> None:
    w = parse_window("Mon-Fri 08:00-18:00")
    monday_9 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    assert w.contains(monday_9) and not w.contains(monday_9.replace(hour=18))
    assert not w.contains(datetime(2026, 11, 28, 9, 0, tzinfo=UTC))  # a Saturday
    night = parse_window("Fri 22:00-02:00")
    assert night.contains(datetime(2026, 11, 28, 1, 0, tzinfo=UTC))  # Saturday 01:00
    assert not night.contains(datetime(2026, 11, 29, 1, 0, tzinfo=UTC))
    s = Schedule(["Mon-Fri 08:00-18:00"], UTC)
    assert s.next_change(monday_9) == monday_9.replace(hour=18)
    friday_evening = datetime(2026, 11, 27, 18, 30, tzinfo=UTC)
    assert s.next_change(friday_evening) == datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    for bad in ("weekdays 8-18", "Mon 25:00-26:00", "Mon 08:00-08:00", "Xyz 08:00-09:00"):
        with pytest.raises(ValueError):
            parse_window(bad)


# ------------------------------------------------------------------ hot standby
async def test_keep_warm_starts_with_hestia_and_is_never_idle_stopped(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    inst = backend.add("warm")
    gw = await _gateway(
        gateway_factory,
        backend,
        services={"warm": _svc(container="warm", keep_warm=True, idle_timeout="0.2s")},
    )
    svc = gw.service("warm")
    await wait_for(lambda: svc.state == "ready", 5, "started at start-up")
    deadline = svc.idle_deadline
    assert deadline is not None
    loop = asyncio.get_running_loop()
    await wait_for(lambda: loop.time() > deadline + 0.1, 5, "the idle timer to pass")
    assert svc.state == "ready" and inst.running and backend.count("stop") == 0


async def test_warm_schedule_with_an_injected_clock(
    gateway_factory: Any, backend: MemoryBackend, tmp_path: Any
) -> None:
    from hestia.app import Gateway

    inst = backend.add("office")
    now = [datetime(2026, 11, 23, 7, 59, tzinfo=UTC)]  # a Monday, a minute before 08:00
    config = parse_config(
        {
            "docker": {"reconcile_interval": 0},
            "database": {"url": f"sqlite:///{tmp_path}/w.db"},
            "schedule": {"timezone": "UTC"},
            "services": {
                "office": _svc(
                    container="office", warm_schedule="Mon-Fri 08:00-18:00", idle_timeout="0.2s"
                )
            },
        }
    )
    gw = Gateway(config, {"memory": backend}, clock=lambda: now[0])
    await gw.startup()
    try:
        svc = gw.registry.get("office")
        assert svc.state == "stopped"
        now[0] = now[0] + timedelta(minutes=2)  # 08:01: inside the window
        gw.warm_up()
        await wait_for(lambda: svc.state == "ready", 5, "started ahead of use")
        assert svc.status()["warmth"]["schedule_active"] is True
        deadline = svc.idle_deadline
        assert deadline is not None
        loop = asyncio.get_running_loop()
        await wait_for(lambda: loop.time() > deadline + 0.1, 5, "an idle period")
        assert svc.state == "ready"  # not stopped inside the window
        now[0] = now[0].replace(hour=18, minute=1)  # outside: the idle timeout applies
        await wait_for(lambda: svc.state == "stopped", 60, "the idle stop after the window")
        assert not inst.running
    finally:
        await gw.shutdown()


async def test_idle_timeout_auto_follows_the_gaps_between_uses(backend: MemoryBackend) -> None:
    from hestia.lifecycle import Service

    backend.add("chat")
    cfg = parse_config(
        {
            "services": {
                "chat": _svc(container="chat", idle_timeout="auto", idle_auto={"min": "10m"})
            }
        }
    ).resolve("chat")
    svc = Service(cfg, backend)
    assert svc.idle_timeout == 600  # nothing learned yet: the floor
    for _ in range(3):
        svc.warmth.note_gap(20 * 60)  # used every 20 minutes
    assert svc.idle_timeout == 30 * 60  # 1.5 x the median gap: not stopped between uses
    svc.warmth.note_gap(10)  # a pause within a session is not a gap
    assert svc.idle_timeout == 30 * 60
    for _ in range(20):
        svc.warmth.note_gap(6 * 3600)
    assert svc.idle_timeout == 7200  # the ceiling
    assert "median" in svc.status()["warmth"]["idle_timeout_rule"]
    svc.shutdown()


# ------------------------------------------------------------------ groups
async def test_dependencies_start_first_and_stay_up_while_needed(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    db = backend.add("db", start_delay=0.3)
    backend.add("app")
    gw = await _gateway(
        gateway_factory,
        backend,
        services={
            "db": _svc(container="db", idle_timeout="0.2s"),
            "app": _svc(container="app", depends_on=["db"], idle_timeout="30s"),
        },
    )
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        r = await client.get("/services/app/")
    assert r.status_code == 200
    assert [c for c in backend.calls if c[0] == "start"] == [("start", "db"), ("start", "app")]
    dbsvc = gw.service("db")
    deadline = dbsvc.idle_deadline
    assert deadline is not None
    loop = asyncio.get_running_loop()
    await wait_for(lambda: loop.time() > deadline + 0.1, 5, "db's idle timer to pass")
    assert db.running  # app still runs and needs it


def test_dependency_cycle_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"depends_on: the dependencies form a cycle"):
        parse_config(
            {
                "services": {
                    "a": _svc(container="a", depends_on=["b"]),
                    "b": _svc(container="b", depends_on="a"),
                }
            }
        )


async def test_exclusive_group_swaps_without_cutting_an_in_flight_request(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    ollama = backend.add("ollama")
    sd = backend.add("sd")
    gw = await _gateway(
        gateway_factory,
        backend,
        services={
            "ollama": _svc(container="ollama", exclusive_group="gpu"),
            "sd": _svc(container="sd", exclusive_group="gpu"),
        },
    )
    async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
        async with client.stream("GET", "/services/ollama/stream") as stream:
            chunks = stream.aiter_raw()
            await anext(chunks)
            other = asyncio.create_task(client.get("/services/sd/"))
            await wait_for(lambda: gw.service("ollama").state == "stopping", 5, "the swap")
            assert ollama.running  # still serving the stream in flight
            got = 0
            async for _ in chunks:  # the stream goes on; ended by closing it below
                got += 1
                if got == 5:
                    break
        assert (await other).status_code == 200
    assert sd.running and not ollama.running


# ------------------------------------------------------------------ wake filters
async def test_ignored_paths_and_agents_do_not_wake_or_touch(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    inst = backend.add("media")
    gw = await _gateway(
        gateway_factory,
        backend,
        services={
            "media": _svc(
                container="media",
                wake={
                    "ignore_paths": ["/favicon.ico", "/robots.txt"],
                    "ignore_user_agents": ["bot"],
                },
            )
        },
    )
    svc = gw.service("media")
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        for r in (
            await client.get("/services/media/favicon.ico"),
            await client.get("/services/media/", headers={"user-agent": "Uptime-Kuma bot/1.0"}),
        ):
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_woken"
        assert inst.starts == 0 and svc.state == "stopped"
        assert (await client.get("/services/media/")).status_code == 200  # a person wakes it
        before = svc.last_activity
        r = await client.get("/services/media/robots.txt")
        assert r.status_code == 200  # passes to a running service...
        assert svc.last_activity == before  # ...without resetting its idle clock
    assert svc.refused["not_woken"] == 2


async def test_status_shows_the_smart_settings(
    gateway_factory: Any, backend: MemoryBackend
) -> None:
    backend.add("s")
    gw = await _gateway(
        gateway_factory,
        backend,
        services={
            "s": _svc(
                container="s",
                queue={"max_waiting": 7},
                strategy="block",
                depends_on=[],
                exclusive_group="gpu",
                keep_warm=True,
            )
        },
    )
    async with httpx.AsyncClient(base_url=gw.url) as client:
        status = (await client.get("/v1/services/s/status")).json()
    assert status["max_waiting"] == 7 and status["strategy"] == "block"
    assert status["exclusive_group"] == "gpu" and status["warmth"]["keep_warm"] is True
    assert status["refused"] == {}
