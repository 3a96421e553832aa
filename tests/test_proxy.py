"""The data plane against real HTTP and WebSocket servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import free_port, wait_for


class UpstreamApp:
    """A small ASGI upstream that records what it saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.ws_seen: list[dict[str, str]] = []  # each WebSocket handshake's headers
        self.disconnected = asyncio.Event()
        self.uploaded = 0
        self.acks: asyncio.Queue[int] = asyncio.Queue()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        path = scope["path"]
        self.seen.append(
            {
                "method": scope["method"],
                "raw_path": scope["raw_path"],
                "query": scope["query_string"],
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                "header_list": list(scope["headers"]),
            }
        )
        if path == "/ndjson":
            # lockstep: the next line is sent only once the client has seen this one, so a
            # proxy that buffered would stall this stream for ever
            await self.start(send, 200, b"application/x-ndjson")
            for i in range(5):
                await send(
                    {"type": "http.response.body", "body": b'{"i":%d}\n' % i, "more_body": True}
                )
                assert await asyncio.wait_for(self.acks.get(), 10) == i
            await send({"type": "http.response.body", "body": b""})
        elif path == "/upload":
            digest = hashlib.sha256()
            self.uploaded = 0
            while True:
                msg = await receive()
                digest.update(msg.get("body", b""))
                self.uploaded += len(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
            body = json.dumps({"bytes": self.uploaded, "sha256": digest.hexdigest()}).encode()
            await self.start(send, 200, b"application/json", len(body))
            await send({"type": "http.response.body", "body": body})
        elif path == "/download":
            size = int(scope["query_string"] or b"0")
            await self.start(send, 200, b"application/octet-stream", size)
            block = b"x" * 65536
            sent = 0
            while sent < size:
                n = min(len(block), size - sent)
                await send({"type": "http.response.body", "body": block[:n], "more_body": True})
                sent += n
            await send({"type": "http.response.body", "body": b""})
        elif path in ("/forever", "/hang"):
            await receive()  # the (empty) request body
            watcher = asyncio.create_task(receive())
            if path == "/forever":
                await self.start(send, 200, b"text/event-stream")
            while not watcher.done():
                if path == "/forever":
                    await send(
                        {"type": "http.response.body", "body": b"data: tick\n\n", "more_body": True}
                    )
                await asyncio.wait({watcher}, timeout=0.05)
            if watcher.result()["type"] == "http.disconnect":
                self.disconnected.set()
        elif path == "/status/418":
            await self.start(send, 418, b"text/plain", 5, [(b"x-teapot", b"yes")])
            await send({"type": "http.response.body", "body": b"short"})
        else:
            body = b"root of upstream" if scope["method"] != "HEAD" else b""
            await self.start(send, 200, b"text/plain", 16, [(b"x-upstream", b"1")])
            await send({"type": "http.response.body", "body": body})

    async def start(
        self,
        send: Any,
        status: int,
        ctype: bytes,
        length: int | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [(b"content-type", ctype), *(extra or [])]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def websocket(self, scope: Any, receive: Any, send: Any) -> None:
        self.ws_seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await receive()  # connect
        protocols = scope.get("subprotocols") or []
        await send({"type": "websocket.accept", "subprotocol": protocols[0] if protocols else None})
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                self.disconnected.set()
                return
            if msg.get("text") == "close-me":
                await send({"type": "websocket.close", "code": 4001, "reason": "asked to"})
                return
            if msg.get("text") is not None:
                await send({"type": "websocket.send", "text": "echo:" + msg["text"]})
            else:
                await send({"type": "websocket.send", "bytes": msg["bytes"][::-1]})


@pytest.fixture
async def gw(upstream: tuple[UpstreamApp, int], gateway_factory: Any) -> Any:
    _, port = upstream
    return await gateway_factory(
        {
            "services": {
                "up": {"url": f"http://127.0.0.1:{port}"},
                "based": {"url": f"http://127.0.0.1:{port}/base/"},
                "dead": {"url": f"http://127.0.0.1:{free_port()}"},
            }
        }
    )


async def test_get_headers_and_host_rewrite(gw: Any, upstream: tuple[UpstreamApp, int]) -> None:
    app, port = upstream
    async with httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.get(
            "/services/up/some/path",
            headers={"Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1", "X-Keep": "2"},
        )
    assert r.status_code == 200
    assert r.text == "root of upstream"
    assert r.headers["x-upstream"] == "1"
    seen = app.seen[-1]
    assert seen["raw_path"] == b"/some/path"
    h = seen["headers"]
    assert h["host"] == f"127.0.0.1:{port}"
    assert h["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
    assert h["x-forwarded-for"] == "127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-prefix"] == "/services/up"
    assert h["x-keep"] == "2"
    assert "x-drop-me" not in h


async def test_query_string_forwarded_byte_for_byte(
    gw: Any, upstream: tuple[UpstreamApp, int]
) -> None:
    app, _ = upstream
    raw = b"a=%2F%2f&b=%E2%9C%93&c=+space&d&e=%25&f[]=1&g=%ZZ"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"GET /services/up/q%20x?" + raw + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert app.seen[-1]["query"] == raw
    assert app.seen[-1]["raw_path"] == b"/q%20x"


async def test_base_path_of_url_is_kept(gw: Any, upstream: tuple[UpstreamApp, int]) -> None:
    app, _ = upstream
    async with httpx.AsyncClient(base_url=gw.url) as client:
        await client.get("/services/based/api/tags?x=1")
        await client.get("/services/based")
    assert app.seen[-2]["raw_path"] == b"/base/api/tags"
    assert app.seen[-1]["raw_path"] == b"/base/"


async def test_head_answers_like_upstream(gw: Any) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.head("/services/up/")
        assert r.status_code == 200
        assert r.headers["content-length"] == "16"
        assert r.content == b""
        # and the connection is still good for the next request
        r = await client.get("/services/up/")
        assert r.text == "root of upstream"


async def test_status_and_methods_preserved(gw: Any, upstream: tuple[UpstreamApp, int]) -> None:
    app, _ = upstream
    async with httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.get("/services/up/status/418")
        assert (r.status_code, r.text, r.headers["x-teapot"]) == (418, "short", "yes")
        for method in ("OPTIONS", "DELETE", "PATCH", "PUT", "POST"):
            r = await client.request(method, "/services/up/m", content=b"abc")
            assert r.status_code == 200
            assert app.seen[-1]["method"] == method


async def test_ndjson_chunks_arrive_one_by_one(gw: Any, upstream: tuple[UpstreamApp, int]) -> None:
    app, _ = upstream
    arrivals: list[bytes] = []
    async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
        async with client.stream("POST", "/services/up/ndjson", json={"model": "x"}) as r:
            assert r.headers["content-type"] == "application/x-ndjson"
            async for chunk in r.aiter_raw():
                arrivals.append(chunk)
                app.acks.put_nowait(len(arrivals) - 1)  # the upstream may send the next one
    assert arrivals == [b'{"i":%d}\n' % i for i in range(5)]


async def test_large_upload_streams(gw: Any, upstream: tuple[UpstreamApp, int]) -> None:
    size = 64 * 1024 * 1024
    block = bytes(range(256)) * 256  # 64 KiB
    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
        r = await client.post("/services/up/upload", content=body())  # chunked upload
        assert r.json() == {"bytes": size, "sha256": expected.hexdigest()}
        r = await client.post(
            "/services/up/upload", content=body(), headers={"content-length": str(size)}
        )
        assert r.json()["bytes"] == size


async def test_large_download_streams_without_growing_memory(gw: Any) -> None:
    size = 256 * 1024 * 1024
    tracemalloc.start()
    try:
        received = 0
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            async with client.stream("GET", f"/services/up/download?{size}") as r:
                assert r.headers["content-length"] == str(size)
                async for chunk in r.aiter_raw():
                    received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == size
    # gateway, upstream and client share this process: all of them together stay far below
    # the body size
    assert peak < 32 * 1024 * 1024, peak


async def test_client_disconnect_mid_stream_reaches_upstream(
    gw: Any, upstream: tuple[UpstreamApp, int]
) -> None:
    app, _ = upstream
    async with httpx.AsyncClient(base_url=gw.url) as client:
        async with client.stream("GET", "/services/up/forever") as r:
            async for _ in r.aiter_raw():
                break
    await asyncio.wait_for(app.disconnected.wait(), 5)
    await wait_for(lambda: gw.service("up").in_flight == 0, 5, "in_flight back to 0")


async def test_client_disconnect_before_first_byte_reaches_upstream(
    gw: Any, upstream: tuple[UpstreamApp, int]
) -> None:
    """A model load that the client gave up on must be cancelled upstream."""
    app, _ = upstream
    async with httpx.AsyncClient(base_url=gw.url, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/services/up/hang")
    await asyncio.wait_for(app.disconnected.wait(), 5)


async def test_upstream_refused_gives_502_json(gw: Any) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.get("/services/dead/")
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "upstream_unreachable"
    assert err["service"] == "dead"


async def test_unknown_service_404_json(gw: Any) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.get("/services/nope/x")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "service_not_found"
        r = await client.get("/nowhere")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"


async def test_websocket_echo_both_ways(gw: Any, upstream: tuple[UpstreamApp, int]) -> None:
    app, _ = upstream
    uri = f"ws://127.0.0.1:{gw.port}/services/up/ws?x=1"
    async with ws_connect(uri, subprotocols=["chat"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat"
        await ws.send("hi")
        assert await ws.recv() == "echo:hi"
        await ws.send(b"\x01\x02\x03")
        assert await ws.recv() == b"\x03\x02\x01"
        assert gw.service("up").in_flight == 1  # an open WebSocket is activity
    await asyncio.wait_for(app.disconnected.wait(), 5)
    await wait_for(lambda: gw.service("up").in_flight == 0, 5, "in_flight back to 0")


async def test_websocket_close_code_from_upstream(gw: Any) -> None:
    async with ws_connect(f"ws://127.0.0.1:{gw.port}/services/up/ws") as ws:
        await ws.send("close-me")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 4001


async def test_websocket_to_dead_upstream_is_refused(gw: Any) -> None:
    with pytest.raises(InvalidStatus) as exc:
        async with ws_connect(f"ws://127.0.0.1:{gw.port}/services/dead/ws"):
            pass
    response = exc.value.response
    assert response.status_code == 502
    assert json.loads(response.body or b"{}")["error"]["code"] == "upstream_unreachable"


async def test_dot_segments_stay_inside_the_service(
    gw: Any, upstream: tuple[UpstreamApp, int]
) -> None:
    app, _ = upstream
    for raw, expected in (
        (b"/services/based/../admin", b"/base/admin"),
        (b"/services/based/%2e%2e/%2E%2e/admin", b"/base/admin"),
        (b"/services/up/a/./b/../c", b"/a/c"),
        (b"/services/up/..", b"/"),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET " + raw + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert data.startswith(b"HTTP/1.1 200"), (raw, data[:100])
        assert app.seen[-1]["raw_path"] == expected, raw


async def test_encoded_prefix_is_not_a_service_route(gw: Any) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        for path in ("/%73ervices/up/x", "/services%2fup/x"):
            r = await client.get(path)
            assert r.status_code == 404, path
            assert r.json()["error"]["code"] == "not_found"


async def test_client_request_id_is_replaced_not_duplicated(
    gw: Any, upstream: tuple[UpstreamApp, int]
) -> None:
    app, _ = upstream
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"GET /services/up/ HTTP/1.1\r\nHost: x\r\nX-Request-ID: bad id!\r\n"
        b"Connection: close\r\n\r\n"
    )
    await asyncio.wait_for(reader.read(), 10)
    writer.close()
    ids = [v for k, v in app.seen[-1]["header_list"] if k == b"x-request-id"]
    assert len(ids) == 1 and len(ids[0]) == 16  # one: the gateway's, not the client's too
