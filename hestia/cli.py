"""The `hestia` command."""

from __future__ import annotations

import argparse
import os
import sys
from types import FrameType

import uvicorn
from loguru import logger

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
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=int(config.server.shutdown_grace) or None,
        timeout_keep_alive=30,
    )
    server = _Server(uv_config, gateway.begin_shutdown)
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
