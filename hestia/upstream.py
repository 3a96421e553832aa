"""Lean pooled keep-alive HTTP/1.1 client for the proxy's data path.

One :class:`UpstreamPool` per event loop.  Each upstream TCP connection is an
:class:`UpstreamConnection` (an :class:`asyncio.Protocol`) whose bytes are parsed by
``httptools`` (llhttp, C).  Response bodies are handed to the caller as they arrive; request
bodies are streamed with write flow control.  No logging, no regexes, no task or timer per
request unless a limit asks for one, and as few allocations as possible on the per-request path.

Usage (the caller must always end a response with ``aclose()``)::

    resp = await pool.request("127.0.0.1", 11434, b"GET", b"/api/tags", headers)
    try:
        async for chunk in resp.read_chunks():
            ...
    finally:
        await resp.aclose()

A connection is in one :class:`ConnState`; any other move is a bug and raises
:class:`ConnStateError`::

    NEW --start_exchange--> ACTIVE --release--> IDLE --start_exchange--> ACTIVE ...
     |                        |                   |
     +------------------------+-------------------+--abort / close / lost / expired--> CLOSED

While ACTIVE, the response goes HEAD -> BODY -> DONE, or from HEAD straight to DONE when it has
no body (HEAD requests, 204, 304); interim 1xx responses are skipped within HEAD.  An error
always closes the connection.  The pool keeps, per :class:`Origin`, an idle list (LIFO) and the
set of every open connection, so that :meth:`UpstreamPool.abort_origin` can cut in-use ones too.

Limits: :class:`UpstreamTimeouts` (connect, response head, gaps in the body; per request or
the pool's default), ``max_response_head`` bytes (no byte past it is buffered) and
``max_response_headers`` lines.  After a kept-alive connection turns out dead before any response
byte, only GET, HEAD, OPTIONS and TRACE without a body are sent again (RFC 9110 9.2.2).

Errors (each carries ``reason``, a sentence for the log and the error page; right column: what
the proxy should answer)::

    UpstreamError
     +-- UpstreamConnectError     refused, unreachable, DNS failure                 502
     +-- UpstreamTimeoutError     a limit of UpstreamTimeouts passed; .phase is     504
     |                            "connect", "response_headers" or "idle_body"; .limit
     +-- UpstreamProtocolError    reset or closed mid-response, origin aborted      502
          +-- UpstreamBadResponse   malformed head, invalid status (000, 999, 101)  502
               +-- UpstreamHeadTooLarge  head over max_response_head bytes or
                                         max_response_headers lines; .limit

:class:`ConnStateError` is not an upstream failure but a bug in this module or its caller.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import httptools

__all__ = [
    "TRANSITIONS",
    "ConnState",
    "ConnStateError",
    "Origin",
    "UpstreamBadResponse",
    "UpstreamConnectError",
    "UpstreamConnection",
    "UpstreamError",
    "UpstreamHeadTooLarge",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeoutError",
    "UpstreamTimeouts",
]

# Stop reading from the upstream socket once this many body bytes are buffered
# and not yet taken by the consumer (back-pressure towards the upstream).
_READ_HIGH_WATER = 256 * 1024
# Write buffer limits of the transport for request bodies.
_WRITE_HIGH_WATER = 256 * 1024
_WRITE_LOW_WATER = 64 * 1024
# Safe to send again after a kept-alive connection died under them (RFC 9110 9.2.2), and only
# without a body: a bodiless POST/PUT/DELETE may already have been acted on.
_REPLAYABLE = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))
_HTTP11 = b" HTTP/1.1\r\n"
_CRLF = b"\r\n"
_END_OF_HEAD = b"\r\n\r\n"
_SEP = b": "
_LAST_CHUNK = b"0\r\n\r\n"
_HEAD = b"HEAD"

TimeoutPhase = Literal["connect", "response_headers", "idle_body"]

# What each three-digit status (all llhttp lets through) means here: one tuple index on the
# per-response path instead of a chain of comparisons.
_WITH_BODY, _NO_BODY, _INTERIM, _INVALID = 0, 1, 2, 3
_STATUS_KIND = tuple(
    _NO_BODY
    if status in (204, 304)
    # 101 is no interim response: this path never asks for an upgrade (WebSockets are
    # relayed elsewhere).  000 is none either.
    else _INTERIM
    if 100 <= status <= 199 and status != 101
    else _WITH_BODY
    if 200 <= status <= 599
    else _INVALID
    for status in range(1000)
)


# ---------------------------------------------------------------- errors


class UpstreamError(Exception):
    """Base class of every upstream failure raised by this module."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamConnectError(UpstreamError):
    """Could not connect: refused, unreachable, DNS failure (not a timeout)."""


class UpstreamTimeoutError(UpstreamError):
    """A limit of :class:`UpstreamTimeouts` passed; ``phase`` names which one."""

    def __init__(self, phase: TimeoutPhase, limit: float, reason: str | None = None) -> None:
        if reason is None:
            reason = _TIMEOUT_REASONS[phase].format(limit)
        super().__init__(reason)
        self.phase: TimeoutPhase = phase
        self.limit = limit


_TIMEOUT_REASONS: dict[str, str] = {
    "connect": "no connection within {:g}s (timeouts.connect)",
    "response_headers": "no response head within {:g}s (timeouts.response_headers)",
    "idle_body": "no body data for {:g}s (timeouts.idle_body)",
}


class UpstreamProtocolError(UpstreamError):
    """Connection reset or closed mid-response, a malformed response, or an aborted origin."""


class UpstreamBadResponse(UpstreamProtocolError):
    """The upstream answered, but not with HTTP the gateway can pass on."""


class UpstreamHeadTooLarge(UpstreamBadResponse):
    """The response head is over the pool's byte or header-line limit (``limit``)."""

    def __init__(self, reason: str, limit: int) -> None:
        super().__init__(reason)
        self.limit = limit


class _NoResponse(UpstreamProtocolError):
    """The connection ended before a single response byte: the request may be replayable."""


class ConnStateError(AssertionError):
    """An impossible connection state transition: a bug, never an upstream failure."""


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    """Limits for one request, in seconds (None: no limit).

    ``connect``: to establish the TCP connection.  ``response_headers``: from the end of the
    request to the final response head (also the longest the upstream may leave a request body
    unread).  ``idle_body``: the longest gap between two pieces of the response body while the
    consumer waits for one.  No body limit by default: a model may think for minutes.
    """

    connect: float = 10.0
    response_headers: float | None = None
    idle_body: float | None = None

    def __post_init__(self) -> None:
        for name in ("connect", "response_headers", "idle_body"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"timeouts.{name} must be a positive number of seconds")


_DEFAULT_TIMEOUTS = UpstreamTimeouts()


# ---------------------------------------------------------------- connection


class ConnState(enum.IntEnum):
    """Where a connection is in its life (``UpstreamConnection.state``)."""

    NEW = 0  # connecting or connected, no exchange yet
    ACTIVE = 1  # one exchange in progress (request going out and/or response coming in)
    IDLE = 2  # in the pool between exchanges
    CLOSED = 3  # final: aborted, closed, lost or expired


class ResponsePhase(enum.IntEnum):
    """How far the response of the current exchange has come (``UpstreamConnection.phase``)."""

    HEAD = 0  # waiting for the final response head (interim 1xx responses are skipped)
    BODY = 1  # final head received, body arriving
    DONE = 2  # the whole response received; also "no exchange" on a NEW connection


# Module-level aliases: reading an enum member through its class costs ~10x a global.
_NEW = ConnState.NEW
_ACTIVE = ConnState.ACTIVE
_IDLE = ConnState.IDLE
_CLOSED = ConnState.CLOSED
_P_HEAD = ResponsePhase.HEAD
_P_BODY = ResponsePhase.BODY
_P_DONE = ResponsePhase.DONE

# Allowed moves from each state.  Closing what is closed is a no-op, not a move.  The methods
# making moves check them with identity tests (cheaper than set lookups on the per-request
# path); a test holds every method to this table.
TRANSITIONS: dict[ConnState, frozenset[ConnState]] = {
    _NEW: frozenset((_ACTIVE, _CLOSED)),
    _ACTIVE: frozenset((_IDLE, _CLOSED)),
    _IDLE: frozenset((_ACTIVE, _CLOSED)),
    _CLOSED: frozenset(),
}


def _bad_move(state: ConnState, new: ConnState) -> ConnStateError:
    return ConnStateError(f"upstream connection cannot go from {state.name} to {new.name}")


def _new_parser(protocol: object) -> Any:
    parser = httptools.HttpResponseParser(protocol)
    # Upstreams in the wild end header lines with a bare LF (busybox httpd passes CGI headers
    # through as the script wrote them); browsers and nginx accept that, and so do we.
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    return parser


class _Deadlines:
    """Response-head deadlines of one event loop, checked by one sweep every few hundred
    milliseconds instead of a timer per request: a timer armed and cancelled for every
    request cost more than the rest of the exchange's bookkeeping (a deadline fires at most
    a sweep interval late: a quarter of the shortest limit, at most 0.5 s)."""

    __slots__ = ("conns", "handle", "interval", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.conns: set[UpstreamConnection] = set()
        self.handle: asyncio.TimerHandle | None = None
        self.interval = _SWEEP_MAX_S

    def add(self, conn: UpstreamConnection, limit: float) -> None:
        self.conns.add(conn)
        if limit / 4 < self.interval:
            self.interval = max(limit / 4, _SWEEP_MIN_S)
            if self.handle is not None:
                self.handle.cancel()
                self.handle = None
        if self.handle is None:
            self.handle = self.loop.call_later(self.interval, self.sweep)

    def sweep(self) -> None:
        self.handle = None
        now = self.loop.time()
        late = [c for c in self.conns if c._head_deadline and c._head_deadline <= now]
        for conn in late:
            self.conns.discard(conn)
            conn._head_timed_out()
        if self.conns:
            self.handle = self.loop.call_later(self.interval, self.sweep)
        else:
            self.interval = _SWEEP_MAX_S


_SWEEP_MAX_S = 0.5
_SWEEP_MIN_S = 0.01
_DEADLINES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = (
    weakref.WeakKeyDictionary()
)


def _deadlines_of(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    found = _DEADLINES.get(loop)
    if found is None:
        found = _DEADLINES[loop] = _Deadlines(loop)
    return found


class Origin:
    """One upstream address and the pool's connections to it (``UpstreamConnection.origin``).

    The pool keeps an Origin once made, also with no connection left (a request may be
    connecting to it): a few hundred bytes per address ever used."""

    __slots__ = ("conns", "host", "idle", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[UpstreamConnection] = []  # reusable; the most recently used last
        self.conns: set[UpstreamConnection] = set()  # every open one, idle or in use

    def __repr__(self) -> str:
        return f"<Origin {self.host}:{self.port} {len(self.idle)} idle of {len(self.conns)}>"


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection: its state, the parser callbacks and the current exchange.

    The pool and :class:`UpstreamResponse` drive it through its public methods only.  Its
    public attributes are for reading (plain slots rather than properties: the pool and the
    response read them on every request): ``state`` (:class:`ConnState`), ``phase``
    (:class:`ResponsePhase`), ``status``, ``reason`` and ``headers`` of the current exchange's
    final response head once ``phase`` is past HEAD (header names lower-cased), ``origin``
    (:class:`Origin`) and ``idle_since`` (the loop time it last became IDLE).
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_deadlines",
        "_error",
        "_head_deadline",
        "_head_limit",
        "_head_room",
        "_is_head",
        "_keep_alive",
        "_loop",
        "_max_head",
        "_max_headers",
        "_parser",
        "_read_paused",
        "_request_done",
        "_timeouts",
        "_transport",
        "_waiter",
        "_write_paused",
        "headers",
        "idle_since",
        "origin",
        "phase",
        "reason",
        "state",
        "status",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        origin: Origin,
        max_head: int,
        max_headers: int,
    ) -> None:
        self._loop = loop
        self.origin = origin  # joined (origin.conns) on connect, left on close
        self._max_head = max_head
        self._max_headers = max_headers
        # Set by connection_made(), which runs before a connection is ever used.
        self._transport: asyncio.Transport = cast(asyncio.Transport, None)
        self._parser: Any = _new_parser(self)
        self.state = _NEW
        self.phase = _P_DONE
        self._error: UpstreamError | None = None
        self._timeouts = _DEFAULT_TIMEOUTS
        self._deadlines = _deadlines_of(loop)
        self._head_deadline = 0.0  # loop time by which the response head must come; 0: none
        self._head_limit = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._request_done = False
        self._keep_alive = False
        self._is_head = False
        self._head_room = max_head
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.idle_since = 0.0

    def __repr__(self) -> str:
        origin = self.origin
        return (
            f"<UpstreamConnection {origin.host}:{origin.port} {self.state.name} {self.phase.name}>"
        )

    # ------------------------------------------------------------ public API

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet taken by the consumer."""
        return self._buffered

    @property
    def reading_paused(self) -> bool:
        """True while reading from the socket is paused because the consumer lags behind."""
        return self._read_paused

    def start_exchange(
        self, is_head: bool, timeouts: UpstreamTimeouts, request: bytes | None = None
    ) -> None:
        """NEW or IDLE -> ACTIVE: begin one request/response exchange.

        ``request``: the whole request when it has no body, sent at once; else None, and
        :meth:`send_with_body` follows."""
        state = self.state
        if state is not _IDLE and state is not _NEW:
            if state is _CLOSED:
                # Lost between connect and now (the upstream hung up, or spoke first).
                raise self._error or _NoResponse(
                    "upstream closed the connection before the request was sent"
                )
            raise _bad_move(state, _ACTIVE)
        self.state = _ACTIVE
        if self._is_head:
            # llhttp took the last response for one with a body of Content-Length bytes.
            self._parser = _new_parser(self)
        # Not reset, being right already: _error (an error always closes the connection),
        # _keep_alive and status (both set when the response head or end comes).
        self.phase = _P_HEAD
        self._is_head = is_head
        self._timeouts = timeouts
        self._head_room = self._max_head
        self.reason = b""
        self.headers = []
        if request is None:
            self._request_done = False
        else:
            self._transport.write(request)
            self._request_done = True
            limit = timeouts.response_headers
            if limit is not None:
                self._arm_head_timer(limit)

    async def send_with_body(
        self,
        head: bytes,
        body: AsyncIterator[bytes],
        chunked: bool,
        content_length: int,
    ) -> None:
        """Send a request head and stream its body (chunked, or exactly content_length bytes)."""
        transport = self._transport
        sent = 0
        first = True
        async for chunk in body:
            if not chunk:
                continue
            if self.state is _CLOSED:
                return  # wait_head() raises why
            n = len(chunk)
            if chunked:
                if first:
                    transport.writelines((head, b"%x\r\n" % n, chunk, _CRLF))
                else:
                    transport.writelines((b"%x\r\n" % n, chunk, _CRLF))
            else:
                sent += n
                if sent > content_length:
                    self.abort()
                    raise UpstreamProtocolError("request body longer than its content-length")
                if first:
                    transport.writelines((head, chunk))
                else:
                    transport.write(chunk)
            first = False
            while self._write_paused and self.state is not _CLOSED:
                if self.phase is not _P_HEAD:
                    # The upstream answered before taking the whole body (e.g. 413) and
                    # stopped reading: stop uploading, keep the answer.  The request stays
                    # unfinished, so release() will not pool this connection.
                    return
                limit = self._timeouts.response_headers
                reason = ""
                if limit is not None:
                    reason = (
                        f"upstream neither read the request body nor answered for {limit:g}s"
                        " (timeouts.response_headers)"
                    )
                await self._next_event(limit, reason)
        if self.state is _CLOSED:
            return
        if chunked:
            transport.write(head + _LAST_CHUNK if first else _LAST_CHUNK)
        else:
            if sent != content_length:
                self.abort()
                raise UpstreamProtocolError("request body shorter than its content-length")
            if first:
                transport.write(head)
        self._request_done = True
        limit = self._timeouts.response_headers
        if limit is not None:
            self._arm_head_timer(limit)

    def wait_head(self) -> asyncio.Future[None]:
        """While ``phase`` is HEAD: a future done at the next event (await it, then look at
        ``phase`` again).  Raises why the head will not come."""
        error = self._error
        if error is not None:
            raise error
        # No timer here: the response_headers limit has a timer of its own.
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def read_body(self) -> bytes | None:
        """Take the body bytes received so far; b"" at the end of the body; None if nothing
        has arrived yet (await :meth:`wait_body` and call again).  Raises the exchange's error
        once the bytes received before it have been taken."""
        chunks = self._chunks
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._buffered = 0
            if self._read_paused:
                self._read_paused = False
                if self.state is not _CLOSED:
                    self._transport.resume_reading()
            return data
        if self.phase is _P_DONE:
            return b""
        error = self._error
        if error is not None:
            raise error
        return None

    def wait_body(self) -> asyncio.Future[None]:
        """A future done at the next event (data, end, loss, or timeouts.idle_body passing)."""
        waiter = self._waiter = self._loop.create_future()
        limit = self._timeouts.idle_body
        if limit is not None:
            self._arm_wait_timer(waiter, limit, "idle_body", None)
        return waiter

    def release(self) -> bool:
        """ACTIVE -> IDLE if the exchange ended cleanly and the connection can carry another
        (True); otherwise ACTIVE -> CLOSED (False).  Unread body bytes are dropped."""
        state = self.state
        if state is not _ACTIVE:
            if state is _CLOSED:
                return False
            raise _bad_move(state, _IDLE)
        # (An error always closes the connection: no need to look at self._error.)
        if self.phase is _P_DONE and self._keep_alive and self._request_done:
            self.state = _IDLE
            if self._chunks:
                self.read_body()  # drop them; this also resumes reading if it was paused
            self.idle_since = self._loop.time()
            return True
        self.abort()
        return False

    def abort(self, error: UpstreamError | None = None) -> None:
        """-> CLOSED now, dropping whatever is not sent yet.  An exchange still in progress
        fails with ``error`` (or a generic one); body bytes already received can still be
        read first."""
        if self.phase is not _P_DONE and self._error is None:
            self._error = error or UpstreamProtocolError("upstream connection was aborted")
        if self.state is not _CLOSED:
            self._close()
            transport = self._transport
            if transport is not None:
                transport.abort()
        self._wake()

    def close(self) -> None:
        """-> CLOSED, gracefully (FIN after pending writes): for connections not in use."""
        if self.state is not _CLOSED:
            self._close()
            transport = self._transport
            if transport is not None:
                transport.close()
        self._wake()

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
        self.origin.conns.add(self)

    def data_received(self, data: bytes) -> None:
        if self.state is not _ACTIVE:
            self._unexpected_data()
            return
        if self.phase is _P_BODY:
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                self._parser_failed(exc)
            self._wake()
            return
        # The head (or bytes after a complete response, which are the parser callbacks'
        # business: on_message_begin or on_body).
        n = len(data)
        if n > self._head_room:
            self._head_overflow(data)
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parser_failed(exc)
        if self.phase is _P_HEAD:
            self._head_room -= n  # still no final head: these bytes count towards the limit
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # let the transport close itself; connection_lost does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not _CLOSED:
            self._close()
        phase = self.phase
        if phase is not _P_DONE and self._error is None:
            if phase is _P_BODY:
                if _delimited_by_close(self.headers):
                    if exc is None:
                        self.phase = _P_DONE  # no framing: a clean close ends the body
                    else:
                        self._error = UpstreamProtocolError(
                            f"upstream connection reset mid-body ({exc})"
                        )
                else:
                    self._error = UpstreamProtocolError(
                        "upstream closed the connection before the end of the response body"
                        + (f" ({exc})" if exc is not None else "")
                    )
            elif self._head_room == self._max_head:
                self._error = _NoResponse(
                    "upstream closed the connection before sending a response"
                    + (f" ({exc})" if exc is not None else "")
                )
            else:
                self._error = UpstreamProtocolError(
                    "upstream closed the connection in the middle of the response head"
                )
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # ------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self.phase is _P_DONE:
            # A second response in the same read: the upstream is out of sync.  Stopping
            # llhttp here spares every later callback a check.
            raise self._stop_parsing(UpstreamProtocolError("upstream sent an extra response"))

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        # No count check here: max_response_head bounds what can pile up before
        # on_headers_complete counts them.
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if len(self.headers) > self._max_headers:
            raise self._stop_parsing(
                UpstreamHeadTooLarge(
                    f"upstream response has more than {self._max_headers} header lines"
                    " (max_response_headers)",
                    self._max_headers,
                )
            )
        parser = self._parser
        status = parser.get_status_code()
        kind = _STATUS_KIND[status]
        if kind > _NO_BODY:
            if kind == _INTERIM:
                # 100 Continue, 102, 103 Early Hints, ...: skipped, staying in HEAD; the end
                # of its (empty) message clears the way for the final head.
                return
            raise self._stop_parsing(
                UpstreamBadResponse(f"upstream answered with an invalid status {status:03d}")
            )
        self.status = status
        if self._head_deadline:
            self._head_deadline = 0.0
            self._deadlines.conns.discard(self)
        if self._is_head:
            # llhttp cannot be told about HEAD: it would wait for a body of Content-Length
            # bytes.  The message ends here; the next exchange gets a fresh parser.
            self.phase = _P_DONE
            self._keep_alive = _head_keep_alive(parser.get_http_version(), self.headers)
        elif kind == _NO_BODY:
            self.phase = _P_DONE
            self._keep_alive = parser.should_keep_alive()
        else:
            self.phase = _P_BODY

    def on_body(self, body: bytes) -> None:
        if self.phase is not _P_BODY:
            # Bytes after a HEAD response, which llhttp takes for its body: out of sync.
            self._keep_alive = False
            return
        self._chunks.append(body)
        buffered = self._buffered = self._buffered + len(body)
        if buffered > _READ_HIGH_WATER and not self._read_paused:
            self._read_paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        phase = self.phase
        if phase is _P_BODY:
            self.phase = _P_DONE
            self._keep_alive = self._parser.should_keep_alive()
        elif phase is _P_HEAD:
            # Only an interim response ends while the head is still to come.
            self.reason = b""
            self.headers = []
        # DONE: a body-less response ended in on_headers_complete already.

    # ------------------------------------------------------------ internals

    def _close(self) -> None:
        """The move to CLOSED (callers check it is not CLOSED already)."""
        self.state = _CLOSED
        self._keep_alive = False
        self.origin.conns.discard(self)
        if self._head_deadline:
            self._head_deadline = 0.0
            self._deadlines.conns.discard(self)
        # A wait timer goes with its waiter: _wake() below ends both.

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _next_event(self, limit: float | None, reason: str) -> asyncio.Future[None]:
        """A future done at the next protocol event while a request body is blocked; with
        ``limit``, the exchange fails with UpstreamTimeoutError if none comes in time."""
        waiter = self._waiter = self._loop.create_future()
        if limit is not None:
            self._arm_wait_timer(waiter, limit, "response_headers", reason)
        return waiter

    def _arm_wait_timer(
        self, waiter: asyncio.Future[None], limit: float, phase: TimeoutPhase, reason: str | None
    ) -> None:
        # The timer ends with the wait however it ends (event, close, cancellation), so that
        # _wake() on the per-chunk path needs no timer bookkeeping.
        timer = self._loop.call_later(limit, self._wait_timed_out, waiter, phase, limit, reason)
        waiter.add_done_callback(lambda _: timer.cancel())

    def _wait_timed_out(
        self,
        waiter: asyncio.Future[None],
        phase: TimeoutPhase,
        limit: float,
        reason: str | None,
    ) -> None:
        if not waiter.done():
            self.abort(UpstreamTimeoutError(phase, limit, reason))

    def _head_timed_out(self) -> None:
        self._head_deadline = 0.0
        self.abort(UpstreamTimeoutError("response_headers", self._head_limit))

    def _arm_head_timer(self, limit: float) -> None:
        if self.phase is _P_HEAD and self.state is _ACTIVE:
            self._head_deadline = self._loop.time() + limit
            self._head_limit = limit
            self._deadlines.add(self, limit)

    def _stop_parsing(self, error: UpstreamError) -> UpstreamError:
        """Record why the response is unacceptable; the caller raises it out of a parser
        callback, which stops llhttp at once (feed_data then raises, see _parser_failed)."""
        if self._error is None:
            self._error = error
        return error

    def _parser_failed(self, exc: Exception) -> None:
        self.abort(UpstreamBadResponse(f"malformed upstream response: {exc}"))

    def _head_overflow(self, data: bytes) -> None:
        """The head is not complete within the bytes it may still take: parse exactly those,
        and if it is still not complete, give up without buffering any more of it."""
        room = self._head_room
        self._head_room = 0
        view = memoryview(data)
        try:
            self._parser.feed_data(view[:room])
            if self.phase is _P_HEAD and self.state is _ACTIVE:
                self.abort(
                    UpstreamHeadTooLarge(
                        f"upstream response head is larger than {self._max_head} bytes"
                        " (max_response_head)",
                        self._max_head,
                    )
                )
                return
            if self.state is _ACTIVE and len(view) > room:
                self._parser.feed_data(view[room:])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parser_failed(exc)
        self._wake()

    def _unexpected_data(self) -> None:
        state = self.state
        if state is _CLOSED:
            return
        # Bytes with no request outstanding: the upstream is out of sync; never reuse.
        if state is _NEW:
            self._error = UpstreamProtocolError(
                "upstream sent data before any request (is it an HTTP server?)"
            )
        self._close()
        self._transport.abort()


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


# ---------------------------------------------------------------- response


class UpstreamResponse:
    """The head of an upstream response plus access to its body.

    Always finish with :meth:`aclose` (also after reading the whole body).
    """

    __slots__ = ("_conn", "_has_body", "_pool", "headers", "reason", "status")

    def __init__(
        self,
        pool: UpstreamPool,
        conn: UpstreamConnection | None,
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
                conn.abort()
            except Exception:  # pragma: no cover - e.g. its loop is closed already
                pass

    @property
    def complete(self) -> bool:
        """True once the whole body has been received and handed out (the connection is back
        in the pool): the chunk just read, if any, was the last one."""
        return self._conn is None

    @property
    def connection(self) -> UpstreamConnection | None:
        """The connection still carrying this response's body; None once it is complete."""
        return self._conn

    def has_body(self) -> bool:
        """False for responses that cannot carry a body (HEAD, 204, 304)."""
        return self._has_body

    def body_if_complete(self) -> bytes | None:
        """The whole body when all of it has been received already (the connection goes
        back to the pool at once), b"" for a response without a body; else None, taking
        nothing: read it with :meth:`read_chunks` then."""
        conn = self._conn
        if conn is None:
            return b""
        if conn.phase is not _P_DONE:
            return None
        data = conn.read_body()
        self._conn = None
        self._pool._release(conn)
        return data or b""

    def read_chunks(self) -> AsyncIterator[bytes]:
        """Iterate over the (de-chunked) body bytes as they arrive, up to the end of the body.

        Use as ``async for chunk in resp.read_chunks()``.  Raises
        :class:`UpstreamProtocolError` if the connection breaks before the end of
        the body (after yielding whatever arrived before), :class:`UpstreamTimeoutError`
        when ``idle_body`` passes.  (The response is its own iterator: cheaper than an
        async generator on the per-request path.)
        """
        return self

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        try:
            data = conn.read_body()
            while data is None:
                await conn.wait_body()
                data = conn.read_body()
        except BaseException:  # the body broke, timed out, or this task was cancelled
            self._conn = None
            conn.abort()
            raise
        if conn.phase is _P_DONE:
            # Whole body received: recycle the connection before the consumer even looks
            # at the last piece.
            self._conn = None
            self._pool._release(conn)
            if not data:
                raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        """Return the connection to the pool if the response ended cleanly, else close it.

        Calling it before the end of the body closes the upstream socket (this
        is how a client going away stops the upstream).  Idempotent.
        """
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if conn.phase is _P_DONE:
            self._pool._release(conn)
        else:
            conn.abort()


# ---------------------------------------------------------------- pool


class UpstreamPool:
    """Pool of keep-alive HTTP/1.1 connections keyed by (host, port).

    Not thread-safe: use it from one event loop.  If it is used from another
    loop later (e.g. a second ``asyncio.run``), it forgets the old loop's
    connections and starts over.
    """

    def __init__(
        self,
        *,
        timeouts: UpstreamTimeouts = _DEFAULT_TIMEOUTS,
        max_idle_per_origin: int = 100,
        idle_keepalive_s: float = 30.0,
        max_response_head: int = 64 * 1024,
        max_response_headers: int = 256,
    ) -> None:
        self._timeouts = timeouts
        self._max_idle = max_idle_per_origin
        self._keepalive = idle_keepalive_s
        self._max_head = max_response_head
        self._max_headers = max_response_headers
        self._origins: dict[tuple[str, int], Origin] = {}
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
        *,
        timeouts: UpstreamTimeouts | None = None,
    ) -> UpstreamResponse:
        """Send a request and return once the final response head has arrived.

        ``headers`` are sent as given (the caller sets Host etc.; names and
        values must not contain CR/LF).  With ``body`` and no content-length
        header, the body is sent with chunked transfer-encoding.  ``timeouts``
        replaces the pool's default limits for this request.
        """
        chunked = False
        content_length = -1
        if body is None:
            if headers:
                # All in C: one "name: value" per header, then the block.
                block = _CRLF.join(map(_SEP.join, headers))
                head = b"".join((method, b" ", target, _HTTP11, block, _END_OF_HEAD))
            else:
                head = b"".join((method, b" ", target, _HTTP11, _CRLF))
        else:
            parts = [method, b" ", target, _HTTP11]
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
        if timeouts is None:
            timeouts = self._timeouts

        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        origin = self._origins.get((host, port))
        if origin is None:
            origin = self._origins[(host, port)] = Origin(host, port)
        conn = self._acquire(origin, loop)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(origin, loop, timeouts.connect)
        try:
            if body is None:
                conn.start_exchange(is_head, timeouts, head)
            else:
                conn.start_exchange(is_head, timeouts)
                await conn.send_with_body(head, body, chunked, content_length)
            # Waiting here rather than in a coroutine of the connection's own: one coroutine
            # less per request.
            while conn.phase is _P_HEAD:
                await conn.wait_head()
        except _NoResponse:
            conn.abort()
            if not reused or body is not None or method not in _REPLAYABLE:
                raise
            # A kept-alive connection the server had already given up on, and a request
            # that is safe to send twice: once more on a fresh connection.
            conn = await self._replay(origin, loop, head, is_head, timeouts)
        except BaseException:
            conn.abort()
            raise
        # A response without a body (HEAD, 204, 304) gives its connection back in aclose().
        status = conn.status
        return UpstreamResponse(
            self,
            conn,
            status,
            conn.reason,
            conn.headers,
            not (is_head or status == 204 or status == 304),
        )

    def abort_origin(self, host: str, port: int, reason: str) -> int:
        """Close every connection to host:port now, idle and in use.

        A request waiting for its head or a body being read on one of them fails at once
        with ``UpstreamProtocolError(reason)`` (after the body bytes already received).
        For an upstream known to be gone, e.g. its container died.  A connection still
        being opened is not affected (it fails on its own if the upstream is gone).  Returns
        how many connections were closed.
        """
        origin = self._origins.get((host, port))
        if origin is None:
            return 0
        origin.idle.clear()
        doomed = list(origin.conns)
        for conn in doomed:
            conn.abort(UpstreamProtocolError(reason))
        return len(doomed)

    def connections(self, host: str, port: int) -> list[UpstreamConnection]:
        """The open connections to host:port, idle and in use (for tests and metrics)."""
        origin = self._origins.get((host, port))
        return [] if origin is None else list(origin.conns)

    async def aclose(self) -> None:
        """Close all idle connections.  Connections released later are closed too."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for origin in self._origins.values():
            idle = origin.idle[:]
            origin.idle.clear()
            for conn in idle:
                conn.close()

    # ------------------------------------------------------------ internals

    async def _replay(
        self,
        origin: Origin,
        loop: asyncio.AbstractEventLoop,
        head: bytes,
        is_head: bool,
        timeouts: UpstreamTimeouts,
    ) -> UpstreamConnection:
        conn = await self._connect(origin, loop, timeouts.connect)
        try:
            conn.start_exchange(is_head, timeouts, head)
            while conn.phase is _P_HEAD:
                await conn.wait_head()
        except BaseException:
            conn.abort()
            raise
        return conn

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """First use, or use from another event loop: start over, empty and open."""
        if self._loop is not None:
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = None
            for origin in self._origins.values():
                for conn in list(origin.conns):
                    try:
                        conn.abort()
                    except RuntimeError:  # that loop is closed already
                        pass
            self._origins = {}
            self._closed = False
        self._loop = loop

    def _acquire(
        self, origin: Origin, loop: asyncio.AbstractEventLoop
    ) -> UpstreamConnection | None:
        idle = origin.idle
        if not idle:
            return None
        now = loop.time()
        keepalive = self._keepalive
        while idle:
            conn = idle.pop()  # most recently used first
            if conn.state is not _IDLE:
                continue  # closed while idle
            if now - conn.idle_since >= keepalive:
                conn.abort()
                continue
            return conn
        return None

    async def _connect(
        self, origin: Origin, loop: asyncio.AbstractEventLoop, limit: float
    ) -> UpstreamConnection:
        host = origin.host
        port = origin.port
        conn = UpstreamConnection(loop, origin, self._max_head, self._max_headers)
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                await loop.create_connection(lambda: conn, host, port)
        except TimeoutError as exc:  # ours, or the kernel's (ETIMEDOUT)
            reason = (
                f"no connection to {host}:{port} within {limit:g}s (timeouts.connect)"
                if deadline.expired()
                else f"connecting to {host}:{port} timed out: {exc}"
            )
            raise UpstreamTimeoutError("connect", limit, reason) from None
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        return conn

    def _release(self, conn: UpstreamConnection) -> None:
        if not conn.release():
            return
        idle = conn.origin.idle
        if self._closed or len(idle) >= self._max_idle:
            conn.abort()
            return
        idle.append(conn)
        if self._sweeper is None:
            loop = self._loop
            assert loop is not None
            self._sweeper = loop.call_later(self._keepalive + 0.05, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        keepalive = self._keepalive
        oldest = now
        pending = False
        # (Origins stay, even with no connection left: a request may be connecting to one.)
        for origin in self._origins.values():
            live: list[UpstreamConnection] = []
            for conn in origin.idle:
                if conn.state is not _IDLE:
                    continue
                if now - conn.idle_since >= keepalive:
                    conn.abort()
                    continue
                live.append(conn)
                oldest = min(oldest, conn.idle_since)
            origin.idle[:] = live
            if live:
                pending = True
        if pending:
            delay = max(oldest + keepalive - now, 0.0) + 0.05
            self._sweeper = loop.call_later(delay, self._sweep)
