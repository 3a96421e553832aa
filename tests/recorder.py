"""An upstream for tests that records every request it receives: a real uvicorn server on
127.0.0.1 answering `<name>` (and `<name> ws:<text>` on a WebSocket), so a test can tell which
upstream a request reached and with which target and headers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from tests.conftest import free_port, wait_for


@dataclass
class Seen:
    method: str
    target: bytes  # raw path and query, as received
    headers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


@dataclass
class Recorder:
    """ASGI app: answers 200 `<name>` (or the HTML in `page`, for browsers) and remembers."""

    name: str
    seen: list[Seen] = field(default_factory=list)
    page: bytes | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        query = scope.get("query_string", b"")
        with self.lock:
            self.seen.append(
                Seen(
                    scope.get("method", "WEBSOCKET"),
                    scope["raw_path"] + (b"?" + query if query else b""),
                    list(scope["headers"]),
                )
            )
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while True:
                msg = await receive()
                if msg["type"] == "websocket.disconnect":
                    return
                await send({"type": "websocket.send", "text": f"{self.name} ws:{msg.get('text')}"})
        while (await receive()).get("more_body"):
            pass
        if self.page is not None:
            body, ctype = self.page, b"text/html; charset=utf-8"
        else:
            body, ctype = self.name.encode(), b"text/plain"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", ctype), (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def all_headers(self) -> list[tuple[bytes, bytes]]:
        with self.lock:
            return [h for s in self.seen for h in s.headers]


@contextlib.asynccontextmanager
async def serve_recorder(
    name: str, page: bytes | None = None
) -> AsyncIterator[tuple[Recorder, int]]:
    app = Recorder(name, page=page)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started or task.done(), 10, f"upstream {name} to listen")
    try:
        yield app, port
    finally:
        server.should_exit = True
        server.force_exit = True
        await asyncio.wait_for(task, 10)
