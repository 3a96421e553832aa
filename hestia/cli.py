"""The `hestia` command."""

from __future__ import annotations

import argparse
import gc
import os
import sys

from loguru import logger

from hestia import __version__
from hestia.backends import build_backends
from hestia.config import load_config
from hestia.errors import HestiaError
from hestia.logs import setup_logging
from hestia.server import build_server


def _serve(args: argparse.Namespace) -> int:
    setup_logging(os.environ.get("HESTIA_LOG_FORMAT", args.log_format or "json"), "INFO")
    try:
        config = load_config(args.config)
    except HestiaError as exc:
        logger.error("{}", exc.message)
        print(f"hestia: {exc.message}", file=sys.stderr)
        return 2
    log_format = os.environ.get("HESTIA_LOG_FORMAT") or args.log_format or config.logging.format
    log_level = args.log_level or config.logging.level
    setup_logging(log_format, log_level)
    from hestia.app import Gateway
    from hestia.proxy import JsonAccessLog

    try:
        gateway = Gateway(config, build_backends(config))
        gateway.store.migrate()  # a database that cannot be used stops start-up here, clearly
    except HestiaError as exc:
        logger.error("{}", exc.message)
        print(f"hestia: {exc.message}", file=sys.stderr)
        return 2
    from hestia.workers import PIPE_BUF, Controller, worker_count

    workers = worker_count(config.server.workers)
    access_writer = None
    if log_format == "json" and log_level.upper() in ("TRACE", "DEBUG", "INFO"):
        # the same JSON lines as the loguru sink, at half the cost per request
        access_writer = gateway.proxy.access_writer = JsonAccessLog(
            max_write=PIPE_BUF if workers > 1 else 0
        )
    host = args.host or config.server.host
    port = args.port or config.server.port
    controller = None
    if workers > 1:  # this process is the controller, on a private port (hestia/workers.py)
        config_path = args.config or os.environ.get("HESTIA_CONFIG")
        try:
            controller = Controller(
                gateway, workers, host, port, config_path, log_format, log_level
            )
        except OSError as exc:
            message = f"cannot listen on {host}:{port} for the workers: {exc.strerror}"
            logger.error("{}", message)
            print(f"hestia: {message}", file=sys.stderr)
            return 2
    server = build_server(
        gateway if controller is None else controller.wrap(gateway),
        host,
        port,
        shutdown_grace=config.server.shutdown_grace,
        on_exit=gateway.begin_shutdown if controller is None else controller.begin_shutdown,
        limits=config.server.limits,
        timeouts=config.server.timeouts,
    )
    if config.auth.enabled:
        logger.info(
            "authentication is on: {} key(s) ({})",
            len(config.auth.keys),
            ", ".join(k.name for k in config.auth.keys),
        )
    elif not _loopback(host):
        logger.warning(
            "Hestia listens on {}:{} without authentication: anyone who can reach this port "
            "can wake, use and stop every service behind it. Turn on `auth:` in the config "
            "(see README, Authentication), publish it on this machine only (the compose files "
            "bind 127.0.0.1 unless HESTIA_BIND is set) or put an authenticating proxy in front",
            host,
            port,
        )
    gc.collect()
    gc.freeze()  # everything built so far is permanent: later collections skip it
    logger.info("Hestia {} listening on http://{}:{}", __version__, host, port)
    try:
        server.run(sockets=None if controller is None else [controller.handoff_socket])
    finally:
        if access_writer is not None:
            access_writer.flush()
    return 0 if server.started else 1


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
