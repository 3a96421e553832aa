"""A data-plane worker process (`python -m hestia.worker`), started by the controller in
`hestia.workers` (see its docstring): it proxies requests for the services the controller's
table calls fast, hands everything else to the controller, and reports."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

from loguru import logger

from hestia.address import Upstream
from hestia.auth import Authenticator
from hestia.config import AuthConfig
from hestia.errors import UpstreamUnreachable, send_error
from hestia.headers import TrustedProxies
from hestia.router import Route, Router
from hestia.types import ASGIApp, Receive, Scope, Send
from hestia.upstream import UpstreamError, UpstreamPool, UpstreamTimeouts
from hestia.workers import (
    HANDOFF_CLIENT,
    HANDOFF_TOKEN,
    HOP_BY_HOP,
    PIPE_BUF,
    REPORT_S,
    reuseport_socket,
)

# how long a starting worker waits for the controller's first table before it serves
FIRST_TABLE_S = 5.0


class _PassForwarded(TrustedProxies):
    """A hand-off's trust: the client's X-Forwarded-* are kept as they are."""

    def trusts(self, client_ip: str | None) -> bool:
        return True


class _Config:
    __slots__ = ("preserve_host", "strategy")

    def __init__(self, preserve_host: bool, strategy: str) -> None:
        self.preserve_host = preserve_host
        self.strategy = strategy


class _RemoteService:
    """The part of `lifecycle.Service` the proxy uses, for a service the controller says is
    ready: no waiting, and in-flight counts kept for the reports."""

    wake = None

    def __init__(self, worker: Worker, name: str, entry: dict[str, Any]) -> None:
        from hestia.lifecycle import State

        self.state = State.READY
        self._worker = worker
        self.name = name
        self.upstream = Upstream(
            entry["host"], entry["port"], entry["base"].encode("latin-1"), entry["hh"].encode()
        )
        self.config = _Config(entry["preserve_host"], entry["strategy"])
        connect, headers, body = entry["timeouts"]
        self.timeouts = UpstreamTimeouts(connect, headers, body)

    def acquire_now(self) -> Upstream:
        busy = self._worker.busy
        busy[self.name] = busy.get(self.name, 0) + 1
        self._worker.dirty = True  # reported within REPORT_S: a long request shows as busy
        return self.upstream

    async def acquire(self) -> Upstream:
        return self.acquire_now()

    def release(self, touch: bool = True) -> None:
        busy = self._worker.busy
        busy[self.name] -= 1
        if touch:
            self._worker.touched.add(self.name)
        self._worker.dirty = True

    async def instance_gone(self, upstream: Upstream) -> bool:
        # the controller knows (it asks the backend): the proxy hands the request to it
        # (Proxy.hand_off), which retries after a restart or answers 502 as it would alone
        return True

    def note_refusal(self, code: str) -> None:
        pass


class Worker:
    """A data-plane worker: the fast path itself, the rest handed to the controller."""

    def __init__(self, index: int, control_path: str, handoff_port: int, token: bytes) -> None:
        from hestia.metrics import Metrics
        from hestia.proxy import Proxy

        self.index = index
        self.control_path = control_path
        self.handoff = Upstream(
            "127.0.0.1", handoff_port, b"", f"127.0.0.1:{handoff_port}".encode()
        )
        self.token = token
        self.generation = -1
        self.services: dict[str, _RemoteService] = {}
        self.router = Router()
        self.busy: dict[str, int] = {}
        self.touched: set[str] = set()
        self.dirty = False
        self.metrics = Metrics()
        self._sent_counts: dict[str, list[int]] = {}
        self.pool = UpstreamPool()
        self.handoff_pool = UpstreamPool()
        self.proxy = Proxy(self._lookup, self.pool, self.metrics)
        self.proxy.hand_off = self._handoff
        self.handoff_all = False  # everything to the controller (too many suspects)
        # auth on: the controller's key set; requests it does not plainly admit, and those
        # from addresses with failed keys on record, are the controller's to answer
        self.auth: Authenticator | None = None
        self._authenticator = Authenticator(AuthConfig())
        self.suspects: frozenset[str] = frozenset()
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._first_table = asyncio.Event()

    def _lookup(self, name: str) -> Any:
        return self.services[name]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if not self.handoff_all:
            route = self.router.resolve(scope)
            if route is not None and route.service in self.services:
                auth = self.auth
                if auth is None:
                    await self.proxy.handle(scope, receive, send, route)
                    return
                headers = scope["headers"]  # as they came: a hand-off carries the key
                if (
                    not self.suspects or auth.client_address(scope) not in self.suspects
                ) and auth.admits_quietly(scope, route):
                    scope["hestia.headers_in"] = headers
                    await self.proxy.handle(scope, receive, send, route)
                    return
        if kind == "websocket":
            await self._handoff_websocket(scope, receive, send)
        else:
            await self._handoff(scope, receive, send)

    # -------------------------------------------------------------- handing off
    def _handoff_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        client = scope.get("client")
        who = f"{client[0]} {client[1]}" if client else ""
        return [(HANDOFF_TOKEN, self.token), (HANDOFF_CLIENT, who.encode("latin-1"))]

    async def _handoff(self, scope: Scope, receive: Receive, send: Send) -> None:
        received: list[tuple[bytes, bytes]] = scope.get("hestia.headers_in") or scope["headers"]
        headers = [(k, v) for k, v in received if k not in HOP_BY_HOP]
        has_body = False
        for key, value in received:
            if (key == b"content-length" and value.strip() not in (b"", b"0")) or (
                key == b"transfer-encoding"
            ):
                has_body = True
        headers += self._handoff_headers(scope)
        target: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        if query:
            target += b"?" + query
        task = asyncio.current_task()
        assert task is not None
        gone = False
        watcher: asyncio.Task[None] | None = None

        async def body() -> AsyncIterator[bytes]:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise asyncio.CancelledError
                if msg.get("body"):
                    yield msg["body"]
                if not msg.get("more_body", False):
                    return

        async def watch() -> None:
            nonlocal gone
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    gone = True
                    task.cancel()
                    return

        try:
            if not has_body:
                watcher = asyncio.create_task(watch())
            try:
                resp = await self.handoff_pool.request(
                    self.handoff.host,
                    self.handoff.port,
                    scope["method"].encode(),
                    target,
                    headers,
                    body() if has_body else None,
                    timeouts=UpstreamTimeouts(5.0, None, None),
                )
            except UpstreamError as exc:
                await send_error(
                    send,
                    UpstreamUnreachable(
                        f"the Hestia controller did not answer this worker: {exc.reason}; "
                        "it may be restarting, try again"
                    ),
                )
                return
            try:
                out = [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP and k != b"date"]
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                last = b""
                if resp.has_body():
                    async for chunk in resp.read_chunks():
                        if resp.complete:
                            last = chunk
                            break
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": last, "more_body": False})
            except UpstreamError:
                abort = scope.get("extensions", {}).get("hestia.abort")
                if abort is None:
                    raise
                abort()
            finally:
                await resp.aclose()
        except asyncio.CancelledError:
            if gone and task.uncancel() == 0:
                return  # the client left: the connection to the controller is closed
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _handoff_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        from hestia.websocket import _relay

        scope = dict(scope)
        scope["headers"] = [
            (k, v) for k, v in scope["headers"] if k not in (HANDOFF_TOKEN, HANDOFF_CLIENT)
        ] + self._handoff_headers(scope)
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        route = Route("", raw, b"", False, True)
        # X-Forwarded-* go on as they came, with no address added: the controller applies
        # its trust to them, for the client named in the hand-off header
        scope["client"] = None
        await _relay(scope, receive, send, route, self.handoff, _PassForwarded(), True)

    # -------------------------------------------------------------- control channel
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                reader, self._writer = await asyncio.open_unix_connection(self.control_path)
                self._writer.write(json.dumps({"index": self.index, "pid": os.getpid()}).encode())
                self._writer.write(b"\n")
                self._tasks.append(asyncio.create_task(self._read_tables(reader)))
                self._tasks.append(asyncio.create_task(self._report_loop()))
                # serve from the first table on: connections the kernel queued on this socket
                # meanwhile would all be handed off (bounded: a controller that does not send
                # one in time gets them handed off, which is slower but right)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._first_table.wait(), FIRST_TABLE_S)
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                self._report()  # the last counters
                for task in self._tasks:
                    task.cancel()
                if self._writer is not None:
                    with contextlib.suppress(ConnectionError):
                        await self._writer.drain()
                    self._writer.close()
                await self.pool.aclose()
                await self.handoff_pool.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _read_tables(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            table = json.loads(line)
            self.services = {
                name: _RemoteService(self, name, entry) for name, entry in table["services"].items()
            }
            self.router.configure(table["hosts"], table["keep"])
            self.handoff_all = table["handoff_all"]
            # auth as the running config has it (a reload may have turned it on or off)
            self._authenticator.use_worker_state(table["auth"])
            self.auth = self._authenticator if self._authenticator.enabled else None
            self.suspects = frozenset(table["suspects"])
            self.generation = table["gen"]
            self._report()
            self._first_table.set()
        logger.error("the controller closed the control channel: this worker stops")
        os.kill(os.getpid(), signal.SIGTERM)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_S)
            if self.dirty or self.touched:
                self._report()

    def _report(self) -> None:
        counts: dict[str, list[int]] = {}
        for name, m in self.metrics.services.items():
            now = [*m.requests, m.errors, m.upstream_errors, m.bytes_in, m.bytes_out]
            before = self._sent_counts.get(name, [0] * 9)
            if now != before:
                counts[name] = [a - b for a, b in zip(now, before, strict=True)]
                self._sent_counts[name] = now
        report = {
            "ack": self.generation,
            "busy": {k: v for k, v in self.busy.items() if v},
            "touched": sorted(self.touched),
            "counts": counts,
        }
        self.touched.clear()
        self.dirty = False
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(report).encode() + b"\n")


def _worker_main(argv: list[str] | None = None) -> int:
    import gc

    from hestia.config import load_config
    from hestia.logs import setup_logging
    from hestia.proxy import JsonAccessLog
    from hestia.server import build_server

    ap = argparse.ArgumentParser(prog="hestia-worker")
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--handoff-port", type=int, required=True)
    ap.add_argument("--config")
    ap.add_argument("--log-format", default="json")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    config = load_config(args.config)
    token = os.environ.pop("HESTIA_HANDOFF_TOKEN", "").encode()
    worker = Worker(args.index, args.control, args.handoff_port, token)
    # until the first table: auth as the file has it, checked by the controller
    worker.handoff_all = config.auth.enabled
    worker._authenticator = Authenticator(
        AuthConfig(), TrustedProxies(config.server.trusted_proxies)
    )
    # the same proxy as the controller's: access lines as configured, the same trusted proxies
    worker.proxy = type(worker.proxy)(
        worker._lookup,
        worker.pool,
        worker.metrics,
        config.logging.access,
        TrustedProxies(config.server.trusted_proxies),
    )
    worker.proxy.hand_off = worker._handoff
    writer = None
    if args.log_format == "json" and args.log_level.upper() in ("TRACE", "DEBUG", "INFO"):
        writer = worker.proxy.access_writer = JsonAccessLog(max_write=PIPE_BUF)
    sock = reuseport_socket(args.host, args.port)
    server = build_server(
        cast(ASGIApp, worker),
        args.host,
        args.port,
        shutdown_grace=config.server.shutdown_grace,
        limits=config.server.limits,
        timeouts=config.server.timeouts,
        busy_poll=config.server.busy_poll,
    )
    gc.collect()
    gc.freeze()
    try:
        server.run(sockets=[sock])
    finally:
        if writer is not None:
            writer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
