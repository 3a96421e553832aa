"""WebSockets through the proxy: the upstream handshake first, then messages relayed both
ways until either side closes. An open WebSocket counts as a request in flight, so the idle
timer never cuts it.

A service that refuses the upgrade (an origin check's 403, a login redirect, a 404) is
answered with its own status, headers and body, so a client can tell "refused" from "down"
(502 is only for a service that could not be reached or answered nonsense).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from http import HTTPStatus

from loguru import logger
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.typing import Subprotocol

from hestia.address import Upstream
from hestia.errors import HestiaError, ServiceNotFound, UpstreamUnreachable, send_error
from hestia.headers import (
    TrustedProxies,
    downstream_response_headers,
    upstream_request_headers,
)
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
        await _relay(scope, receive, send, route, upstream, trusted, service.config.preserve_host)
    finally:
        service.release()


async def _relay(
    scope: Scope,
    receive: Receive,
    send: Send,
    route: Route,
    upstream: Upstream,
    trusted: TrustedProxies,
    preserve_host: bool,
) -> None:
    name = route.service
    query: bytes = scope.get("query_string", b"")
    target = (upstream.base_path + route.path + (b"?" + query if query else b"")).decode("latin-1")
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
            stripped=route.stripped,
            preserve_host=preserve_host,
        )
    except HestiaError as err:
        await _reject(scope, send, err)
        return
    # the handshake's Host comes from the URI (the connection goes to host/port below)
    uri = f"ws://{headers[0][1].decode('latin-1')}{target}"
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
            proxy=None,  # the address is the service's: never via an HTTP(S)_PROXY
        )
    except InvalidStatus as exc:
        await _pass_refusal(scope, send, route, upstream, exc)
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


async def _pass_refusal(
    scope: Scope, send: Send, route: Route, upstream: Upstream, exc: InvalidStatus
) -> None:
    """The service's own answer to the upgrade, passed on (redirects and cookies mapped)."""
    response = exc.response
    status = response.status_code
    logger.info(
        "WebSocket to {} refused by service {!r}: HTTP {} (passed on)",
        scope.get("path"),
        route.service,
        status,
    )
    if "websocket.http.response" not in scope.get("extensions", {}) or status not in _STATUSES:
        refused = UpstreamUnreachable(
            f"service {route.service!r} refused the WebSocket upgrade: HTTP {status}",
            service=route.service,
        )
        await _reject(scope, send, refused)
        return
    raw = [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in response.headers.raw_items()
        if k.lower() != "content-length"  # the body was decoded: the server counts it
    ]
    headers = downstream_response_headers(raw, upstream, route)
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": bytes(response.body)})


# what the ASGI server can send a reason phrase for
_STATUSES = frozenset(int(s) for s in HTTPStatus)


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
