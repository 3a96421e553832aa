"""Wiring only: the ASGI entry point that sends /services/* to the proxy and the rest to the
control API, and the Gateway object that owns config, backend, registry and the upstream pool."""

from __future__ import annotations

import contextlib

from loguru import logger

from hestia.api import build_api
from hestia.backends.base import Backend
from hestia.config import HestiaConfig
from hestia.proxy import Proxy
from hestia.registry import Registry
from hestia.types import Receive, Scope, Send
from hestia.upstream import UpstreamPool


class Gateway:
    """The whole gateway as one ASGI app. `backend=None` means: no Docker (plain urls only)."""

    def __init__(self, config: HestiaConfig, backend: Backend | None) -> None:
        self.config = config
        self.backend = backend
        self.registry = Registry(config, backend)
        self.pool = UpstreamPool()
        self.proxy = Proxy(self.registry.get, self.pool)
        self.api = build_api(self.registry)
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["path"].startswith("/services/"):
            await self.proxy(scope, receive, send)
            return
        await self.api(scope, receive, send)

    async def startup(self) -> None:
        if self._started:
            return
        self._started = True
        await self.registry.start()
        logger.info(
            "Hestia ready with {} service(s): {}",
            len(self.registry.services),
            ", ".join(sorted(self.registry.services)) or "(none yet)",
        )

    def begin_shutdown(self) -> None:
        """Answer every held request 503 now; containers are left as they are."""
        self.registry.begin_shutdown()

    async def shutdown(self) -> None:
        await self.registry.close()
        await self.pool.aclose()
        if self.backend is not None:
            with contextlib.suppress(Exception):
                await self.backend.close()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("Hestia failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
