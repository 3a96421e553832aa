"""The live feed behind `GET /v1/events` (Server-Sent Events): lifecycle transitions and config
reloads as they happen, and every service's status every few seconds while anyone listens.

Each listener has a bounded queue; one that does not keep up loses its oldest messages (a
browser tab in the background must not hold the gateway's memory). `close()` ends every
stream, so that a shutdown never waits on an open dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

# Messages a listener may have waiting before its oldest are dropped.
QUEUE_MAX = 256
# How often the services' status goes out (counts change with every request, not only on
# transitions); also the keep-alive of an idle stream.
STATUS_EVERY_S = 2.0

_CLOSED: dict[str, Any] = {"type": "closed"}


class Feed:
    def __init__(self, status: Callable[[], list[dict[str, Any]]]) -> None:
        self._status = status
        self._listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        self._closed = False

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def publish(self, message: dict[str, Any]) -> None:
        for queue in self._listeners:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(message)

    def close(self) -> None:
        self._closed = True
        self.publish(_CLOSED)

    async def stream(self, service: str | None = None) -> AsyncIterator[bytes]:
        """SSE frames: `event: <type>` and `data: <json>`; `service` keeps only its own."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_MAX)
        self._listeners.add(queue)
        try:
            # a reconnecting EventSource waits this long; the first frame also makes every
            # proxy in between send the headers now
            yield b"retry: 2000\n\n"
            yield self._status_frame(service)
            while not self._closed:
                try:
                    message = await asyncio.wait_for(queue.get(), STATUS_EVERY_S)
                except TimeoutError:
                    yield self._status_frame(service)
                    continue
                if message is _CLOSED:
                    return
                if service is not None and message.get("service") not in (None, service):
                    continue
                yield _frame(message["type"], message)
        finally:
            self._listeners.discard(queue)

    def _status_frame(self, service: str | None) -> bytes:
        services = [s for s in self._status() if service is None or s["name"] == service]
        return _frame("services", {"type": "services", "services": services})


def _frame(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
