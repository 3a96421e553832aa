"""The HTTP server around the gateway: uvicorn, tuned for a proxy and hardened at the edge.

`build_server()` is what `hestia serve` runs and what the tests run, so the tests exercise the
same protocol class (and its write coalescing) as production.

`_Cycle` is a leaner version of uvicorn's request/response cycle, with three ASGI extensions
in `scope["extensions"]`: `hestia.abort` (cut the client off), `hestia.gone`/`hestia.on_gone`
(hear of a client that left, without reading `receive()`), and `hestia.respond` (a whole
response in one write). `BusyPoll` is `server.busy_poll`: polling instead of sleeping for a
moment after a request or a response, at low concurrency.

`_HttpProtocol` is uvicorn's httptools protocol (0.54) with the parser callbacks that matter
taken over, so that a client cannot exhaust the gateway before the app sees a request:

* Head limits (`server.limits`): bytes of a request head are counted as they arrive, before
  they reach the parser. While the head so far is under the smallest limit (8 KiB) that count
  is all it costs; past it, the head's lines are walked and the first line or total over its
  limit is answered 414/431 without feeding the parser another byte, so an endless header line
  costs no memory. (A head that starts in the same read as the end of the previous request, when
  a client pipelines, is checked field by field once parsed; until then the parser holds at
  most one read of it.) The number of header fields is checked once the head is parsed.
* Timeouts (`server.timeouts`): each connection has one phase (`_NEW`, `_IDLE`, `_HEAD`,
  `_BODY`, `_DONE`) and the time it entered it, or of its last body byte; the server's tick
  sweeps them (`hestia.limits`), so no timer is armed per request (uvicorn's keep-alive timer
  is not used either).
* Connection caps: a connection over the total or per-client cap gets a 503 and is closed at
  once; a WebSocket keeps its slot until it ends.
* Requests the gateway must not pass on: trailer fields of a chunked body never join the
  request's headers; an HTTP/1.1 request without exactly one Host, a CONNECT, or an
  absolute-form target naming another host than the request's Host is refused.

Every refusal is Hestia's JSON error with `Connection: close`; then the connection is
half-closed and what the client still sends is read and dropped for a moment, so that a client
busy sending an oversized request reads the answer rather than a reset. Refusals are logged at
most once per 10 s per kind, with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any
from urllib.parse import unquote

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
)

from hestia.config import ServerLimits, ServerTimeouts
from hestia.errors import error_body
from hestia.limits import (
    LINGER_S,
    ConnectionGuard,
    HeadCounter,
    Refusal,
    body_timeout,
    check_parsed_head,
    check_request,
    head_timeout,
    invalid_request,
    raise_nofile_limit,
    too_many_headers,
    trailers_too_large,
)
from hestia.types import ASGIApp

# A connection's phase: what the bytes it sends now are, and which deadline applies.
_NEW = 0  # nothing received yet: the first head must be in within `header` of the accept
_IDLE = 1  # between requests: closed after `keep_alive` (counted once the response is done)
_HEAD = 2  # a head is arriving: in full within `header` (of the accept, or of its first byte)
_BODY = 3  # the head is in, the body is not: a byte at least every `body` seconds
_DONE = 4  # refused or handed over: input is dropped; closed after LINGER_S


class _Refused(Exception):
    """Raised from a parser callback after a refusal, to stop the parser there."""


class _Discard(list[tuple[bytes, bytes]]):
    def append(self, item: tuple[bytes, bytes]) -> None:
        pass


# Where header fields parsed after the head go (a chunked body's trailer section): nowhere.
_TRAILERS = _Discard()


class HestiaServer(uvicorn.Server):
    """uvicorn's server, telling the gateway about SIGTERM/SIGINT before draining connections,
    so that requests held for a start are answered 503 at once instead of holding shutdown;
    it also drives the connection guard's clock and sweep."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_exit: Callable[[], None] | None,
        guard: ConnectionGuard | None = None,
        busy_poll: BusyPoll | None = None,
    ) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self.guard = guard or ConnectionGuard(ServerLimits(), ServerTimeouts())
        self.busy_poll = busy_poll

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._on_exit is not None:
            self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                # uvicorn re-raises the signal after a graceful shutdown, so the process would
                # end "killed by SIGTERM" (143); a clean shutdown is a success: exit 0
                self._captured_signals.clear()

    async def startup(self, sockets: list[Any] | None = None) -> None:
        raise_nofile_limit(self.guard.limits.max_connections)
        if self.busy_poll is not None:
            self.busy_poll.bind(asyncio.get_running_loop(), self.server_state.tasks)
        await super().startup(sockets)

    async def on_tick(self, counter: int) -> bool:
        self.guard.tick()
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        # the main loop's ticks have stopped: keep the deadlines while connections drain
        sweeper = asyncio.create_task(self._sweep_while_draining())
        try:
            await super().shutdown(sockets)
        finally:
            sweeper.cancel()

    async def _sweep_while_draining(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.guard.tick()


BUSY_POLL_AUTO_S = 0.0001  # `server.busy_poll: auto` with 2 or more usable CPUs


def busy_poll_seconds(setting: str | float, cpus: int | None = None) -> float:
    """`server.busy_poll` in seconds: `auto` is BUSY_POLL_AUTO_S with 2 or more usable CPUs
    (`cpus`, found when not given) and 0 (off) with one; `off` is 0."""
    if setting == "off":
        return 0.0
    if setting == "auto":
        if cpus is None:
            from hestia.workers import usable_cpus

            cpus = usable_cpus()
        return BUSY_POLL_AUTO_S if cpus >= 2 else 0.0
    return float(setting)


class BusyPoll:
    """Bounded busy polling (`server.busy_poll`; HAProxy's `busy-polling`, within limits).

    A process that sleeps in epoll_wait() between a request and the next event pays for its
    wake-up (50-100 us in a VM, more than the Python work of a small request). After a
    request's head starts arriving and after a response ends, while at most one request is in
    flight, this keeps a callback in the event loop's ready queue for `window` seconds, so the
    loop polls (epoll_wait with a zero timeout) instead of sleeping: a quick upstream's answer,
    or a client's next request on the connection, is read at once. With two or more requests
    in flight it does nothing: a loaded gateway has work between its polls anyway, and the
    CPU it would spin with belongs to its clients and upstreams.
    """

    __slots__ = ("_loop", "_spinning", "_tasks", "_until", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self._until = 0.0
        self._spinning = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[Any] = set()

    def bind(self, loop: asyncio.AbstractEventLoop, tasks: set[Any]) -> None:
        """The server's loop and its set of request tasks (what is in flight)."""
        self._loop = loop
        self._tasks = tasks

    def note(self) -> None:
        """A request started arriving, or a response ended."""
        if len(self._tasks) > 1:
            return
        self._until = time.perf_counter() + self.window
        if not self._spinning and self._loop is not None:
            self._spinning = True
            self._loop.call_soon(self._spin)

    def _spin(self) -> None:
        if time.perf_counter() < self._until and len(self._tasks) <= 1:
            self._loop.call_soon(self._spin)  # type: ignore[union-attr]
        else:
            self._spinning = False


class _CoalescingTransport:
    """A client transport that sends a response head together with the body that follows it.

    uvicorn writes a response head and its body separately, so a small proxied response would
    cost two send() calls and two TCP segments. Here a write is held back until the next one,
    and both go out in one writev; a write that nothing follows within the same event-loop
    step is sent at the end of that step (so a streamed response's head, or each chunk of a
    stream, is never held longer than that). Everything else is the real transport's.
    """

    __slots__ = ("_held", "_loop", "_scheduled", "_t")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._t = transport
        self._loop = loop
        self._held: bytes | None = None
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        held = self._held
        if held is None:
            self._held = data
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._flush)
        else:
            self._held = None
            self._t.writelines((held, data))

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def send_all(self, parts: tuple[bytes, ...]) -> None:
        """Write what is held and `parts` now, in one writev."""
        held = self._held
        if held is not None:
            self._held = None
            self._t.writelines((held, *parts))
        else:
            self._t.writelines(parts)

    def _flush(self) -> None:
        self._scheduled = False
        held = self._held
        if held is not None:
            self._held = None
            if not self._t.is_closing():  # the peer may have gone since
                self._t.write(held)

    def close(self) -> None:
        self._flush()
        self._t.close()

    def write_eof(self) -> None:
        self._flush()
        self._t.write_eof()

    def abort(self) -> None:
        # what the app has sent is offered to the socket first: a client cut off mid-body
        # still gets every byte before the cut
        self._flush()
        self._t.abort()

    def is_closing(self) -> bool:  # asked once per response: no __getattr__ detour
        return self._t.is_closing()

    def get_write_buffer_size(self) -> int:
        size = self._t.get_write_buffer_size()
        return size + len(self._held) if self._held is not None else size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


class _Cycle:
    """One request and its response: uvicorn 0.54's `RequestResponseCycle`, made leaner for a
    proxy, with the `hestia.abort`, `hestia.gone` and `hestia.on_gone` extensions.

    What differs from uvicorn's: Date is sent only when the app sent none (a proxied response
    carries its upstream's); no uvicorn access log (Hestia has its own); the response head's
    header names and values are checked with one search each over all of them instead of two
    per header; `receive()` waits on a future made only when it has to wait (uvicorn makes an
    `asyncio.Event` per request, which a proxied GET never waits on), and returns only with
    body bytes, the end of the body (once), or the disconnect; `__slots__`.
    """

    __slots__ = (
        "_body_done",
        "_gone",
        "_on_gone",
        "_waiter",
        "body",
        "chunked_encoding",
        "default_headers",
        "disconnected",
        "expected_content_length",
        "flow",
        "keep_alive",
        "logger",
        "more_body",
        "on_response",
        "response_complete",
        "response_started",
        "scope",
        "transport",
        "waiting_for_100_continue",
    )

    def __init__(
        self,
        scope: Any,
        transport: Any,
        flow: Any,
        logger: Any,
        default_headers: list[tuple[bytes, bytes]],
        expect_100_continue: bool,
        keep_alive: bool,
        on_response: Callable[[], None],
    ) -> None:
        self.scope = scope
        self.transport = transport
        self.flow = flow
        self.logger = logger
        self.default_headers = default_headers
        self.on_response = on_response
        self.disconnected = False
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100_continue
        self.body: bytes | bytearray = b""
        self.more_body = True
        self._body_done = False  # the message with more_body False was handed out
        self.response_started = False
        self.response_complete = False
        self.chunked_encoding: bool | None = None
        self.expected_content_length = 0
        # receive()'s waiter, or a list of them when several tasks wait at once
        self._waiter: asyncio.Future[None] | list[asyncio.Future[None]] | None = None
        self._gone: asyncio.Future[None] | None = None
        self._on_gone: Callable[[], None] | None = None

    # ------------------------------------------------------------------ protocol side
    def wake(self) -> None:
        """Something `receive()` may be waiting for happened (body bytes, the end of the
        body, the disconnect, the end of the response)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if isinstance(waiter, list):  # several tasks waited in receive() at once
                for one in waiter:
                    if not one.done():
                        one.set_result(None)
            elif not waiter.done():
                waiter.set_result(None)

    def add_body(self, body: bytes) -> int:
        """Body bytes from the parser; returns how many are buffered now. One piece is kept
        as it came; more go into a bytearray (appending to bytes would copy all that is
        buffered for each piece: quadratic in a body sent in small pieces to an app that has
        not read yet, e.g. while a start is awaited)."""
        buffered = self.body
        if not buffered:
            self.body = buffered = body
        elif isinstance(buffered, bytearray):
            buffered += body
        else:
            self.body = buffered = bytearray(buffered)
            buffered += body
        self.wake()
        return len(buffered)

    def client_left(self) -> None:
        gone = self._gone
        if gone is not None and not gone.done():
            gone.set_result(None)
        on_gone = self._on_gone
        if on_gone is not None:
            self._on_gone = None
            on_gone()

    # ------------------------------------------------------------------ extensions
    def gone(self) -> asyncio.Future[None]:
        """`scope["extensions"]["hestia.gone"]()`: a future done when the client goes away.

        For a request waiting (for a start, a slot) before anything is read or sent: it can
        watch for its client leaving without taking its body from `receive()`. Made on first
        use only, so a request that never waits pays nothing."""
        if self._gone is None:
            self._gone = asyncio.get_running_loop().create_future()
            if self.disconnected:
                self._gone.set_result(None)
        return self._gone

    def on_gone(self, callback: Callable[[], None] | None) -> bool:
        """`scope["extensions"]["hestia.on_gone"](callback)`: call `callback` (once, from the
        event loop) when the client goes away before the response is complete; None takes it
        back. Returns False, calling nothing, when the client is gone already. Costs no
        future, timer or task: the data plane's disconnect watch."""
        if callback is not None and self.disconnected:
            return False
        self._on_gone = callback
        return True

    def abort(self) -> None:
        """`scope["extensions"]["hestia.abort"]()`: cut the client's connection now.

        For a response that cannot be finished (its upstream broke off mid-body): the client
        sees an incomplete response (a chunked body without its last chunk, or fewer bytes than
        Content-Length), and the app may return normally afterwards without an error logged
        about an unfinished response."""
        if self.response_complete or self.disconnected:
            return
        self.disconnected = True  # later sends are dropped; run_asgi logs nothing
        self.keep_alive = False
        self._on_gone = None
        self.wake()
        self.scope["extensions"].clear()
        self.transport.abort()

    # ------------------------------------------------------------------ ASGI
    async def run_asgi(self, app: ASGIApp) -> None:
        try:
            result = await app(self.scope, self.receive, self.send)  # type: ignore[func-returns-value]
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        else:
            if result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
                self.transport.close()
            elif not self.response_started and not self.disconnected:
                self.logger.error("ASGI callable returned without starting response.")
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                self.logger.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            self.on_response = _nothing
            self._on_gone = None

    async def send_500_response(self) -> None:
        await self.send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", b"21"),
                    (b"connection", b"close"),
                ],
            }
        )
        await self.send(
            {"type": "http.response.body", "body": b"Internal Server Error", "more_body": False}
        )

    def _head(self, status_code: int, headers: Any) -> bytes:
        """The response head for `http.response.start`; sets the framing and keep-alive.
        RuntimeError, with no response started, for a header that could split the response:
        the app then gets uvicorn's plain 500 instead."""
        content = [STATUS_LINE[status_code]]
        names = []
        values = []
        has_connection_close = False
        has_date = False
        for name, value in headers:
            names.append(name)
            values.append(value)
            name = name.lower()
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection":
                connection = [token.lower().strip() for token in value.split(b",")]
                if b"close" in connection:
                    self.keep_alive = False
                    has_connection_close = True
            elif name == b"date":
                has_date = True
            content += (name, b": ", value, b"\r\n")
        # one search over all the names and one over all the values: a name or a value that
        # could end its line early (response splitting) is refused all the same
        bad_name = HEADER_RE.search(b"".join(names))
        if bad_name or HEADER_VALUE_RE.search(b"".join(values)):
            self.chunked_encoding = None
            self.expected_content_length = 0
            raise RuntimeError(f"Invalid HTTP header {'name' if bad_name else 'value'}.")
        self.response_started = True
        self.waiting_for_100_continue = False
        for name, value in self.default_headers:
            if not has_date or name != b"date":
                content += (name, b": ", value, b"\r\n")

        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")

        if (
            self.chunked_encoding is None
            and self.scope["method"] != "HEAD"
            and status_code not in (204, 304)
        ):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")

        content.append(b"\r\n")
        return b"".join(content)

    def _body(self, body: bytes, more_body: bool) -> list[bytes]:
        """What goes on the wire for a body message (checked against Content-Length)."""
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            return []
        if self.chunked_encoding:
            chunk = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
            if not more_body:
                chunk.append(b"0\r\n\r\n")
            return chunk
        num_bytes = len(body)
        if num_bytes > self.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        self.expected_content_length -= num_bytes
        return [body]

    def _complete(self) -> None:
        if self.expected_content_length != 0:
            raise RuntimeError("Response content shorter than Content-Length")
        self.response_complete = True
        self._on_gone = None
        self.wake()
        self.scope["extensions"].clear()  # no abort now; and no reference cycle
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    def respond(self, status: int, headers: Any, body: bytes) -> bool:
        """`scope["extensions"]["hestia.respond"](status, headers, body)`: a whole response
        at once, as `http.response.start` and one last `http.response.body` would send it,
        head and body in one write; for a proxied response whose body is all in already.
        False, with nothing sent, when it cannot be sent that way now (a response has
        started, or the client reads too slowly): send the messages then."""
        if self.response_started or self.flow.write_paused:
            return False
        if self.disconnected:
            return True
        head = self._head(status, headers)
        self.transport.send_all((head, *self._body(body, False)))
        self._complete()
        return True

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()

        if self.disconnected:
            return

        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{message['type']}'."
                )
            self.transport.write(self._head(message["status"], message.get("headers", ())))

        elif not self.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.body', but got '{message['type']}'."
                )
            more_body = message.get("more_body", False)
            # (one piece is written as it is: b"".join of one bytes object is that object)
            self.transport.write(b"".join(self._body(message.get("body", b""), more_body)))
            if not more_body:
                self._complete()

        else:
            raise RuntimeError(
                f"Unexpected ASGI message '{message['type']}' sent, after response already "
                "completed."
            )

    async def receive(self) -> Any:
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.waiting_for_100_continue = False

        if not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            # after the body's end was handed out, receive() waits for the disconnect (or
            # the end of the response), as uvicorn's does: a loop that listens for the
            # disconnect (Starlette's) must not get the end of the body over and over
            while self._body_done or (not self.body and self.more_body):
                waiter = asyncio.get_running_loop().create_future()
                pending = self._waiter
                if pending is None:
                    self._waiter = waiter
                elif isinstance(pending, list):
                    pending.append(waiter)
                else:
                    self._waiter = [pending, waiter]
                await waiter
                if self.disconnected or self.response_complete:
                    break

        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        body = self.body
        self.body = b""
        if isinstance(body, bytearray):
            body = bytes(body)
        more_body = self.more_body
        if not more_body:
            self._body_done = True
        return {"type": "http.request", "body": body, "more_body": more_body}


def _nothing() -> None:
    pass


class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a _CoalescingTransport, with the guards described in the
    module docstring. `build_server` makes a subclass per server that sets `server_guard`."""

    server_guard: ConnectionGuard
    server_busy_poll: BusyPoll | None = None
    cycle: _Cycle  # type: ignore[assignment]
    pipeline: deque[tuple[_Cycle, ASGIApp]]  # type: ignore[assignment]

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._real_transport = transport
        wrapped: Any = _CoalescingTransport(transport, self.loop)
        super().connection_made(wrapped)
        # copied to the instance: attribute reads on the hot path stay in the instance's dict
        self.guard = guard = self.server_guard
        self._busy = self.server_busy_poll
        self._scan_from = guard.scan_from  # the smallest head limit: below it, no line walk
        self._max_headers = guard.limits.max_headers
        self._max_unbody = guard.limits.max_header_bytes  # non-body bytes between body bytes
        self._phase = _NEW
        self._stamp = guard.now
        self._head = HeadCounter(guard.limits)
        self._head_unscanned = False  # the head began mid-read, behind a pipelined request
        self._hosts = 0  # Host field lines in the current head
        self._unbody = 0  # bytes read in the body phase since the last body byte
        client = self.client[0] if self.client else ""
        refusal = guard.admit(client)
        if refusal is not None:
            self._slot: str | None = None
            self._phase = _DONE
            self._write_error(refusal)
            wrapped.close()
            return
        self._slot = client
        guard.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # uvicorn's, for our _Cycle (its keep-alive timer is never armed here)
        self.connections.discard(self)
        cycle = self.cycle
        if cycle is not None:
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.wake()
        if self.flow is not None:
            self.flow.resume_writing()
        if exc is None:
            self.transport.close()
        self.parser = None  # type: ignore[assignment]
        if cycle is not None:
            cycle.client_left()
        self._phase = _DONE
        slot = self._slot
        if slot is not None:
            self._slot = None
            self.guard.conns.discard(self)
            self.guard.release(slot)

    def handle_websocket_upgrade(self) -> None:
        self.transport._flush()  # type: ignore[attr-defined]
        self.transport = self._real_transport
        self._phase = _DONE
        self.guard.conns.discard(self)
        super().handle_websocket_upgrade()
        # the WebSocket protocol now owns the connection and gives its slot back when it ends
        ws = self._real_transport.get_protocol()
        ws._hestia_slot = self._slot  # type: ignore[attr-defined]
        self._slot = None

    # ------------------------------------------------------------------ input
    def data_received(self, data: bytes) -> None:
        phase = self._phase
        scanned = False
        if phase <= _HEAD:
            if phase != _HEAD:
                if phase == _IDLE:  # keep-alive: the head's clock starts at its first byte
                    self._stamp = self.guard.now
                self._phase = _HEAD
                busy = self._busy
                if busy is not None:  # a request: its upstream may answer within the window
                    busy.note()
            head = self._head
            seen = head.seen + len(data)
            if seen > self._scan_from:
                refusal = head.scan(data)
                if refusal is not None:
                    self._refuse(refusal)
                    return
                scanned = True
            else:
                head.seen = seen
        elif phase == _BODY:
            self._stamp = self.guard.now
            self._unbody += len(data)
        else:  # _DONE: a refused connection's rest, read only so that it can read the answer
            return

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if self._phase != _DONE:  # else a callback refused the request and stopped it
                self._refuse(invalid_request(exc))
            return

        if phase <= _HEAD:
            if not scanned and self._phase == _HEAD and not self._head_unscanned:
                self._head.note_partial(data)  # the head goes on in the next read
        elif self._unbody > self._max_unbody and self._phase == _BODY:
            # only a trailer section (or absurd chunk extensions) can be this long without a
            # body byte; the parser would hold all of it
            self._refuse(trailers_too_large(self.guard.limits))

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        if self._phase != _HEAD:  # a pipelined head, in the read that ended the last request
            self._phase = _HEAD
            self._stamp = self.guard.now
            self._head_unscanned = True
        self._hosts = 0
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }

    def on_header(self, name: bytes, value: bytes) -> None:
        # once the head is complete, self.headers is _TRAILERS: a trailer field of a chunked
        # body never becomes one of the request's headers
        name = name.lower()
        if name == b"host":
            self._hosts += 1
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        http_version = parser.get_http_version()
        method = parser.get_method()
        url = self.url
        if (
            self._hosts != 1
            or url[0] != 47  # not "/...": absolute form (or "*")
            or method == b"CONNECT"
            or len(self.headers) > self._max_headers
            or self._head_unscanned
        ):
            refusal = self._check_head(http_version, method, url)
            if refusal is not None:
                self._refuse(refusal)
                raise _Refused  # stops the parser: nothing of this request goes further

        self._phase = _BODY
        self._stamp = self.guard.now
        self._unbody = 0
        head = self._head
        head.seen = head.line_len = head.line_no = 0

        self.scope["method"] = method.decode("ascii")
        if http_version != "1.1":
            self.scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        self.headers = _TRAILERS
        if url[0] == 47 and b"#" not in url:  # origin form: "/path?query", split here
            raw_path, _, query = url.partition(b"?")
        else:
            parsed_url = httptools.parse_url(url)
            raw_path = parsed_url.path
            query = parsed_url.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        scope = self.scope
        root = self.root_path
        if root:
            scope["path"] = root + path
            scope["raw_path"] = root.encode("ascii") + raw_path
        else:
            scope["path"] = path
            scope["raw_path"] = raw_path
        scope["query_string"] = query

        existing_cycle = self.cycle
        cycle = _Cycle(
            self.scope,
            self.transport,
            self.flow,
            self.logger,
            self.server_state.default_headers,
            self.expect_100_continue,
            http_version != "1.0" and parser.should_keep_alive(),
            self.on_response_complete,
        )
        self.cycle = cycle
        # scope -> abort -> cycle -> scope is a reference cycle: _Cycle breaks it at the end
        extensions: Any = {
            "hestia.abort": cycle.abort,
            "hestia.gone": cycle.gone,
            "hestia.on_gone": cycle.on_gone,
            "hestia.respond": cycle.respond,
        }
        self.scope["extensions"] = extensions
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(cycle, self.app)  # type: ignore[arg-type]
        else:
            # Pipelined HTTP requests need to be queued up.
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, self.app))

    def on_body(self, body: bytes) -> None:
        self._unbody = 0
        if (
            self.parser.should_upgrade() and self._should_upgrade()
        ) or self.cycle.response_complete:
            return
        if self.cycle.add_body(body) > 65536:  # uvicorn's HIGH_WATER_LIMIT
            self.flow.pause_reading()

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        if (
            self.parser.should_upgrade() and self._should_upgrade()
        ) or self.cycle.response_complete:
            return
        self.cycle.more_body = False
        self.cycle.wake()

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        busy = self._busy
        if busy is not None:  # the client's next request may come within the window
            busy.note()
        if self._phase == _IDLE:  # the keep-alive clock starts when the answer is out
            self._stamp = self.guard.now
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ checks
    def _check_head(self, http_version: str, method: bytes, url: bytes) -> Refusal | None:
        lim = self.guard.limits
        if self._head_unscanned:
            self._head_unscanned = False
            refusal = check_parsed_head(lim, url, self.headers)
            if refusal is not None:
                return refusal
        if len(self.headers) > lim.max_headers:
            return too_many_headers(lim)
        return check_request(http_version, method, url, self.headers, self._hosts)

    # ------------------------------------------------------------------ timeouts
    def check_timeouts(self, now: float) -> None:
        """Called by the guard's sweep: act on a deadline that has passed."""
        phase = self._phase
        t = self.guard.timeouts
        if phase == _BODY:
            cycle = self.cycle
            if self.flow.read_paused or cycle is None or cycle.waiting_for_100_continue:
                # Hestia is not reading (the app has not taken what it has yet) or the client
                # waits for 100-continue: the client is not late
                self._stamp = now
            elif now - self._stamp > t.body:
                self._refuse(body_timeout(t))
        elif phase == _IDLE:
            if not self._answering() and now - self._stamp > t.keep_alive:
                self._phase = _DONE
                self.transport.close()
        elif phase == _HEAD:
            if not self._answering() and now - self._stamp > t.header:
                self._refuse(head_timeout(t))
        elif phase == _NEW:
            if now - self._stamp > t.header:  # not a byte: nothing to answer
                self._phase = _DONE
                self.transport.close()
        elif not self._answering() and now - self._stamp > LINGER_S:
            self.transport.close()

    def _answering(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete and not cycle.disconnected

    # ------------------------------------------------------------------ refusals
    def _refuse(self, refusal: Refusal) -> None:
        """Answer Hestia's JSON error when the client can still get one, and end the connection.

        A refusal in the body phase takes the request from the app (it sees http.disconnect,
        what it sends is dropped). A refusal of a new head while an earlier request is still
        being answered (pipelining) lets that answer finish and closes the connection after it.
        """
        phase = self._phase
        self._phase = _DONE
        self._stamp = self.guard.now
        client = self.client[0] if self.client else "?"
        self.guard.warn(refusal.kind, f"answered {refusal.status} to {client}: {refusal.message}")
        cycle = self.cycle
        if phase == _BODY and cycle is not None:  # about the request the app has
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.waiting_for_100_continue = False
                cycle.wake()
            if cycle.response_started:  # this request has (part of) an answer: no second one
                self.transport.close()
                return
        elif self._answering():  # about a pipelined head, while an earlier request is answered
            cycle.keep_alive = False
            return
        self._write_error(refusal)
        self.transport.write_eof()
        self.flow.resume_reading()

    def _write_error(self, refusal: Refusal) -> None:
        body = error_body(refusal.status, refusal.code, refusal.message)
        head = [
            STATUS_LINE[refusal.status],
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
            % len(body),
        ]
        for name, value in self.server_state.default_headers:
            head += (name, b": ", value, b"\r\n")
        head += (b"\r\n", body)
        self.transport.write(b"".join(head))


def _websocket_protocol(guard: ConnectionGuard) -> Any:
    """uvicorn's WebSocket protocol, giving the connection's slot back when it ends."""
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    if AutoWebSocketsProtocol is None:
        return "none"
    base: Any = AutoWebSocketsProtocol

    class WebSocketProtocol(base):  # type: ignore[misc]
        _hestia_slot: str | None = None

        def connection_lost(self, exc: Exception | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                slot = self._hestia_slot
                if slot is not None:
                    self._hestia_slot = None
                    guard.release(slot)

    return WebSocketProtocol


def build_server(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    shutdown_grace: float = 30.0,
    on_exit: Callable[[], None] | None = None,
    limits: ServerLimits | None = None,
    timeouts: ServerTimeouts | None = None,
    busy_poll: str | float = "auto",
) -> HestiaServer:
    """The server `hestia serve` runs; `limits`, `timeouts` and `busy_poll` are
    `server.limits`, `server.timeouts` and `server.busy_poll` of the config (their defaults
    when not given)."""
    limits = limits or ServerLimits()
    timeouts = timeouts or ServerTimeouts()
    guard = ConnectionGuard(limits, timeouts)
    window = busy_poll_seconds(busy_poll)
    poller = BusyPoll(window) if window > 0 else None

    class HttpProtocol(_HttpProtocol):
        server_guard = guard
        server_busy_poll = poller

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=HttpProtocol,
        ws=_websocket_protocol(guard),
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=int(shutdown_grace) or None,
        timeout_keep_alive=max(1, int(timeouts.keep_alive)),  # unused: the guard's sweep closes
    )
    return HestiaServer(config, on_exit, guard, poller)
