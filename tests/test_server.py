"""The server at the edge: head limits, timeouts, connection caps, refused requests, trailers,
the abort extension and the Date header, against a real `build_server` on 127.0.0.1 (and the
real `hestia serve` process) with raw sockets."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from hestia.config import ServerLimits, ServerTimeouts
from hestia.limits import raise_nofile_limit
from hestia.server import BUSY_POLL_AUTO_S, BusyPoll, build_server, busy_poll_seconds
from hestia.types import Receive, Scope, Send
from tests.conftest import free_port, wait_for

APP_DATE = b"Tue, 01 Jan 2030 00:00:00 GMT"


# ------------------------------------------------------------------ the app behind the server
class App:
    """Echoes what it saw as JSON; a few paths do one odd thing each."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.disconnects = 0
        self.gone: list[str] = []
        self.received: list[str] = []
        self.waiting = asyncio.Event()
        self.read_now = asyncio.Event()
        self.body_types: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while (await receive())["type"] != "websocket.disconnect":
                pass
            return
        self.scopes.append(scope)
        path = scope["path"]
        if path in ("/abort", "/unfinished"):
            start = {"type": "http.response.start", "status": 200, "headers": []}
            await send(start)
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            if path == "/abort":
                scope["extensions"]["hestia.abort"]()
            return
        if path.startswith("/respond"):  # the whole response in one call (hestia.respond)
            headers = [(b"x-app", b"1")]
            if path == "/respond":
                headers.append((b"content-length", b"5"))
            if path == "/respond-bad":
                headers.append((b"x-split", b"a\r\nx-injected: 1"))
            respond = scope["extensions"]["hestia.respond"]
            assert respond(200, headers, b"hello")
            # the response is complete: a second one is refused, nothing is sent
            assert not respond(200, [], b"again")
            return
        if path == "/bad-name":
            start = {"type": "http.response.start", "status": 200, "headers": [(b"a b", b"1")]}
            await send(start)
            return
        if path == "/bad-value":
            headers = [(b"x-ok", b"1"), (b"x-split", b"a\r\nx-injected: 1")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            return
        if path == "/on-gone":  # waits for ever; says when the client has gone
            on_gone = scope["extensions"]["hestia.on_gone"]
            assert on_gone(lambda: self.gone.append("kept"))
            await asyncio.sleep(0)
            assert on_gone(lambda: self.gone.append("replaced"))
            taken_back = asyncio.get_running_loop().create_future()
            assert on_gone(None)  # taken back: not called
            on_gone(lambda: self.gone.append("called"))
            self.waiting.set()
            await taken_back
            return
        if path == "/listen":  # reads the (empty) body, then listens for the disconnect
            while True:
                msg = await receive()
                self.received.append(msg["type"])
                self.waiting.set()
                if msg["type"] == "http.disconnect" or len(self.received) > 100:
                    return
        if path == "/two-receivers":  # two tasks wait in receive() for the same body
            tasks = {asyncio.ensure_future(receive()), asyncio.ensure_future(receive())}
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = done.pop().result()
            start = {"type": "http.response.start", "status": 200, "headers": []}
            await send(start)
            await send({"type": "http.response.body", "body": first["body"]})
            self.received.append(first["type"])
            for task in done | pending:  # the other one: the disconnect, once answered
                self.received.append((await task)["type"])
            return
        if path == "/early":  # answers without reading the body
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/late-reader":
            await asyncio.sleep(1.5)  # three body timeouts: the app is busy, not the client
        if path == "/reads-later":
            await self.read_now.wait()
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                self.disconnects += 1
                return
            self.body_types.add(type(msg.get("body", b"")).__name__)
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        out = json.dumps(
            {
                "path": path,
                "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
                "body_len": len(body),
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(out))]
        if path == "/date":
            headers.append((b"date", APP_DATE))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})


class Served:
    def __init__(self, app: App, port: int, server: Any) -> None:
        self.app = app
        self.port = port
        self.server = server


StartServer = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[StartServer]:
    """Start `build_server(App(), ...)` on 127.0.0.1 with the given limits and timeouts."""
    running: list[tuple[Any, asyncio.Task[None]]] = []

    async def start(**kwargs: Any) -> Served:
        app = App()
        port = free_port()
        server = build_server(app, "127.0.0.1", port, shutdown_grace=2, **kwargs)
        task = asyncio.create_task(server.serve())
        running.append((server, task))
        await wait_for(lambda: server.started or task.done(), 20, "the server to listen")
        if task.done():
            task.result()
        return Served(app, port, server)

    yield start
    for server, _ in running:
        server.should_exit = True
    for _, task in running:
        try:
            await asyncio.wait_for(task, 15)
        except Exception:
            task.cancel()


@pytest.fixture
def warnings_log() -> Iterator[list[Any]]:
    """Every loguru record at WARNING or above while the test runs (uvicorn's too)."""
    records: list[Any] = []
    handler = logger.add(lambda m: records.append(m.record), level="WARNING")
    yield records
    logger.remove(handler)


# ------------------------------------------------------------------ a raw HTTP client
class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return json.loads(self.body)


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, source: str | None = None) -> Conn:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0) if source else None, limit=1 << 20
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 10.0) -> Response:
        return await asyncio.wait_for(self._response(), timeout)

    async def _response(self) -> Response:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = [
            (k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:] if h)
        ]
        lengths = [v for k, v in headers if k == "content-length"]
        if lengths:
            body = await self.reader.readexactly(int(lengths[0]))
        elif ("transfer-encoding", "chunked") in headers:
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await self.reader.read()
        return Response(status, headers, body)

    async def closed(self, timeout: float = 10.0) -> bool:
        """True once the server has closed the connection (EOF or reset), within `timeout`."""
        try:
            return await asyncio.wait_for(self.reader.read(65536), timeout) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.writer.close()


def get(path: str = "/", *, host: bytes = b"gw", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"


async def refused(served: Served, data: bytes) -> Response:
    """Send `data` on a new connection; the answer must close the connection."""
    conn = await Conn.open(served.port)
    await conn.send(data)
    resp = await conn.response()
    assert resp.header("connection") == ["close"]
    assert resp.header("content-type") == ["application/json"]
    assert await conn.closed()
    conn.close()
    return resp


def error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


async def ok(served: Served, data: bytes) -> Response:
    conn = await Conn.open(served.port)
    await conn.send(data)
    resp = await conn.response()
    conn.close()
    assert resp.status == 200, resp.body
    return resp


# ------------------------------------------------------------------ head limits
async def test_request_line_over_its_limit_is_414(serve: StartServer) -> None:
    served = await serve()
    await ok(served, get("/" + "a" * 8000))  # within 8 KiB
    resp = await refused(served, get("/" + "a" * 9000))
    assert resp.status == 414
    assert resp.json() == error(
        "uri_too_long",
        "the request line is longer than 8192 bytes (server.limits.max_request_line); "
        "shorten the URL or raise the limit",
    )
    assert not [s for s in served.app.scopes if len(s["path"]) > 8500]


async def test_header_line_over_its_limit_is_431(serve: StartServer) -> None:
    served = await serve()
    await ok(served, get(extra=b"x-big: " + b"a" * 8000 + b"\r\n"))
    resp = await refused(served, get(extra=b"x-big: " + b"a" * 9000 + b"\r\n"))
    assert resp.status == 431
    assert resp.json() == error(
        "request_header_too_large",
        "a request header line is longer than 8192 bytes (server.limits.max_header_line)",
    )


async def test_header_line_growing_over_many_reads_is_431(serve: StartServer) -> None:
    """The unfinished line is counted across reads, not only within one."""
    served = await serve()
    conn = await Conn.open(served.port)
    await conn.send(b"GET / HTTP/1.1\r\nHost: gw\r\nx-big: ")
    for _ in range(20):  # 20 x 600 bytes, each its own write
        try:
            await conn.send(b"a" * 600)
        except (ConnectionResetError, BrokenPipeError):
            break
        await asyncio.sleep(0.01)  # a pause between writes, so that reads come apart
    resp = await conn.response()
    assert resp.status == 431
    assert "header line" in resp.json()["error"]["message"]
    conn.close()


async def test_headers_over_the_total_limit_are_431(serve: StartServer) -> None:
    served = await serve()
    field = b"a" * 7000
    await ok(served, get(extra=b"".join(b"x-%d: %s\r\n" % (i, field) for i in range(8))))
    resp = await refused(
        served, get(extra=b"".join(b"x-%d: %s\r\n" % (i, field) for i in range(10)))
    )
    assert resp.status == 431
    assert resp.json() == error(
        "request_header_too_large",
        "the request head is larger than 65536 bytes (server.limits.max_header_bytes)",
    )


async def test_more_header_fields_than_the_limit_are_431(serve: StartServer) -> None:
    served = await serve()
    await ok(served, get(extra=b"".join(b"x-%d: 1\r\n" % i for i in range(99))))  # + Host
    resp = await refused(served, get(extra=b"".join(b"x-%d: 1\r\n" % i for i in range(100))))
    assert resp.status == 431
    assert resp.json() == error(
        "request_header_too_large",
        "the request has more than 100 header fields (server.limits.max_headers)",
    )


async def test_limits_come_from_the_config(serve: StartServer) -> None:
    served = await serve(limits=ServerLimits(max_header_line=1024, max_headers=10))
    resp = await refused(served, get(extra=b"x-big: " + b"a" * 1100 + b"\r\n"))
    assert resp.status == 431
    assert "1024 bytes" in resp.json()["error"]["message"]
    resp = await refused(served, get(extra=b"".join(b"x-%d: 1\r\n" % i for i in range(10))))
    assert resp.json()["error"]["message"].startswith("the request has more than 10 header")


async def test_pipelined_requests_are_answered_in_order(serve: StartServer) -> None:
    served = await serve()
    conn = await Conn.open(served.port)
    big = b"x-big: " + b"a" * 7000 + b"\r\n"
    await conn.send(get("/one", extra=big) + get("/two", extra=big) + get("/three"))
    paths = [(await conn.response()).json()["path"] for _ in range(3)]
    assert paths == ["/one", "/two", "/three"]
    # a pipelined head over a limit: the earlier answer is complete, then the connection ends
    await conn.send(get("/four") + get("/five", extra=b"x-big: " + b"a" * 9000 + b"\r\n"))
    assert (await conn.response()).json()["path"] == "/four"
    assert await conn.closed()
    conn.close()


# ------------------------------------------------------------------ timeouts
SHORT = ServerTimeouts(header=0.5, body=0.5, keep_alive=0.5)


async def test_slowloris_head_gets_408(serve: StartServer, warnings_log: list[Any]) -> None:
    served = await serve(timeouts=SHORT)
    conn = await Conn.open(served.port)
    await conn.send(b"GET / HTTP/1.1\r\nHost: gw\r\nx-slow: ")
    resp = await conn.response()
    assert resp.status == 408
    assert resp.json() == error(
        "request_timeout",
        "the request head did not arrive in full within 0.5s (server.timeouts.header)",
    )
    assert await conn.closed()
    conn.close()
    assert any("answered 408 to 127.0.0.1" in r["message"] for r in warnings_log)


async def test_silent_connection_and_idle_keep_alive_are_closed(serve: StartServer) -> None:
    served = await serve(timeouts=SHORT)
    silent = await Conn.open(served.port)
    assert await silent.closed(), "a connection that never sent a byte stayed open"
    silent.close()
    idle = await Conn.open(served.port)
    await idle.send(get("/"))
    assert (await idle.response()).status == 200
    assert await idle.closed(), "an idle keep-alive connection stayed open"
    idle.close()


async def test_stalled_body_gets_408(serve: StartServer) -> None:
    served = await serve(timeouts=SHORT)
    conn = await Conn.open(served.port)
    await conn.send(b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n0123456789")
    resp = await conn.response()
    assert resp.status == 408
    assert resp.json() == error(
        "request_timeout",
        "no byte of the request body arrived for 0.5s (server.timeouts.body)",
    )
    assert await conn.closed()
    conn.close()
    await wait_for(lambda: served.app.disconnects == 1, 5, "the app to see the disconnect")


async def test_stalled_body_after_an_early_answer_is_closed_unanswered(serve: StartServer) -> None:
    served = await serve(timeouts=SHORT)
    conn = await Conn.open(served.port)
    await conn.send(b"POST /early HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n0123456789")
    assert (await conn.response()).status == 204
    assert await conn.closed(), "a second answer (or nothing at all) came instead of the close"
    conn.close()


async def test_body_timeout_spares_a_client_the_app_is_not_reading(serve: StartServer) -> None:
    """Reading paused (the app has not taken 64 KiB yet) and a client waiting for
    100-continue are not late, however long the app takes."""
    served = await serve(timeouts=SHORT)
    conn = await Conn.open(served.port)
    body = b"x" * 300_000
    await conn.send(b"POST /late-reader HTTP/1.1\r\nHost: gw\r\nContent-Length: 300000\r\n\r\n")
    conn.writer.write(body)  # more than the server buffers: reading is paused until the app reads
    resp = await conn.response()
    assert resp.status == 200
    assert resp.json()["body_len"] == len(body)

    await conn.send(
        b"POST /late-reader HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 10)
    assert interim.startswith(b"HTTP/1.1 100 ")
    await conn.send(b"hello")
    resp = await conn.response()
    assert resp.status == 200
    assert resp.json()["body_len"] == 5
    conn.close()


# ------------------------------------------------------------------ connection caps
async def test_connections_over_the_per_client_cap_are_refused(
    serve: StartServer, warnings_log: list[Any]
) -> None:
    served = await serve(limits=ServerLimits(max_connections_per_client=3))
    held = [await Conn.open(served.port) for _ in range(3)]
    for conn in held:  # each is accepted and counted
        await conn.send(get("/"))
        assert (await conn.response()).status == 200
    extra = [await Conn.open(served.port) for _ in range(2)]
    for conn in extra:
        resp = await conn.response()
        assert resp.status == 503
        assert resp.json() == error(
            "too_many_connections",
            "127.0.0.1 has 3 open connections to the gateway, its limit per client "
            "(server.limits.max_connections_per_client); close some and try again",
        )
        assert await conn.closed()
        conn.close()
    lines = [r for r in warnings_log if r["extra"].get("limit") == "max_connections_per_client"]
    assert len(lines) == 1, "refusals of one kind are logged once per interval"
    assert "from 127.0.0.1: it has 3 open" in lines[0]["message"]
    # another client address is not affected, and a closed connection frees its slot
    other = await Conn.open(served.port, source="127.0.0.2")
    await other.send(get("/"))
    assert (await other.response()).status == 200
    other.close()
    held[0].close()

    async def admitted() -> bool:
        conn = await Conn.open(served.port)
        await conn.send(get("/"))
        try:
            return (await conn.response()).status == 200
        finally:
            conn.close()

    await wait_for(admitted, 10, "a freed slot to admit a new connection")
    for conn in held[1:]:
        conn.close()


async def test_connections_over_the_total_cap_are_refused(
    serve: StartServer, warnings_log: list[Any]
) -> None:
    served = await serve(limits=ServerLimits(max_connections=4, max_connections_per_client=3))
    held = [await Conn.open(served.port) for _ in range(3)]
    held.append(await Conn.open(served.port, source="127.0.0.2"))
    for conn in held:
        await conn.send(get("/"))
        assert (await conn.response()).status == 200
    late = await Conn.open(served.port, source="127.0.0.3")
    resp = await late.response()
    assert resp.status == 503
    assert resp.json()["error"]["message"].startswith("the gateway has 4 open connections")
    late.close()
    lines = [r for r in warnings_log if r["extra"].get("limit") == "max_connections"]
    assert len(lines) == 1
    assert "refused a connection from 127.0.0.3: 4 connections are open" in lines[0]["message"]
    for conn in held:
        conn.close()


async def test_a_websocket_holds_its_slot_until_it_ends(serve: StartServer) -> None:
    served = await serve(limits=ServerLimits(max_connections_per_client=2))
    ws = await Conn.open(served.port)
    await ws.send(
        get(
            "/ws",
            extra=b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        )
    )
    head = await asyncio.wait_for(ws.reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 ")
    second = await Conn.open(served.port)
    await second.send(get("/"))
    assert (await second.response()).status == 200
    third = await Conn.open(served.port)
    assert (await third.response()).status == 503  # the WebSocket counts
    third.close()
    ws.close()

    async def admitted() -> bool:
        conn = await Conn.open(served.port)
        await conn.send(get("/"))
        try:
            return (await conn.response()).status == 200
        finally:
            conn.close()

    await wait_for(admitted, 10, "the WebSocket's slot to be given back")
    second.close()


# ------------------------------------------------------------------ what must not pass
async def test_trailers_never_become_request_headers(serve: StartServer) -> None:
    served = await serve()
    conn = await Conn.open(served.port)
    await conn.send(
        b"POST /echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-User: admin\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n" + get("/after")
    )
    first = (await conn.response()).json()
    assert first["body_len"] == 5
    names = [k for k, _ in first["headers"]]
    assert names == ["host", "transfer-encoding"]
    second = (await conn.response()).json()
    assert [k for k, _ in second["headers"]] == ["host"]
    conn.close()


async def test_an_endless_trailer_section_is_refused(serve: StartServer) -> None:
    served = await serve()
    conn = await Conn.open(served.port)
    await conn.send(
        b"POST /echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Big: "
    )
    try:
        for _ in range(40):  # 40 x 8 KiB of one trailer line: more than the 64 KiB limit
            await conn.send(b"a" * 8192)
    except (ConnectionResetError, BrokenPipeError):
        pass
    resp = await conn.response()
    assert resp.status == 431
    assert resp.json()["error"]["message"] == (
        "the chunked request's trailer section is larger than 65536 bytes "
        "(server.limits.max_header_bytes)"
    )
    assert await conn.closed()
    conn.close()
    await wait_for(lambda: served.app.disconnects == 1, 5, "the app to see the disconnect")


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (
            b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
            "the request has no Host header (HTTP/1.1 requires one)",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: gw\r\nHost: other\r\n\r\n",
            "the request has 2 Host headers (one is allowed)",
        ),
        (
            b"GET http://other.example/x HTTP/1.1\r\nHost: gw\r\n\r\n",
            "the request target 'http://other.example/x' names another host than the "
            "request's Host ('gw'); Hestia is not a forward proxy: send the path only "
            "(GET /services/<name>/...)",
        ),
    ],
)
async def test_ambiguous_requests_are_400(serve: StartServer, head: bytes, message: str) -> None:
    served = await serve()
    resp = await refused(served, head)
    assert resp.status == 400
    assert resp.json() == error("bad_request", message)
    assert served.app.scopes == []


async def test_host_rules_that_still_pass(serve: StartServer) -> None:
    served = await serve()
    # HTTP/1.0 needs no Host
    resp = await ok(served, b"GET /old HTTP/1.0\r\n\r\n")
    assert resp.json()["path"] == "/old"
    # an absolute-form target naming the request's own Host is its path
    port = str(served.port).encode()
    authority = b"127.0.0.1:" + port
    resp = await ok(
        served,
        b"GET http://" + authority + b"/abs?q=1 HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n",
    )
    assert resp.json()["path"] == "/abs"
    resp = await ok(served, b"GET HTTP://GW:80/abs2 HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert resp.json()["path"] == "/abs2"


async def test_connect_is_501(serve: StartServer) -> None:
    served = await serve()
    resp = await refused(served, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert resp.status == 501
    assert resp.json() == error(
        "method_not_implemented",
        "CONNECT is not supported: Hestia is a gateway, not a forward proxy; request "
        "http://<gateway>/services/<name>/... instead",
    )
    assert served.app.scopes == []


async def test_invalid_http_is_400_json(serve: StartServer) -> None:
    served = await serve()
    resp = await refused(served, b"GET / HTTP/1.1\r\nHost: gw\r\nBad Header\r\n\r\n")
    assert resp.status == 400
    assert resp.json()["error"]["code"] == "bad_request"
    assert resp.json()["error"]["message"].startswith("invalid HTTP request: ")


# ------------------------------------------------------------------ responses
async def test_abort_extension_cuts_the_body_without_an_error_log(
    serve: StartServer, warnings_log: list[Any]
) -> None:
    served = await serve()
    conn = await Conn.open(served.port)
    await conn.send(get("/abort"))
    with pytest.raises(asyncio.IncompleteReadError) as exc:
        await conn.response()
    assert exc.value.partial == b""  # the cut came where a chunk size line was due
    conn.close()
    # the same app returning without finishing (no abort) is what uvicorn reports as an error:
    # the log capture does see such errors
    conn = await Conn.open(served.port)
    await conn.send(get("/unfinished"))
    with pytest.raises(asyncio.IncompleteReadError):
        await conn.response()
    conn.close()
    await wait_for(
        lambda: any(r["level"].name == "ERROR" for r in warnings_log), 5, "uvicorn's error"
    )
    errors = [r["message"] for r in warnings_log if r["level"].name == "ERROR"]
    assert errors == ["ASGI callable returned without completing response."]


async def test_abort_leaves_a_client_what_was_sent(serve: StartServer) -> None:
    served = await serve()
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
        s.sendall(get("/abort"))
        data = b""
        while chunk := await asyncio.to_thread(s.recv, 65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b"\r\n\r\n7\r\npartial\r\n")  # and no last chunk: curl says exit 18


async def test_respond_extension_sends_a_whole_response_in_one_go(serve: StartServer) -> None:
    served = await serve()
    conn = await Conn.open(served.port)
    for path in ("/respond", "/respond-chunked"):  # Content-Length, or chunked without one
        await conn.send(get(path))
        resp = await conn.response()
        assert (resp.status, resp.body, resp.header("x-app")) == (200, b"hello", ["1"])
        assert len(resp.header("date")) == 1
    assert resp.header("transfer-encoding") == ["chunked"]
    # HEAD: the head alone, the connection stays usable
    await conn.send(b"HEAD /respond HTTP/1.1\r\nHost: gw\r\n\r\n")
    head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 5\r\n" in head
    await conn.send(get("/plain"))
    assert (await conn.response()).status == 200
    conn.close()


@pytest.mark.parametrize("path", ["/bad-name", "/bad-value", "/respond-bad"])
async def test_a_header_that_could_split_the_response_is_never_sent(
    serve: StartServer, path: str, warnings_log: list[Any]
) -> None:
    served = await serve()
    conn = await Conn.open(served.port)
    await conn.send(get(path))
    resp = await conn.response()
    # the app's head is refused as a whole: a plain 500, nothing of it on the wire
    assert resp.status == 500
    assert resp.header("x-injected") == resp.header("x-ok") == resp.header("x-app") == []
    conn.close()
    await wait_for(lambda: bool(warnings_log), 5, "the error log line")
    assert "Exception in ASGI application" in warnings_log[0]["message"]


async def test_on_gone_extension_calls_back_once_the_client_has_left(serve: StartServer) -> None:
    served = await serve()
    conn = await Conn.open(served.port)
    await conn.send(get("/on-gone"))
    await asyncio.wait_for(served.app.waiting.wait(), 10)
    assert served.app.gone == []
    conn.close()
    await wait_for(lambda: bool(served.app.gone), 5, "the on_gone callback")
    await asyncio.sleep(0.05)
    assert served.app.gone == ["called"]  # the last one registered, once


async def test_two_tasks_waiting_in_receive_both_hear_of_the_body(serve: StartServer) -> None:
    served = await serve()
    conn = await Conn.open(served.port)
    await conn.send(b"POST /two-receivers HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\n")
    await asyncio.sleep(0.1)  # both are waiting by now (if not, they find the body at once)
    await conn.send(b"abc")
    resp = await conn.response()
    # one took the body; the other (woken too) waits on, as ASGI wants once the body is
    # taken, and hears http.disconnect when the response is complete
    assert (resp.status, resp.body) == (200, b"abc")
    await wait_for(lambda: len(served.app.received) == 2, 5, "the second receive()")
    assert served.app.received == ["http.request", "http.disconnect"]
    conn.close()


async def test_a_body_in_small_pieces_waits_whole_for_an_app_not_reading_yet(
    serve: StartServer,
) -> None:
    """Pieces that arrive before the app reads are buffered (up to 64 KiB, then reading
    pauses) and handed over as bytes, in order."""
    served = await serve()
    conn = await Conn.open(served.port)
    payload = bytes(range(256)) * 200  # 51,200 bytes
    await conn.send(
        b"POST /reads-later HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % len(payload)
    )
    for i in range(0, len(payload), 100):
        await conn.send(payload[i : i + 100])
        if i % 10_000 == 0:
            await asyncio.sleep(0.01)  # separate reads on the server's side
    served.app.read_now.set()
    resp = await conn.response()
    assert resp.status == 200 and resp.json()["body_len"] == len(payload)
    assert served.app.body_types == {"bytes"}  # never the buffer's bytearray
    conn.close()


async def test_receive_after_the_body_waits_for_the_disconnect(serve: StartServer) -> None:
    """Starlette's disconnect listener calls receive() in a loop: after the body it must
    wait, not get the end of the body again (which spun the event loop)."""
    served = await serve()
    conn = await Conn.open(served.port)
    await conn.send(get("/listen"))
    await asyncio.wait_for(served.app.waiting.wait(), 10)
    await asyncio.sleep(0.2)
    assert served.app.received == ["http.request"]  # once, then waiting
    conn.close()
    await wait_for(lambda: len(served.app.received) == 2, 5, "the disconnect")
    assert served.app.received == ["http.request", "http.disconnect"]


async def test_one_date_header(serve: StartServer) -> None:
    served = await serve()
    resp = await ok(served, get("/date"))
    assert resp.header("date") == [APP_DATE.decode()]
    resp = await ok(served, get("/plain"))
    assert len(resp.header("date")) == 1
    assert resp.header("date") != [APP_DATE.decode()]


def test_open_file_limit_is_raised_to_the_hard_limit(warnings_log: list[Any]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.fail(f"the hard open-file limit here is {hard}: too low to test raising it")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        now = raise_nofile_limit(max_connections=100_000)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now
        assert now == hard or hard == resource.RLIM_INFINITY
        # 100,000 connections need more descriptors than any test machine allows: said so
        assert any("max_connections is 100000" in r["message"] for r in warnings_log)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ------------------------------------------------------------------ the real `hestia serve`
def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _reset_peak_rss(pid: int) -> str:
    """Start VmHWM (peak RSS) afresh (Linux >= 4.0) and return it; else only VmRSS is left."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return "VmRSS"
    return "VmHWM"


@pytest.fixture
def hestia_serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    cfg = tmp_path / "hestia_config.yml"
    cfg.write_text(
        "services:\n  echo:\n    url: http://127.0.0.1:9/\n"
        "docker:\n  enabled: false\n"
        f"database:\n  url: sqlite:///{tmp_path}/h.db\n"
    )
    port = free_port()
    log = tmp_path / "hestia.log"
    address = ["--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hestia", "serve", "--config", str(cfg), *address],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HESTIA_LOG_FORMAT": "json"},
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(get("/v1/health"))
                    if s.recv(100).startswith(b"HTTP/1.1 200 "):
                        break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "hestia serve did not answer /v1/health"
            time.sleep(0.05)
        yield proc, port, log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_hestia_serve_refuses_an_endless_header_line_in_bounded_memory(
    hestia_serve: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    proc, port, log = hestia_serve
    served = Served(App(), port, None)
    resp = await refused(served, get("/v1/health", extra=b"x-big: " + b"a" * 9000 + b"\r\n"))
    assert resp.status == 431
    assert resp.json() == error(
        "request_header_too_large",
        "a request header line is longer than 8192 bytes (server.limits.max_header_line)",
    )

    rss_before = _status_kib(proc.pid, "VmRSS")
    peak_key = _reset_peak_rss(proc.pid)

    def send_endless_line() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: gw\r\nx-big: ")
            block = b"a" * (1 << 20)
            try:
                for _ in range(64):  # 64 MiB, never a line end
                    s.sendall(block)
            except OSError:
                pass  # the server answered and, after a moment, closed

    await asyncio.to_thread(send_endless_line)
    grown_mib = (_status_kib(proc.pid, peak_key) - rss_before) / 1024
    assert grown_mib < 24, f"RSS grew by {grown_mib:.0f} MiB for one unfinished header line"
    assert proc.poll() is None
    # the gateway still answers, and said what it refused
    resp = await ok(served, get("/v1/health"))
    assert resp.json()["status"] == "ok"
    await wait_for(lambda: b"answered 431 to 127.0.0.1" in log.read_bytes(), 10, "the log line")
    assert b"open-file limit" in log.read_bytes()


# ------------------------------------------------------------------ busy polling
def test_busy_poll_setting() -> None:
    assert busy_poll_seconds("auto", cpus=2) == BUSY_POLL_AUTO_S
    assert busy_poll_seconds("auto", cpus=1) == 0.0  # one CPU: the spin would be the upstream's
    assert busy_poll_seconds("off", cpus=8) == 0.0
    assert busy_poll_seconds(0.0002, cpus=1) == 0.0002
    assert build_server(App(), "127.0.0.1", free_port(), busy_poll="off").busy_poll is None


class CountingPoll(BusyPoll):
    spins = 0

    def _spin(self) -> None:
        self.spins += 1
        super()._spin()


async def test_busy_poll_polls_for_its_window_and_only_at_low_concurrency() -> None:
    loop = asyncio.get_running_loop()
    tasks: set[Any] = set()
    poll = CountingPoll(0.02)
    poll.bind(loop, tasks)
    t0 = time.perf_counter()
    poll.note()
    await wait_for(lambda: not poll._spinning, 5, "the end of the window")
    spun = time.perf_counter() - t0
    assert spun >= 0.02 and poll.spins > 2  # polled again and again for the window, then left
    # two requests in flight: no polling at all
    tasks.update({object(), object()})
    poll.spins = 0
    poll.note()
    await asyncio.sleep(0.01)
    assert not poll._spinning and poll.spins == 0
    # a second request arriving while it polls ends the polling
    tasks.clear()
    poll.note()
    await asyncio.sleep(0)
    tasks.update({object(), object()})
    await asyncio.sleep(0.005)
    assert not poll._spinning


async def test_busy_poll_runs_after_a_response_in_the_real_server(serve: StartServer) -> None:
    served = await serve(busy_poll=0.01)
    conn = await Conn.open(served.port)
    await conn.send(get("/plain"))
    assert (await conn.response()).status == 200
    poll = served.server.busy_poll
    assert poll is not None and poll._spinning  # waiting for this client's next request
    await wait_for(lambda: not poll._spinning, 5, "the end of the window")
    conn.close()
    off = await serve(busy_poll="off")
    assert (await ok(off, get("/plain"))).status == 200 and off.server.busy_poll is None
