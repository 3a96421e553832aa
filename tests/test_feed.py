"""GET /v1/events (Server-Sent Events) over real HTTP: every service's status at once, each
lifecycle transition as it happens, one service's only, recent events as JSON, and the
streams ended by a shutdown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from hestia.backends.memory import MemoryBackend
from tests.conftest import wait_for

ON = {"hestia.enable": "true"}


async def frames(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    event = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: ") :])


async def test_the_feed_shows_statuses_and_transitions(gateway_factory: Any) -> None:
    backend = MemoryBackend()
    backend.add("web", labels=ON)
    backend.add("db", labels=ON)
    gw = await gateway_factory({"docker": {"reconcile_interval": 0}}, {"memory": backend})
    seen: list[tuple[str, dict[str, Any]]] = []
    mine: list[tuple[str, dict[str, Any]]] = []
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:

        async def follow(path: str, into: list[tuple[str, dict[str, Any]]]) -> None:
            async with client.stream("GET", path) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                assert r.headers["cache-control"] == "no-cache"
                async for frame in frames(r):
                    into.append(frame)

        everything = asyncio.create_task(follow("/v1/events", seen))
        only_db = asyncio.create_task(follow("/v1/events?service=db", mine))
        await wait_for(lambda: bool(seen) and bool(mine), 10, "the first frames")
        kind, first = seen[0]
        assert kind == "services"
        assert [s["name"] for s in first["services"]] == ["db", "web"]
        assert [s["name"] for s in mine[0][1]["services"]] == ["db"]

        r = await client.post("/v1/services/web/start?wait=true")
        assert r.status_code == 200

        def transitions() -> list[tuple[str, str]]:
            return [(d["from_state"], d["to_state"]) for k, d in seen if k == "transition"]

        await wait_for(lambda: ("starting", "ready") in transitions(), 10, "ready in the feed")
        assert transitions()[:2] == [("stopped", "starting"), ("starting", "ready")]
        ready = next(d for k, d in seen if k == "transition" and d["to_state"] == "ready")
        assert ready["service"] == "web" and ready["cause"] == "api"
        assert ready["status"]["state"] == "ready" and ready["status"]["upstream"]
        assert not [d for k, d in mine if k == "transition"]  # web's, not db's

        recent = (await client.get("/v1/events/recent?limit=10")).json()["events"]
        assert [(e["service"], e["to_state"]) for e in recent[:2]] == [
            ("web", "ready"),
            ("web", "starting"),
        ]
        unknown = await client.get("/v1/events?service=nope")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "service_not_found"

        # a shutdown ends the streams instead of waiting on them
        await gw.stop()
        await asyncio.wait_for(asyncio.gather(everything, only_db), 10)
    await backend.close()
