"""The `hestia` command."""

from __future__ import annotations

import argparse
import gc
import os
import sys

from loguru import logger

from hestia import __version__
from hestia.backends import build_backends
from hestia.config import DEFAULT_CONFIG_PATH, load_config
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

    path = args.config or os.environ.get("HESTIA_CONFIG") or DEFAULT_CONFIG_PATH
    watched = path if (args.config or os.environ.get("HESTIA_CONFIG") or config.source) else None
    try:
        gateway = Gateway(config, build_backends(config), config_path=watched, handle_sighup=True)
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
        busy_poll=config.server.busy_poll,
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
    from hestia import control

    parser = argparse.ArgumentParser(
        prog="hestia",
        description="Personal on-demand service gateway",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes:\n"
        + "\n".join(f"  {code}  {what}" for code, what in control.EXIT_CODES.items())
        + "\n\nThe commands that talk to a gateway use --url (default: $HESTIA_URL, else "
        f"{control.DEFAULT_URL})\nand, when its auth is on, the key in $HESTIA_API_KEY.",
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

    def client(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--url", help=f"the gateway (default: $HESTIA_URL or {control.DEFAULT_URL})")
        return p

    status = client("status", help="services and their state (a table, or --json)")
    status.add_argument("name", nargs="?", help="one service (default: all)")
    status.add_argument("--json", action="store_true", help="the API's JSON")
    start = client("start", help="start a service")
    start.add_argument("name")
    start.add_argument(
        "--wait", action="store_true", help="follow its state changes until it is ready"
    )
    start.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    stop = client("stop", help="stop a service (after its requests in flight)")
    stop.add_argument("name")
    stop.add_argument("--no-wait", action="store_true", help="return before it has stopped")
    events = client("events", help="recent lifecycle events (--follow: and new ones)")
    events.add_argument("name", nargs="?", help="one service's (default: all)")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new ones")
    events.add_argument("--limit", type=int, default=20, help="how many recent ones (20)")
    events.add_argument("--json", action="store_true", help="one JSON object a line")
    config = sub.add_parser("config", help="the config file: check, schema, reload")
    config_sub = config.add_subparsers(dest="config_command")
    check = config_sub.add_parser("check", help="validate a config file (exit 0, or 1 and why)")
    check.add_argument("file", nargs="?", help="default: $HESTIA_CONFIG or ./hestia_config.yml")
    config_sub.add_parser("schema", help="print the JSON Schema of the config file")
    reload = config_sub.add_parser("reload", help="make a running gateway read its file again")
    reload.add_argument(
        "--url", help=f"the gateway (default: $HESTIA_URL or {control.DEFAULT_URL})"
    )

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "status":
        return control.run(lambda c: control.status(c, args.name, args.json), args.url)
    if args.command == "start":
        return control.run(lambda c: control.start(c, args.name, args.wait, args.timeout), args.url)
    if args.command == "stop":
        return control.run(lambda c: control.stop(c, args.name, not args.no_wait), args.url)
    if args.command == "events":
        return control.run(
            lambda c: control.events(c, args.name, args.follow, args.limit, args.json), args.url
        )
    if args.command == "config":
        if args.config_command == "check":
            return control.config_check(args.file, sys.stdout, sys.stderr)
        if args.config_command == "schema":
            return control.config_schema(sys.stdout)
        if args.config_command == "reload":
            return control.run(control.reload, args.url)
        config.print_help(sys.stderr)
        return control.USAGE
    parser.print_help(sys.stderr)
    return control.USAGE
