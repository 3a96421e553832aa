"""The data plane: what the router routed to a service (by `/services/{name}/{path}` or by
one of its host names) proxied to it, pure ASGI.

HTTP goes through the lean pooled HTTP/1.1 client in `hestia.upstream`; bodies stream both
ways without buffering; a client that goes away closes the upstream connection (that is what
stops a model from generating for nobody). WebSockets are relayed by `hestia.websocket`;
what changes in headers on the way is in `hestia.headers`.
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from json.encoder import encode_basestring_ascii
from typing import Any

from loguru import logger

from hestia import waiting
from hestia.address import Upstream
from hestia.errors import (
    ClientGone,
    HestiaError,
    NotWoken,
    ServiceNotFound,
    UpstreamBadAnswer,
    UpstreamTimeout,
    UpstreamUnreachable,
    send_error,
)
from hestia.headers import TrustedProxies, downstream_response_headers, upstream_request_headers
from hestia.lifecycle import Service, State
from hestia.metrics import UNKNOWN_SERVICE, Metrics
from hestia.router import Route
from hestia.types import ASGIApp, Receive, Scope, Send
from hestia.upstream import (
    UpstreamBadResponse,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeoutError,
)
from hestia.websocket import relay_websocket

# Access lines are written at most this long after the request ended, or once this many are
# waiting: one write() per 10 ms instead of one per request (nginx's `access_log ... buffer=
# flush=` does the same); a SIGKILL loses the last 10 ms of lines, a normal exit none.
_ACCESS_FLUSH_S = 0.01
_ACCESS_FLUSH_LINES = 256
_FIELDS = 12  # values kept per access line (JsonAccessLog.access)
# str -> its JSON string literal, quotes included, non-ASCII as \\uXXXX (as json.dumps)
_escape: Callable[[str], str] = encode_basestring_ascii

# A client disconnect is watched for only in requests that last longer than this: a fast
# request then costs no extra task.
_DISCONNECT_WATCH_AFTER_S = 0.05


class JsonAccessLog:
    """Access lines as JSON on stdout, written in batches (every 10 ms or 256 lines).

    Each line is the one `hestia.logs`' JSON sink makes of the loguru call in
    `Proxy._finish` (`ts`, `level`, `msg`, `logger`, then the fields in a fixed order), built
    by one format string instead of a dict and a general JSON encoder: the only values that
    can need escaping are strings (escaped by the json module's C escaper, ASCII-only output
    as `json.dumps` gives), durations are written with three decimals (`2.023`, `0.000`:
    what `round(x, 3)` and `repr` gave, at a quarter of their cost), and the timestamp's
    date, time and zone are formatted once a second. A request only leaves its values; the
    lines are built together when the batch is written (about 2 µs a line), and their share
    of the batched write() is next to nothing (bench/NOTES.md). `hestia
    serve` installs it when the logs are JSON at level INFO or below, and flushes it at exit;
    otherwise, and for access lines that carry an error, the access line goes through
    loguru like every other line. (So a loguru line can come out up to 10 ms before an access
    line that was made before it; each line carries its own `ts`.)
    """

    __slots__ = ("_lines", "_max_write", "_scheduled", "_second", "_stamp", "_zone")

    def __init__(self, max_write: int = 0) -> None:
        """`max_write`: write at most this many bytes at once, cut at line ends (several
        processes writing to one pipe: writes up to PIPE_BUF are never interleaved)."""
        self._max_write = max_write
        # what access() was given, _FIELDS values a line, until the batch is written (_build)
        self._lines: list[Any] = []
        self._scheduled = False
        self._second = -1
        self._stamp = ""
        self._zone = ""

    def access(
        self,
        request_id: str,
        service: str,
        method: str,
        path: str,
        status: int,
        duration_ms: float,
        bytes_in: int,
        bytes_out: int,
        waited_ms: float,
        cold_start: bool,
        client: str | None,
    ) -> None:
        # Only the values are kept here; the lines are built together when the batch is
        # written: the same work, done in one tight loop (its code and data stay in the CPU's
        # caches), measured at about half of what building each line in its request cost.
        # The values go into one flat list: a tuple per request would be one more object
        # for the garbage collector to count and walk until the batch is out, and that cost
        # more than the building saved.
        self._lines.extend(
            (
                time.time(),
                request_id,
                service,
                method,
                path,
                status,
                duration_ms,
                bytes_in,
                bytes_out,
                waited_ms,
                cold_start,
                client,
            )
        )
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True
            loop.call_later(_ACCESS_FLUSH_S, self.flush)
        elif len(self._lines) >= _ACCESS_FLUSH_LINES * _FIELDS:
            self._write_out()  # the timer stays set and writes what comes after

    def _build(self) -> list[str]:
        """The waiting records as lines (and none waiting any more)."""
        values = self._lines
        self._lines = []
        out = []
        records: Any = zip(*[iter(values)] * _FIELDS, strict=True)
        for (
            now,
            request_id,
            service,
            method,
            path,
            status,
            duration_ms,
            bytes_in,
            bytes_out,
            waited_ms,
            cold_start,
            client,
        ) in records:
            second = int(now)
            if second != self._second:
                self._tick(second)
            micros = int((now - second) * 1_000_000)
            if micros > 999_999:  # float rounding at the very end of a second
                micros = 999_999
            e_method = _escape(method)
            e_path = _escape(path)
            # (the numbers are ints and floats by their types: no int() around them)
            out.append(
                f'{{"ts": "{self._stamp}.{micros:06d}{self._zone}", "level": "info", '
                # escaping works character by character: msg is made of the escaped parts
                f'"msg": {e_method[:-1]} {e_path[1:-1]} -> {status}", '
                f'"logger": "hestia.proxy", "event": "access", '
                f'"request_id": {_escape(request_id)}, "service": {_escape(service)}, '
                f'"method": {e_method}, "path": {e_path}, "status": {status}, '
                f'"duration_ms": {duration_ms:.3f}, "bytes_in": {bytes_in}, '
                f'"bytes_out": {bytes_out}, '
                f'"waited_ms": {format(waited_ms, ".3f") if waited_ms else "0.000"}, '
                f'"cold_start": {"true" if cold_start else "false"}, '
                f'"client": {"null" if client is None else _escape(client)}}}\n'
            )
        return out

    def _tick(self, second: int) -> None:
        """The timestamp's fixed part for this second, in local time as loguru writes it."""
        local = datetime.fromtimestamp(second).astimezone()
        self._second = second
        self._stamp = local.strftime("%Y-%m-%dT%H:%M:%S")
        self._zone = local.isoformat()[19:]  # "+00:00" (or "+05:30:15" for odd zones)

    def flush(self) -> None:
        self._scheduled = False
        self._write_out()

    def _write_out(self) -> None:
        if not self._lines:
            return
        lines = self._build()
        if self._max_write:
            self._write_bounded(lines)
            return
        sys.stdout.write("".join(lines))
        sys.stdout.flush()

    def _write_bounded(self, lines: list[str]) -> None:
        piece: list[str] = []
        size = 0
        for line in lines:
            if piece and size + len(line) > self._max_write:
                sys.stdout.write("".join(piece))
                sys.stdout.flush()
                piece.clear()
                size = 0
            piece.append(line)
            size += len(line)
        sys.stdout.write("".join(piece))
        sys.stdout.flush()


class Proxy:
    def __init__(
        self,
        lookup: Callable[[str], Service],
        pool: UpstreamPool,
        metrics: Metrics | None = None,
        access_log: bool = True,
        trusted_proxies: TrustedProxies | None = None,
    ) -> None:
        self._lookup = lookup
        self._pool = pool
        self._metrics = metrics or Metrics()
        self._access_log = access_log
        self._trusted = trusted_proxies or TrustedProxies()
        # set by `hestia serve` when the logs are JSON lines on stdout (see JsonAccessLog)
        self.access_writer: JsonAccessLog | None = None
        # set in a data-plane worker (hestia/worker.py): a request whose instance may have
        # gone under it (the retry case below) is handed to the controller as it came, which
        # retries after a restart as the single process does, and counts and logs it
        self.hand_off: ASGIApp | None = None

    async def handle(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        if scope["type"] == "websocket":
            await relay_websocket(scope, receive, send, self._lookup, route, self._trusted)
            return
        t0 = time.perf_counter()
        ex = _Exchange(_request_id(scope["headers"]))
        name = route.service
        metrics_name = UNKNOWN_SERVICE  # only known services get a metrics series of their own
        waited = 0.0
        cold = False
        retried = False
        touch = True
        try:
            if not name:
                raise ServiceNotFound("no service name in the path: use /services/NAME/...")
            service = self._lookup(name)
            metrics_name = name
            wake = service.wake
            if wake is not None and wake.ignores(route.path, scope):
                touch = wake.touch
                if service.state is not State.READY:
                    service.note_refusal("not_woken")
                    raise NotWoken(
                        f"service {name!r} is {service.state.value} and this request does not "
                        "wake it (wake.ignore_paths / wake.ignore_user_agents)",
                        service=name,
                        retry_after=60,
                    )
            upstream = service.acquire_now()
            if upstream is None:  # it must wait (for a start, a stop, a slot)
                cold = service.state is not State.READY
                if await self._answered_while_not_ready(scope, send, service, ex):
                    self._finish(scope, name, ex, t0, waited, cold, None)
                    return
                upstream = await self._acquire_watching(scope, service)
                waited = time.perf_counter() - t0
                self._metrics.service(name).record_wait(waited)
        except HestiaError as err:
            await self._refuse(scope, send, ex, err, metrics_name, t0, waited, cold)
            return
        held = True
        handed_off = False
        try:
            while True:
                outcome = await self._forward(scope, receive, send, service, route, upstream, ex)
                if outcome is not _RETRY or retried:
                    break
                if self.hand_off is not None:  # nothing was read or sent yet
                    service.release(False)
                    held = False
                    handed_off = True
                    await self.hand_off(scope, receive, send)
                    return
                # the instance died under us before answering: wait for it like a cold start
                retried = True
                service.release()
                held = False
                try:
                    upstream = await service.acquire()
                except HestiaError as err:
                    ex.status = err.status
                    ex.error = err.message
                    self._metrics.service(name).errors += 1
                    await send_error(send, err, [(b"x-request-id", ex.request_id)])
                    break
                held = True
        finally:
            if held:
                service.release(touch)
            if not handed_off:
                self._metrics.service(name).record(ex.status, ex.bytes_in, ex.bytes_out)
                self._finish(scope, name, ex, t0, waited, cold, ex.error)

    async def _answered_while_not_ready(
        self, scope: Scope, send: Send, service: Service, ex: _Exchange
    ) -> bool:
        """The waiting page's state probe, and the waiting page itself, are answered here
        (True); everything else is held (False)."""
        if waiting.is_probe(scope):
            body = waiting.probe_answer(service.status())
            ex.status = 200
            await _answer(send, 200, b"application/json", body, ex, [(b"x-hestia-wait", b"1")])
            return True
        if service.state is not State.READY and waiting.wants_page(scope, service.config.strategy):
            service.ensure_started("request")
            body = waiting.page(service.name, service.state.value)
            ex.status = 503
            extra = [(b"retry-after", str(waiting.RETRY_AFTER_S).encode())]
            await _answer(send, 503, b"text/html; charset=utf-8", body, ex, extra)
            return True
        return False

    async def _acquire_watching(self, scope: Scope, service: Service) -> Upstream:
        """acquire() for a request that may wait: a client that goes away meanwhile leaves
        the line at once (and, if it was the last one waiting, may cancel the start)."""
        gone_factory = scope.get("extensions", {}).get("hestia.gone")
        if gone_factory is None:
            return await service.acquire()
        gone: asyncio.Future[None] = gone_factory()
        acquiring = asyncio.ensure_future(service.acquire())
        await asyncio.wait((acquiring, gone), return_when=asyncio.FIRST_COMPLETED)
        if acquiring.done():
            return acquiring.result()
        acquiring.cancel()
        try:
            upstream = await acquiring
        except (asyncio.CancelledError, HestiaError):
            pass
        else:
            service.release(False)  # handed a slot as the client left: give it back
            del upstream
        service.note_refusal("client_gone")
        raise ClientGone(
            f"the client left while waiting for service {service.name!r}", service=service.name
        )

    async def _refuse(
        self,
        scope: Scope,
        send: Send,
        ex: _Exchange,
        err: HestiaError,
        metrics_name: str,
        t0: float,
        waited: float,
        cold: bool,
    ) -> None:
        ex.status = err.status
        m = self._metrics.service(metrics_name)
        m.record(err.status, 0, 0)
        if err.service is not None and metrics_name != UNKNOWN_SERVICE:
            m.errors += 1  # a known service failed to start, timed out, was busy: count it
        if not isinstance(err, ClientGone):  # nobody is there to answer
            await send_error(send, err, [(b"x-request-id", ex.request_id)])
        self._finish(scope, metrics_name, ex, t0, waited, cold, err.message)

    def _finish(
        self,
        scope: Scope,
        name: str,
        ex: _Exchange,
        t0: float,
        waited: float,
        cold: bool,
        error: str | None,
    ) -> None:
        if not self._access_log and error is None:
            return
        client = scope.get("client")
        duration_ms = (time.perf_counter() - t0) * 1000
        writer = self.access_writer
        if error is None and writer is not None:
            writer.access(
                ex.request_id.decode("latin-1"),
                name,
                scope["method"],
                scope["path"],
                ex.status,
                duration_ms,
                ex.bytes_in,
                ex.bytes_out,
                waited * 1000,
                cold,
                client[0] if client else None,
            )
            return
        fields = {
            "event": "access",
            "request_id": ex.request_id.decode("latin-1"),
            "service": name,
            "method": scope["method"],
            "path": scope["path"],
            "status": ex.status,
            "duration_ms": round(duration_ms, 3),
            "bytes_in": ex.bytes_in,
            "bytes_out": ex.bytes_out,
            "waited_ms": round(waited * 1000, 3),
            "cold_start": cold,
            "client": client[0] if client else None,
        }
        if error is not None:
            fields["error"] = error
            logger.bind(**fields).warning(
                "{} {} -> {}: {}", scope["method"], scope["path"], ex.status, error
            )
        else:
            logger.bind(**fields).info("{} {} -> {}", scope["method"], scope["path"], ex.status)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        service: Service,
        route: Route,
        upstream: Upstream,
        ex: _Exchange,
    ) -> object:
        name = service.name
        query: bytes = scope.get("query_string", b"")
        target = upstream.base_path + route.path
        if query:
            target += b"?" + query
        client = scope.get("client")
        client_ip = client[0] if client else None
        method: str = scope["method"]
        try:
            headers, has_body = upstream_request_headers(
                scope["headers"],
                upstream,
                client_ip=client_ip,
                scheme=scope.get("scheme", "http"),
                prefix=route.prefix,
                trusted=bool(self._trusted) and self._trusted.trusts(client_ip),
                stripped=route.stripped,
                preserve_host=service.config.preserve_host,
            )
        except HestiaError as bad:
            bad.service = name
            ex.status = bad.status
            ex.error = bad.message
            await send_error(send, bad, [(b"x-request-id", ex.request_id)])
            return None
        headers.append((b"x-request-id", ex.request_id))
        task = asyncio.current_task()
        assert task is not None
        extensions = scope.get("extensions") or _NO_EXTENSIONS
        respond = extensions.get("hestia.respond")
        watch = _DisconnectWatch(receive, task, ex, has_body, extensions.get("hestia.on_gone"))
        try:
            body = watch.request_body() if has_body else None
            try:
                resp = await self._pool.request(
                    upstream.host,
                    upstream.port,
                    method.encode(),
                    target,
                    headers,
                    body,
                    timeouts=service.timeouts,
                )
            except UpstreamError as exc:
                if watch.disconnected:
                    ex.status = 499
                    return None
                if (
                    not isinstance(exc, UpstreamTimeoutError)
                    and not has_body
                    and method in _IDEMPOTENT
                    and await service.instance_gone(upstream)
                ):
                    watch.stop()
                    return _RETRY
                err: HestiaError
                if isinstance(exc, UpstreamTimeoutError):
                    err = UpstreamTimeout(
                        f"service {name!r} at {upstream.display} did not answer in time: "
                        f"{exc.reason}",
                        service=name,
                    )
                elif isinstance(exc, UpstreamBadResponse):
                    err = UpstreamBadAnswer(
                        f"service {name!r} at {upstream.display} answered with something "
                        f"Hestia cannot pass on: {exc.reason}",
                        service=name,
                    )
                else:
                    err = UpstreamUnreachable(
                        f"service {name!r} at {upstream.display} did not answer: {exc.reason}",
                        service=name,
                    )
                ex.status = err.status
                ex.error = err.message
                self._metrics.service(name).upstream_errors += 1
                self._metrics.service(name).errors += 1
                watch.stop()
                await send_error(send, err, [(b"x-request-id", ex.request_id)])
                return None
            try:
                resp_headers = downstream_response_headers(resp.headers, upstream, route)
                resp_headers.append((b"x-request-id", ex.request_id))
                ex.status = resp.status
                # the whole body is often in already (it came with the head): then the response
                # goes out in one call and one write, with no message dicts (hestia.respond)
                whole = None
                if respond is not None:
                    whole = resp.body_if_complete()
                    if whole is not None:
                        ex.bytes_out += len(whole)
                        watch.stop()
                        if respond(resp.status, resp_headers, whole):
                            return None
                await send(
                    {"type": "http.response.start", "status": resp.status, "headers": resp_headers}
                )
                last = b""
                if whole is not None:  # taken, but the client reads slowly: sent as messages
                    last = whole
                elif resp.has_body():
                    async for chunk in resp.read_chunks():
                        ex.bytes_out += len(chunk)
                        if resp.complete:  # the end of the body: sent with the last message
                            last = chunk
                            break
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                watch.stop()
                await send({"type": "http.response.body", "body": last, "more_body": False})
            except UpstreamError as exc:
                # the response has started: the only honest signal left is to cut the stream
                ex.error = f"upstream broke off mid-response: {exc.reason}"
                self._metrics.service(name).upstream_errors += 1
                abort = scope.get("extensions", {}).get("hestia.abort")
                if abort is None:
                    raise
                abort()
            finally:
                await resp.aclose()
        except asyncio.CancelledError:
            if watch.disconnected and task.uncancel() == 0:
                ex.status = 499  # nginx's word for "client closed the request"
                return None  # the upstream connection is closed by now
            raise
        finally:
            watch.stop()
        return None


async def _answer(
    send: Send,
    status: int,
    ctype: bytes,
    body: bytes,
    ex: _Exchange,
    extra: list[tuple[bytes, bytes]],
) -> None:
    headers = [
        (b"content-type", ctype),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-request-id", ex.request_id),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_RETRY = object()
_NO_EXTENSIONS: dict[str, Any] = {}
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})


class _Exchange:
    """What one proxied request did, for the access log and the metrics."""

    __slots__ = ("bytes_in", "bytes_out", "error", "request_id", "status")

    def __init__(self, request_id: bytes) -> None:
        self.request_id = request_id
        self.error: str | None = None
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0


_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# Request ids need to be unique, not secret: a generator of our own, seeded from os.urandom.
_random_bits = random.Random().getrandbits


def _request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The client's X-Request-ID when it is sane, else a new one."""
    for key, value in headers:
        if key == b"x-request-id" and _SANE_REQUEST_ID.fullmatch(value):
            return value
    return b"%016x" % _random_bits(64)  # no getrandom() system call per request


class _DisconnectWatch:
    """Notices a client going away during a request and cancels the handler task.

    Under Hestia's server the `hestia.on_gone` extension calls it back when the connection is
    lost: no timer, future or task per request. Elsewhere (another ASGI server) a watcher task
    that reads `receive()` is started once the request has lasted _DISCONNECT_WATCH_AFTER_S
    and its body has been read. While the request body is still being read, the body's own
    `receive()` sees the disconnect instead.
    """

    __slots__ = (
        "_body_pending",
        "_ex",
        "_gone_early",
        "_handle",
        "_on_gone",
        "_receive",
        "_task",
        "_watcher",
        "disconnected",
    )

    def __init__(
        self,
        receive: Receive,
        task: asyncio.Task[Any],
        ex: _Exchange,
        body_pending: bool,
        on_gone: Callable[[Callable[[], None] | None], bool] | None = None,
    ) -> None:
        self._receive = receive
        self._ex = ex
        self._task = task
        self._body_pending = body_pending
        self._watcher: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._gone_early = False
        self.disconnected = False
        self._on_gone = on_gone
        if on_gone is not None:
            if not on_gone(self._client_gone):
                self._client_gone()  # gone already
            return
        self._handle = asyncio.get_running_loop().call_later(_DISCONNECT_WATCH_AFTER_S, self._arm)

    def _client_gone(self) -> None:
        if self._body_pending:
            self._gone_early = True  # the body's receive() says so; if not, its end does
            return
        self.disconnected = True
        self._task.cancel()

    def _arm(self) -> None:
        self._handle = None
        if self._body_pending:
            self._handle = asyncio.get_running_loop().call_later(
                _DISCONNECT_WATCH_AFTER_S, self._arm
            )
            return
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                self.disconnected = True
                self._task.cancel()
                return

    async def request_body(self) -> AsyncIterator[bytes]:
        try:
            while True:
                msg = await self._receive()
                if msg["type"] == "http.disconnect":
                    self.disconnected = True
                    raise asyncio.CancelledError
                body = msg.get("body", b"")
                if body:
                    self._ex.bytes_in += len(body)
                    yield body
                if not msg.get("more_body", False):
                    return
        finally:
            self._body_pending = False
            if self._gone_early and not self.disconnected:
                # the client left while its body was read, yet the body ended cleanly
                self.disconnected = True
                self._task.cancel()

    def stop(self) -> None:
        on_gone = self._on_gone
        if on_gone is not None:
            self._on_gone = None
            on_gone(None)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
