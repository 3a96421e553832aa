"""WebSockets through the proxy: the upstream handshake first, then messages relayed both
ways until either side closes. An open WebSocket counts as a request in flight, so the idle
timer never cuts it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from loguru import logger
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.typing import Subprotocol

from hestia.address import Upstream
from hestia.errors import HestiaError, ServiceNotFound, UpstreamUnreachable, send_error
from hestia.headers import TrustedProxies, upstream_request_headers
from hestia.lifecycle import Service
from hestia.router import Route
from hestia.types import Receive, Scope, Send


async def relay_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    lookup: Callable[[str], Service],
    route: Route,
    trusted: TrustedProxies,
) -> None:
    """Accept the client's WebSocket once the service accepted ours, then relay both ways."""
    if not route.service:
        await _reject(scope, send, ServiceNotFound("no service name in the path"))
        return
    try:
        service = lookup(route.service)
        upstream = await service.acquire()
    except HestiaError as err:
        await _reject(scope, send, err)
        return
    try:
        await _relay(scope, receive, send, route, upstream, trusted)
    finally:
        service.release()


async def _relay(
    scope: Scope,
    receive: Receive,
    send: Send,
    route: Route,
    upstream: Upstream,
    trusted: TrustedProxies,
) -> None:
    name = route.service
    query: bytes = scope.get("query_string", b"")
    target = (upstream.base_path + route.path + (b"?" + query if query else b"")).decode("latin-1")
    uri = f"ws://{upstream.host_header.decode('latin-1')}{target}"
    client = scope.get("client")
    client_ip = client[0] if client else None
    try:
        headers, _ = upstream_request_headers(
            [(k, v) for k, v in scope["headers"] if not k.startswith(b"sec-websocket-")],
            upstream,
            client_ip=client_ip,
            scheme="https" if scope.get("scheme") == "wss" else "http",
            prefix=route.prefix,
            trusted=trusted.trusts(client_ip),
        )
    except HestiaError as err:
        await _reject(scope, send, err)
        return
    extra = [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in headers
        if k not in (b"host", b"content-length")
    ]
    subprotocols = [p.strip() for p in scope.get("subprotocols", []) if p.strip()]
    msg = await receive()
    if msg["type"] != "websocket.connect":
        return
    try:
        ws = await connect(
            uri,
            additional_headers=extra,
            subprotocols=[Subprotocol(p) for p in subprotocols] or None,
            max_size=None,
            ping_interval=None,
            compression=None,
            open_timeout=30,
            host=upstream.host,
            port=upstream.port,
        )
    except InvalidStatus as exc:
        refused = UpstreamUnreachable(
            f"service {name!r} refused the WebSocket upgrade: HTTP {exc.response.status_code}",
            service=name,
        )
        await _reject(scope, send, refused)
        return
    except (OSError, TimeoutError, WebSocketException) as exc:
        unreachable = UpstreamUnreachable(
            f"service {name!r} at {upstream.display} did not accept a WebSocket: {exc}",
            service=name,
        )
        await _reject(scope, send, unreachable)
        return
    await send({"type": "websocket.accept", "subprotocol": ws.subprotocol})
    async with ws:
        to_up = asyncio.create_task(_client_to_upstream(receive, ws))
        to_down = asyncio.create_task(_upstream_to_client(ws, send))
        _done, pending = await asyncio.wait((to_up, to_down), return_when="FIRST_COMPLETED")
        for t in pending:
            t.cancel()
        for t in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


async def _reject(scope: Scope, send: Send, err: HestiaError) -> None:
    logger.warning("WebSocket to {} refused: {}", scope.get("path"), err.message)
    if "websocket.http.response" in scope.get("extensions", {}):
        await send_error(send, err, asgi_prefix="websocket.http")
    else:
        await send({"type": "websocket.close", "code": 1011, "reason": err.message[:120]})


async def _client_to_upstream(receive: Receive, ws: ClientConnection) -> None:
    while True:
        msg = await receive()
        kind = msg["type"]
        if kind == "websocket.receive":
            data = msg.get("bytes")
            if data is None:
                data = msg.get("text") or ""
            try:
                await ws.send(data)
            except ConnectionClosed:
                return
        elif kind == "websocket.disconnect":
            code = msg.get("code", 1000)
            await ws.close(code if code in range(1000, 5000) and code not in (1005, 1006) else 1000)
            return


async def _upstream_to_client(ws: ClientConnection, send: Send) -> None:
    try:
        async for message in ws:
            if isinstance(message, bytes):
                await send({"type": "websocket.send", "bytes": message})
            else:
                await send({"type": "websocket.send", "text": message})
    except ConnectionClosed:
        pass
    code = ws.close_code or 1000
    if code in (1005, 1006):
        code = 1000
    with contextlib.suppress(Exception):
        await send({"type": "websocket.close", "code": code, "reason": ws.close_reason or ""})
