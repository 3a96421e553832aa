"""Lean pooled keep-alive HTTP/1.1 client for the proxy's data path.

One :class:`UpstreamPool` per event loop.  Each upstream TCP connection is an
:class:`asyncio.Protocol` whose bytes are parsed by ``httptools`` (llhttp, C).
Response bodies are handed to the caller as they arrive; request bodies are
streamed with write flow control.  No logging, no regexes and as few
allocations as possible on the per-request path.

Usage (the caller must always end a response with ``aclose()``)::

    resp = await pool.request("127.0.0.1", 11434, b"GET", b"/api/tags", headers)
    try:
        async for chunk in resp.read_chunks():
            ...
    finally:
        await resp.aclose()
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools

__all__ = [
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeoutError",
]

# Stop reading from the upstream socket once this many body bytes are buffered
# and not yet taken by the consumer (back-pressure towards the upstream).
_READ_HIGH_WATER = 256 * 1024
# Write buffer limits of the transport for request bodies.
_WRITE_HIGH_WATER = 256 * 1024
_WRITE_LOW_WATER = 64 * 1024

_NO_BODY_STATUS = frozenset((204, 304))
_HTTP11 = b" HTTP/1.1\r\n"
_CRLF = b"\r\n"
_SEP = b": "
_LAST_CHUNK = b"0\r\n\r\n"
_HEAD = b"HEAD"


def _new_parser(protocol: object) -> Any:
    parser = httptools.HttpResponseParser(protocol)
    # Upstreams in the wild end header lines with a bare LF (busybox httpd passes CGI headers
    # through as the script wrote them); browsers and nginx accept that, and so do we.
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    return parser


class UpstreamError(Exception):
    """Base class of every error raised by this module."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamConnectError(UpstreamError):
    """Could not connect (refused, unreachable, DNS failure, connect timeout)."""


class UpstreamProtocolError(UpstreamError):
    """Connection reset or closed mid-response, or a malformed response."""


class UpstreamTimeoutError(UpstreamProtocolError):
    """No response byte within ``read_timeout`` (only when a read timeout is set)."""


class _Conn(asyncio.Protocol):
    """One upstream connection: protocol, parser callbacks and per-exchange state."""

    __slots__ = (
        "_body_error",
        "_buffered",
        "_chunks",
        "_closed",
        "_got_bytes",
        "_headers",
        "_headers_done",
        "_idle_since",
        "_in_use",
        "_interim",
        "_is_head",
        "_keep_alive",
        "_key",
        "_loop",
        "_msg_done",
        "_parser",
        "_parser_dirty",
        "_read_paused",
        "_reason",
        "_req_sent",
        "_status",
        "_transport",
        "_waiter",
        "_write_paused",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int]) -> None:
        self._loop = loop
        self._key = key
        # Set by connection_made(), which runs before a _Conn is ever used.
        self._transport: asyncio.Transport = cast(asyncio.Transport, None)
        self._parser = _new_parser(self)
        self._parser_dirty = False
        self._closed = False
        self._in_use = True
        self._idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._body_error: UpstreamError | None = None
        self._reset(False)

    def _reset(self, is_head: bool) -> None:
        self._is_head = is_head
        self._got_bytes = False
        self._req_sent = False
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._interim = False
        self._msg_done = False
        self._keep_alive = False

    # ------------------------------------------------------------ transport side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self._transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):  # pragma: no cover - non-TCP transport
                pass
        transport.set_write_buffer_limits(_WRITE_HIGH_WATER, _WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        if not self._in_use:
            # Bytes on an idle connection: the server is out of sync; never reuse.
            self._closed = True
            self._transport.abort()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Only a 101 gets here; what follows is not HTTP.  Not reusable.
            self._keep_alive = False
            self._parser_dirty = True
        except httptools.HttpParserError as exc:
            self._keep_alive = False
            self._parser_dirty = True
            if not self._msg_done:
                self._body_error = UpstreamProtocolError(f"malformed upstream response: {exc}")
            self._transport.abort()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # let the transport close itself; connection_lost does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._keep_alive = False
        if self._in_use and not self._msg_done and self._body_error is None:
            if self._headers_done and _delimited_by_close(self._headers):
                # No framing: the body is delimited by the close of the connection.
                self._msg_done = True
            elif exc is not None:
                self._body_error = UpstreamProtocolError(f"upstream connection lost: {exc}")
            elif self._headers_done:
                self._body_error = UpstreamProtocolError(
                    "upstream closed the connection before the end of the response body"
                )
            else:
                self._body_error = UpstreamProtocolError(
                    "upstream closed the connection before sending a response"
                )
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # ------------------------------------------------------------ parser callbacks

    def on_status(self, status: bytes) -> None:
        if self._msg_done:
            self._keep_alive = False
            return
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._msg_done:
            self._keep_alive = False
            return
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._msg_done:
            self._keep_alive = False
            return
        status = self._parser.get_status_code()
        if status < 200 and status != 101:
            self._interim = True  # 100 Continue, 103 Early Hints, ...: skipped
            return
        self._status = status
        self._headers_done = True
        if self._is_head:
            # llhttp cannot be told about HEAD: it would wait for a body of
            # Content-Length bytes.  The message ends here; use a fresh parser
            # for the next exchange on this connection.
            self._msg_done = True
            self._parser_dirty = True
            self._keep_alive = _head_keep_alive(self._parser.get_http_version(), self._headers)
        elif status == 101:
            self._msg_done = True
            self._keep_alive = False
            self._parser_dirty = True
        elif status in _NO_BODY_STATUS:
            self._msg_done = True
            self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self._msg_done:
            self._keep_alive = False
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _READ_HIGH_WATER and not self._read_paused:
            self._read_paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._reason = b""
            self._headers = []
            return
        if self._msg_done:
            return
        self._msg_done = True
        self._keep_alive = self._parser.should_keep_alive()

    # ------------------------------------------------------------ helpers

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, limit_s: float | None) -> None:
        """Wait for the next protocol event (data, end, loss, writable)."""
        waiter = self._waiter = self._loop.create_future()
        try:
            if limit_s is None:
                await waiter
            else:
                try:
                    async with asyncio.timeout(limit_s):
                        await waiter
                except TimeoutError:
                    raise UpstreamTimeoutError(f"no data from upstream for {limit_s:g}s") from None
        finally:
            self._waiter = None

    def _abort(self) -> None:
        self._closed = True
        self._keep_alive = False
        if self._transport is not None:
            self._transport.abort()

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._read_paused:
            self._read_paused = False
            if not self._closed:
                self._transport.resume_reading()
        return data

    async def _send_body(
        self,
        head: bytes,
        body: AsyncIterator[bytes],
        chunked: bool,
        content_length: int,
    ) -> None:
        transport = self._transport
        sent = 0
        first = True
        async for chunk in body:
            if not chunk:
                continue
            if self._closed:
                break
            n = len(chunk)
            if chunked:
                if first:
                    transport.writelines((head, b"%x\r\n" % n, chunk, _CRLF))
                else:
                    transport.writelines((b"%x\r\n" % n, chunk, _CRLF))
            else:
                sent += n
                if sent > content_length:
                    self._abort()
                    raise UpstreamProtocolError("request body longer than its content-length")
                if first:
                    transport.writelines((head, chunk))
                else:
                    transport.write(chunk)
            first = False
            while self._write_paused and not self._closed:
                if self._headers_done:
                    # The upstream answered before taking the whole body (e.g.
                    # 413) and stopped reading: stop uploading, keep the answer.
                    self._keep_alive = False
                    return
                await self._wait(None)
        if self._closed:
            return
        if chunked:
            transport.write(head + _LAST_CHUNK if first else _LAST_CHUNK)
        else:
            if sent != content_length:
                self._abort()
                raise UpstreamProtocolError("request body shorter than its content-length")
            if first:
                transport.write(head)
        self._req_sent = True

    def _start(self, is_head: bool) -> None:
        """Prepare for a new exchange on this connection."""
        if self._parser_dirty:
            self._parser = _new_parser(self)
            self._parser_dirty = False
        self._reset(is_head)
        self._in_use = True

    async def _await_head(self, limit_s: float | None) -> None:
        """Wait until the final response head has arrived (or fail)."""
        while not self._headers_done:
            if self._body_error is not None:
                raise self._body_error
            if self._closed:  # pragma: no cover - connection_lost always sets an error
                raise UpstreamProtocolError("upstream connection closed")
            if limit_s is None:
                waiter = self._waiter = self._loop.create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None
            else:
                await self._wait(limit_s)

    async def exchange(
        self,
        head: bytes,
        is_head: bool,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
        content_length: int,
        read_timeout: float | None,
    ) -> None:
        """Send one request and wait until the final response head has arrived."""
        self._start(is_head)
        if body is None:
            self._transport.write(head)
            self._req_sent = True
        else:
            await self._send_body(head, body, chunked, content_length)
        await self._await_head(read_timeout)


def _delimited_by_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """True if a response body has no length framing (RFC 9112 6.3, items 4 to 8)."""
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            return False
        if name == b"transfer-encoding":
            chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
    return not chunked


def _head_keep_alive(version: str, headers: list[tuple[bytes, bytes]]) -> bool:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    if version == "1.1":
        return b"close" not in tokens
    return version == "1.0" and b"keep-alive" in tokens and b"close" not in tokens


class UpstreamResponse:
    """The head of an upstream response plus access to its body.

    Always finish with :meth:`aclose` (also after reading the whole body).
    """

    __slots__ = ("_conn", "_has_body", "_pool", "headers", "reason", "status")

    def __init__(
        self,
        pool: UpstreamPool,
        conn: _Conn | None,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        has_body: bool,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self._has_body = has_body

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason.decode('latin-1')!r}>"

    def __del__(self) -> None:
        # Safety net for a response dropped without aclose(): close its socket
        # (otherwise the loop keeps it, and the upstream keeps working, forever).
        conn = self._conn
        if conn is not None:
            self._conn = None
            try:
                conn._abort()
            except Exception:  # pragma: no cover - e.g. its loop is closed already
                pass

    @property
    def complete(self) -> bool:
        """True once the whole body has been received and handed out (the connection is back
        in the pool): the chunk just read, if any, was the last one."""
        return self._conn is None

    def has_body(self) -> bool:
        """False for responses that cannot carry a body (HEAD, 1xx, 204, 304)."""
        return self._has_body

    def read_chunks(self) -> AsyncIterator[bytes]:
        """Iterate over the (de-chunked) body bytes as they arrive, up to the end of the body.

        Use as ``async for chunk in resp.read_chunks()``.  Raises
        :class:`UpstreamProtocolError` if the connection breaks before the end of
        the body (after yielding whatever arrived before).  (The response is its
        own iterator: cheaper than an async generator on the per-request path.)
        """
        return self

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        while True:
            if conn._chunks:
                data = conn._take()
                if conn._msg_done:
                    # Whole body received: recycle the connection before the
                    # consumer even looks at the last piece.
                    self._conn = None
                    self._pool._release(conn)
                return data
            if conn._msg_done:
                self._conn = None
                self._pool._release(conn)
                raise StopAsyncIteration
            if conn._body_error is not None:
                self._conn = None
                conn._abort()
                raise conn._body_error
            limit_s = self._pool._read_timeout
            if limit_s is None:
                waiter = conn._waiter = conn._loop.create_future()
                try:
                    await waiter
                finally:
                    conn._waiter = None
            else:
                await conn._wait(limit_s)

    async def aclose(self) -> None:
        """Return the connection to the pool if the response ended cleanly, else close it.

        Calling it before the end of the body closes the upstream socket (this
        is how a client going away stops the upstream).  Idempotent.
        """
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if conn._msg_done:
            if conn._chunks:
                conn._take()  # drop the unread rest; also resumes reading if paused
            self._pool._release(conn)
        else:
            conn._abort()


class UpstreamPool:
    """Pool of keep-alive HTTP/1.1 connections keyed by (host, port).

    Not thread-safe: use it from one event loop.  If it is used from another
    loop later (e.g. a second ``asyncio.run``), it forgets the old loop's idle
    connections and starts over.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        max_idle_per_origin: int = 100,
        idle_keepalive_s: float = 30.0,
        read_timeout: float | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_per_origin
        self._keepalive = idle_keepalive_s
        self._read_timeout = read_timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self,
        host: str,
        port: int,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | None = None,
    ) -> UpstreamResponse:
        """Send a request and return once the final response head has arrived.

        ``headers`` are sent as given (the caller sets Host etc.; names and
        values must not contain CR/LF).  With ``body`` and no content-length
        header, the body is sent with chunked transfer-encoding.
        """
        chunked = False
        content_length = -1
        parts = [method, b" ", target, _HTTP11]
        if body is None:
            for name, value in headers:
                parts += (name, _SEP, value, _CRLF)
        else:
            for name, value in headers:
                parts += (name, _SEP, value, _CRLF)
                lname = name.lower()
                if lname == b"content-length":
                    try:
                        content_length = int(value)
                    except ValueError:
                        raise UpstreamProtocolError("invalid request content-length") from None
                elif lname == b"transfer-encoding":
                    chunked = True
            if content_length < 0 and not chunked:
                chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            elif chunked:
                content_length = -1
        parts.append(_CRLF)
        head = b"".join(parts)
        is_head = method == _HEAD

        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        key = (host, port)
        conn = self._acquire(key, loop)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(key, loop)
        try:
            if body is None:
                # Fast path of conn.exchange() without a coroutine of its own.
                conn._start(is_head)
                conn._transport.write(head)
                conn._req_sent = True
                if not conn._headers_done:
                    await conn._await_head(self._read_timeout)
            else:
                await conn.exchange(
                    head, is_head, body, chunked, content_length, self._read_timeout
                )
        except UpstreamProtocolError as exc:
            conn._abort()
            if not reused or body is not None or conn._got_bytes:
                raise
            if isinstance(exc, UpstreamTimeoutError):
                raise
            # A kept-alive connection the server had already given up on:
            # retry once on a fresh connection.
            conn = await self._connect(key, loop)
            try:
                await conn.exchange(
                    head, is_head, body, chunked, content_length, self._read_timeout
                )
            except BaseException:
                conn._abort()
                raise
        except BaseException:
            conn._abort()
            raise

        if conn._msg_done and not conn._chunks:
            # No body (HEAD/204/304/101, or an empty body already complete).
            has_body = not (is_head or conn._status in _NO_BODY_STATUS or conn._status == 101)
            resp = UpstreamResponse(self, None, conn._status, conn._reason, conn._headers, has_body)
            if conn._status == 101:
                conn._abort()
            else:
                self._release(conn)
            return resp
        return UpstreamResponse(self, conn, conn._status, conn._reason, conn._headers, True)

    async def aclose(self) -> None:
        """Close all idle connections.  Connections released later are closed too."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle = self._idle
        self._idle = {}
        for conns in idle.values():
            for conn in conns:
                conn._closed = True
                if conn._transport is not None:
                    conn._transport.close()

    # ------------------------------------------------------------ internals

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """First use, or use from another event loop: start over, empty and open."""
        if self._loop is not None:
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = None
            for conns in self._idle.values():
                for conn in conns:
                    conn._closed = True
                    if conn._transport is not None:
                        try:
                            conn._transport.abort()
                        except RuntimeError:  # that loop is closed already
                            pass
            self._idle = {}
            self._closed = False
        self._loop = loop

    def _acquire(self, key: tuple[str, int], loop: asyncio.AbstractEventLoop) -> _Conn | None:
        conns = self._idle.get(key)
        if not conns:
            return None
        now = loop.time()
        keepalive = self._keepalive
        while conns:
            conn = conns.pop()  # most recently used first
            if conn._closed:
                continue
            if now - conn._idle_since >= keepalive:
                conn._abort()
                continue
            return conn
        return None

    async def _connect(self, key: tuple[str, int], loop: asyncio.AbstractEventLoop) -> _Conn:
        host, port = key
        conn = _Conn(loop, key)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(lambda: conn, host, port)
        except TimeoutError:
            raise UpstreamConnectError(
                f"timed out connecting to {host}:{port} after {self._connect_timeout:g}s"
            ) from None
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        return conn

    def _release(self, conn: _Conn) -> None:
        if (
            self._closed
            or conn._closed
            or not conn._keep_alive
            or not conn._req_sent
            or conn._body_error is not None
        ):
            conn._abort()
            return
        conns = self._idle.get(conn._key)
        if conns is None:
            conns = self._idle[conn._key] = []
        elif len(conns) >= self._max_idle:
            conn._abort()
            return
        conn._in_use = False
        loop = conn._loop
        conn._idle_since = loop.time()
        conns.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._keepalive + 0.05, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        keepalive = self._keepalive
        oldest = now
        for key in list(self._idle):
            live: list[_Conn] = []
            for conn in self._idle[key]:
                if conn._closed:
                    continue
                if now - conn._idle_since >= keepalive:
                    conn._abort()
                    continue
                live.append(conn)
                oldest = min(oldest, conn._idle_since)
            if live:
                self._idle[key] = live
            else:
                del self._idle[key]
        if self._idle:
            delay = max(oldest + keepalive - now, 0.0) + 0.05
            self._sweeper = loop.call_later(delay, self._sweep)
