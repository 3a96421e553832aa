"""The `hestia` command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from types import FrameType
from typing import Any

import uvicorn
from loguru import logger
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hestia import __version__
from hestia.backends.base import Backend
from hestia.config import load_config
from hestia.errors import HestiaError
from hestia.logs import setup_logging


class _Server(uvicorn.Server):
    """uvicorn's server, telling the gateway about SIGTERM/SIGINT before draining connections,
    so that requests held for a start are answered 503 at once instead of holding shutdown."""

    def __init__(self, config: uvicorn.Config, on_exit: object) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        callback = self._on_exit
        if callable(callback):
            callback()
        super().handle_exit(sig, frame)


class _CoalescingTransport:
    """A client transport that sends everything written in one event-loop step at once.

    uvicorn writes a response head and its body separately, so a small proxied response costs
    two send() calls and two TCP segments; here they become one (writes are buffered and
    flushed at the end of the current loop iteration, in order). Everything else is the real
    transport's. Only for plain HTTP: a WebSocket upgrade gets the real transport.
    """

    __slots__ = ("_buf", "_loop", "_t")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._t = transport
        self._loop = loop
        self._buf: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        buf = self._buf
        if not buf:
            self._loop.call_soon(self._flush)
        buf.append(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        buf = self._buf
        if not buf:
            return
        self._buf = []
        if len(buf) == 1:
            self._t.write(buf[0])
        else:
            self._t.writelines(buf)

    def close(self) -> None:
        self._flush()
        self._t.close()

    def write_eof(self) -> None:
        self._flush()
        self._t.write_eof()

    def abort(self) -> None:
        self._buf = []
        self._t.abort()

    def get_write_buffer_size(self) -> int:
        return self._t.get_write_buffer_size() + sum(len(b) for b in self._buf)

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


def _serve(args: argparse.Namespace) -> int:
    setup_logging(os.environ.get("HESTIA_LOG_FORMAT", args.log_format or "json"), "INFO")
    try:
        config = load_config(args.config)
    except HestiaError as exc:
        logger.error("{}", exc.message)
        print(f"hestia: {exc.message}", file=sys.stderr)
        return 2
    setup_logging(
        os.environ.get("HESTIA_LOG_FORMAT") or args.log_format or config.logging.format,
        args.log_level or config.logging.level,
    )
    from hestia.app import Gateway

    backend: Backend | None = None
    if config.docker.enabled:
        from hestia.backends.docker import DockerBackend

        try:
            backend = DockerBackend(self_container=config.docker.self_container)
        except HestiaError as exc:
            logger.error("{}", exc.message)
            print(f"hestia: {exc.message}", file=sys.stderr)
            return 2
    gateway = Gateway(config, backend)
    host = args.host or config.server.host
    port = args.port or config.server.port
    uv_config = uvicorn.Config(
        gateway,
        host=host,
        port=port,
        loop="uvloop",
        http=_HttpProtocol,
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=int(config.server.shutdown_grace) or None,
        timeout_keep_alive=30,
    )
    server = _Server(uv_config, gateway.begin_shutdown)
    gc.collect()
    gc.freeze()  # everything built so far is permanent: later collections skip it
    logger.info("Hestia {} listening on http://{}:{}", __version__, host, port)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hestia", description="Personal on-demand service gateway"
    )
    parser.add_argument("--version", action="version", version=f"hestia {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config", help="config file (default: $HESTIA_CONFIG or ./hestia_config.yml)"
    )
    serve.add_argument("--host", help="address to listen on (default from config, 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port to listen on (default from config, 8080)")
    serve.add_argument("--log-format", choices=["json", "text"], help="default from config: json")
    serve.add_argument("--log-level", help="default from config: INFO")
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 2
    return _serve(args)
