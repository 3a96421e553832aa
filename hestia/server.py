"""The HTTP server around the gateway: uvicorn, tuned for a proxy.

`build_server()` is what `hestia serve` runs and what the tests run, so the tests exercise the
same protocol class (and its write coalescing) as production.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hestia.types import ASGIApp


class HestiaServer(uvicorn.Server):
    """uvicorn's server, telling the gateway about SIGTERM/SIGINT before draining connections,
    so that requests held for a start are answered 503 at once instead of holding shutdown."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._on_exit is not None:
            self._on_exit()
        super().handle_exit(sig, frame)


class _CoalescingTransport:
    """A client transport that sends a response head together with the body that follows it.

    uvicorn writes a response head and its body separately, so a small proxied response would
    cost two send() calls and two TCP segments. Here a write is held back until the next one,
    and both go out in one writev; a write that nothing follows within the same event-loop
    step is sent at the end of that step (so a streamed response's head, or each chunk of a
    stream, is never held longer than that). Everything else is the real transport's.
    """

    __slots__ = ("_held", "_loop", "_scheduled", "_t")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._t = transport
        self._loop = loop
        self._held: bytes | None = None
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        held = self._held
        if held is None:
            self._held = data
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._flush)
        else:
            self._held = None
            self._t.writelines((held, data))

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        self._scheduled = False
        held = self._held
        if held is not None:
            self._held = None
            if not self._t.is_closing():  # the peer may have gone since
                self._t.write(held)

    def close(self) -> None:
        self._flush()
        self._t.close()

    def write_eof(self) -> None:
        self._flush()
        self._t.write_eof()

    def abort(self) -> None:
        self._held = None
        self._t.abort()

    def is_closing(self) -> bool:  # asked once per response: no __getattr__ detour
        return self._t.is_closing()

    def get_write_buffer_size(self) -> int:
        size = self._t.get_write_buffer_size()
        return size + len(self._held) if self._held is not None else size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a _CoalescingTransport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._real_transport = transport
        wrapped: Any = _CoalescingTransport(transport, self.loop)
        super().connection_made(wrapped)

    def handle_websocket_upgrade(self) -> None:
        self.transport._flush()  # type: ignore[attr-defined]
        self.transport = self._real_transport
        super().handle_websocket_upgrade()


def build_server(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    shutdown_grace: float = 30.0,
    on_exit: Callable[[], None] | None = None,
) -> HestiaServer:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=_HttpProtocol,
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=int(shutdown_grace) or None,
        timeout_keep_alive=30,
    )
    return HestiaServer(config, on_exit)
