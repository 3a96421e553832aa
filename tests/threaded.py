"""Real servers on an event loop in a thread of their own, for synchronous test drivers
(hypothesis, schemathesis) that cannot await: gateways as `hestia serve` builds them, and plain
ASGI apps, each on 127.0.0.1 on a free port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from tests.conftest import free_port

T = TypeVar("T")


class ThreadedLoop:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
        self.gateways: list[Any] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _serve(self, server: uvicorn.Server) -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        self._servers.append((server, task))

    async def serve_app(self, app: Any) -> int:
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
        await self._serve(uvicorn.Server(config))
        return port

    async def gateway(self, raw: dict[str, Any], backends: Any = None) -> tuple[Any, int]:
        """A gateway for this config dict (its own SQLite file unless the config names one)."""
        from hestia.app import Gateway
        from hestia.config import parse_config
        from hestia.server import build_server

        raw.setdefault("docker", {}).setdefault("enabled", False)
        raw.setdefault("database", {"url": f"sqlite:///{self.tmp}/gw-{len(self.gateways)}.db"})
        gateway = Gateway(parse_config(raw, source="test"), backends)
        self.gateways.append(gateway)
        port = free_port()
        await self._serve(build_server(gateway, "127.0.0.1", port, shutdown_grace=2))
        return gateway, port

    async def _stop(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        await asyncio.wait([task for _, task in self._servers], timeout=20)

    def close(self) -> None:
        try:
            if self._servers:
                self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
