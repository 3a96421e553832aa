"""Tests for hestia.upstream against real raw-HTTP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from hestia.upstream import (
    _READ_HIGH_WATER,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeoutError,
)

DEADLINE = 10.0
HOST = "127.0.0.1"

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Handler = Callable[[Reader, Writer, int], Awaitable[None]]


class RawServer:
    """asyncio.start_server speaking whatever raw bytes the test's handler writes."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._on_conn, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            await self._handler(reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        # Aborting our side wakes every handler blocked on a read or a drain
        # (also when the client stopped reading); cancel what is still stuck.
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=DEADLINE)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.wait_for(self._server.wait_closed(), DEADLINE)


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Read one request head: (request line, lower-cased headers, raw bytes)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw[:-4].split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, value = line.split(b":", 1)
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, raw


async def wait_eof(reader: asyncio.StreamReader) -> None:
    """Return once the peer closed (EOF or reset); ignore any bytes before that."""
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass


def response(body: bytes, *extra: bytes, status: bytes = b"200 OK") -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\ncontent-length: %d\r\n" % len(body)
    return head + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + body


async def read_body(resp: UpstreamResponse) -> bytes:
    async def collect() -> bytes:
        return b"".join([chunk async for chunk in resp.read_chunks()])

    try:
        return await asyncio.wait_for(collect(), DEADLINE)
    finally:
        await resp.aclose()


async def get(
    pool: UpstreamPool, port: int, target: bytes = b"/", method: bytes = b"GET"
) -> UpstreamResponse:
    headers = [(b"host", b"%s:%d" % (HOST.encode(), port))]
    return await asyncio.wait_for(pool.request(HOST, port, method, target, headers), DEADLINE)


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool()
    yield p
    await p.aclose()


# ---------------------------------------------------------------- body framing


async def test_content_length_body_and_request_bytes(pool: UpstreamPool) -> None:
    seen: list[bytes] = []

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        _line, _headers, raw = await read_head(reader)
        seen.append(raw)
        writer.write(
            response(b"hello world", b"X-Thing: A", b"Set-Cookie: a=1", b"Set-Cookie: b=2")
        )
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        headers = [(b"Host", b"svc.local"), (b"X-Odd", b"a;b=c"), (b"accept", b"*/*")]
        resp = await asyncio.wait_for(
            pool.request(HOST, srv.port, b"GET", b"/p/%2F?q=1&x=%20", headers), DEADLINE
        )
        assert resp.status == 200
        assert resp.reason == b"OK"
        assert resp.has_body()
        assert resp.headers == [
            (b"content-length", b"11"),
            (b"x-thing", b"A"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
        ]
        assert await read_body(resp) == b"hello world"
    assert seen == [
        b"GET /p/%2F?q=1&x=%20 HTTP/1.1\r\nHost: svc.local\r\nX-Odd: a;b=c\r\naccept: */*\r\n\r\n"
    ]


async def test_chunked_body_is_delivered_chunk_by_chunk(pool: UpstreamPool) -> None:
    """Each chunk reaches the caller before the server sends the next one."""
    pieces = [b'{"response":"a"}\n', b'{"response":"b"}\n', b'{"done":true}\n']
    client_got = [asyncio.Event() for _ in pieces]
    sent_before_seen: list[bool] = []

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n")
        for piece, got in zip(pieces, client_got, strict=True):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            try:
                # Stands in for the generation gap; a batching client times out here.
                await asyncio.wait_for(got.wait(), 3.0)
                sent_before_seen.append(False)
            except TimeoutError:
                sent_before_seen.append(True)
        writer.write(b"0\r\n\r\n")
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port)
        received: list[bytes] = []

        async def consume() -> None:
            async for chunk in resp.read_chunks():
                received.append(chunk)
                client_got[len(received) - 1].set()

        await asyncio.wait_for(consume(), DEADLINE)
        await resp.aclose()
        assert received == pieces
        assert sent_before_seen == [False, False, False]


async def test_chunked_split_sizes_and_trailers_then_reuse(pool: UpstreamPool) -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"lo\r\n1")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"0\r\n0123456789abcdef\r\n0\r\nX-Trailer: yes\r\n\r\n")
        await read_head(reader)
        writer.write(response(b"again"))
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        assert await read_body(await get(pool, srv.port)) == b"hello0123456789abcdef"
        assert await read_body(await get(pool, srv.port)) == b"again"
        assert srv.connections == 1


@pytest.mark.parametrize("framing", [b"", b"transfer-encoding: gzip\r\n"])
async def test_body_until_close(pool: UpstreamPool, framing: bytes) -> None:
    """No content-length and no final chunked coding: the body ends at the close."""

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n" + framing)
        writer.write(b"\r\nfirst ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"second")
        await writer.drain()
        writer.close()

    async with RawServer(handler) as srv:
        assert await read_body(await get(pool, srv.port)) == b"first second"
        # Not reusable: the next request needs a new connection.
        assert await read_body(await get(pool, srv.port)) == b"first second"
        assert srv.connections == 2


async def test_head_with_content_length_has_no_body_and_reuses(pool: UpstreamPool) -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        line = (await read_head(reader))[0]
        assert line.startswith(b"HEAD ")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\ncontent-type: x/y\r\n\r\n")
        line = (await read_head(reader))[0]
        assert line.startswith(b"GET ")
        writer.write(response(b"body after head"))
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port, method=b"HEAD")
        assert resp.status == 200
        assert not resp.has_body()
        assert (b"content-length", b"1000") in resp.headers
        assert await read_body(resp) == b""
        assert await read_body(await get(pool, srv.port)) == b"body after head"
        assert srv.connections == 1


async def test_204_and_304_have_no_body_and_reuse(pool: UpstreamPool) -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n")
        await read_head(reader)
        # A 304 may announce the representation's length; it still has no body.
        writer.write(b'HTTP/1.1 304 Not Modified\r\ncontent-length: 50\r\netag: "x"\r\n\r\n')
        await read_head(reader)
        writer.write(response(b"ok"))
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        r204 = await get(pool, srv.port)
        assert (r204.status, r204.reason, r204.has_body()) == (204, b"No Content", False)
        assert await read_body(r204) == b""
        r304 = await get(pool, srv.port)
        assert (r304.status, r304.has_body()) == (304, False)
        assert await read_body(r304) == b""
        assert await read_body(await get(pool, srv.port)) == b"ok"
        assert srv.connections == 1


async def test_interim_1xx_responses_are_skipped(pool: UpstreamPool) -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n")
        writer.write(response(b"final", b"x-final: 1", status=b"201 Created"))
        await read_head(reader)
        writer.write(response(b"next"))
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port)
        assert (resp.status, resp.reason) == (201, b"Created")
        assert resp.headers == [(b"content-length", b"5"), (b"x-final", b"1")]
        assert await read_body(resp) == b"final"
        assert await read_body(await get(pool, srv.port)) == b"next"
        assert srv.connections == 1


async def test_response_trickled_byte_by_byte(pool: UpstreamPool) -> None:
    """Status line, headers and chunk sizes split anywhere across reads."""
    raw = (
        b"HTTP/1.1 200 Very Fine Indeed\r\nX-Long-Header-Name: some longer value\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n"
    )

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        for i in range(len(raw)):
            writer.write(raw[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        await read_head(reader)
        writer.write(response(b"next"))
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port)
        assert (resp.status, resp.reason) == (200, b"Very Fine Indeed")
        assert resp.headers == [
            (b"x-long-header-name", b"some longer value"),
            (b"transfer-encoding", b"chunked"),
        ]
        assert await read_body(resp) == b"abcdefghijklmnopqrstuvwxyz"
        assert await read_body(await get(pool, srv.port)) == b"next"
        assert srv.connections == 1


async def test_bare_lf_line_endings_are_accepted(pool: UpstreamPool) -> None:
    """Some upstreams (busybox httpd passing CGI headers through) end lines with LF only."""

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\nContent-Length: 2\n\nok")
        await read_head(reader)
        writer.write(response(b"next"))
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port)
        assert resp.headers == [(b"content-type", b"text/plain"), (b"content-length", b"2")]
        assert await read_body(resp) == b"ok"
        assert await read_body(await get(pool, srv.port)) == b"next"
        assert srv.connections == 1


async def test_malformed_response(pool: UpstreamPool) -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(b"SPDY/9 banana\r\n\r\n")
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        with pytest.raises(UpstreamProtocolError) as info:
            await get(pool, srv.port)
        assert "malformed" in info.value.reason


# ---------------------------------------------------------------- connection reuse


async def test_sequential_requests_share_one_connection(pool: UpstreamPool) -> None:
    requests = 0

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        nonlocal requests
        while True:
            await read_head(reader)
            requests += 1
            writer.write(response(b"r%d" % requests))

    async with RawServer(handler) as srv:
        for i in range(1, 4):
            assert await read_body(await get(pool, srv.port)) == b"r%d" % i
        assert requests == 3
        assert srv.connections == 1


@pytest.mark.parametrize(
    ("status_line", "extra", "reused"),
    [
        (b"HTTP/1.1 200 OK", b"", True),
        (b"HTTP/1.1 200 OK", b"Connection: close\r\n", False),
        (b"HTTP/1.0 200 OK", b"", False),
        (b"HTTP/1.0 200 OK", b"Connection: keep-alive\r\n", True),
    ],
)
async def test_keep_alive_rules(
    pool: UpstreamPool, status_line: bytes, extra: bytes, reused: bool
) -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        while True:
            await read_head(reader)
            writer.write(status_line + b"\r\ncontent-length: 2\r\n" + extra + b"\r\nok")

    async with RawServer(handler) as srv:
        for _ in range(2):
            assert await read_body(await get(pool, srv.port)) == b"ok"
        assert srv.connections == (1 if reused else 2)


async def test_idle_connection_closed_by_server_is_not_reused() -> None:
    first_read = asyncio.Event()
    closed = asyncio.Event()

    async def handler(reader: Reader, writer: Writer, index: int) -> None:
        await read_head(reader)
        if index == 1:
            assert await reader.readexactly(7) == b"payload"
        writer.write(response(b"c%d" % index))
        await writer.drain()
        if index == 0:
            await asyncio.wait_for(first_read.wait(), DEADLINE)  # it is idle in the pool now
            writer.close()
            await writer.wait_closed()
            closed.set()
        else:
            await wait_eof(reader)

    async def one_piece() -> AsyncIterator[bytes]:
        yield b"payload"

    def idle_conns() -> list[Any]:
        return [c for conns in upool._idle.values() for c in conns]

    async def until_client_saw_close() -> None:
        for _ in itertools.count():
            if all(c._closed for c in idle_conns()):
                return
            await asyncio.sleep(0.005)

    upool = UpstreamPool()
    try:
        async with RawServer(handler) as srv:
            assert await read_body(await get(upool, srv.port)) == b"c0"
            assert len(idle_conns()) == 1
            first_read.set()
            await asyncio.wait_for(closed.wait(), DEADLINE)
            await asyncio.wait_for(until_client_saw_close(), DEADLINE)
            # A request with a body is never retried, so this only works if the
            # pool noticed the close and does not hand out the dead connection.
            hdrs = [(b"host", b"x"), (b"content-length", b"7")]
            resp = await asyncio.wait_for(
                upool.request(HOST, srv.port, b"POST", b"/", hdrs, one_piece()), DEADLINE
            )
            assert await read_body(resp) == b"c1"
            assert srv.connections == 2
    finally:
        await upool.aclose()


async def stale_on_second_request(reader: Reader, writer: Writer, index: int) -> None:
    """Connection 0 answers one request, then drops the next one unanswered."""
    await read_head(reader)
    writer.write(response(b"conn%d" % index))
    await writer.drain()
    if index == 0:
        await read_head(reader)
        writer.transport.abort()
        return
    await wait_eof(reader)


async def test_stale_keepalive_is_retried_once_on_a_fresh_connection(pool: UpstreamPool) -> None:
    async with RawServer(stale_on_second_request) as srv:
        assert await read_body(await get(pool, srv.port)) == b"conn0"
        assert await read_body(await get(pool, srv.port)) == b"conn1"
        assert srv.connections == 2


async def test_stale_keepalive_not_retried_with_body(pool: UpstreamPool) -> None:
    async def one_piece() -> AsyncIterator[bytes]:
        yield b"payload"

    async with RawServer(stale_on_second_request) as srv:
        assert await read_body(await get(pool, srv.port)) == b"conn0"
        with pytest.raises(UpstreamProtocolError):
            await asyncio.wait_for(
                pool.request(HOST, srv.port, b"POST", b"/", [(b"host", b"x")], one_piece()),
                DEADLINE,
            )
        assert srv.connections == 1


async def test_no_retry_once_response_bytes_arrived(pool: UpstreamPool) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        await read_head(reader)
        writer.write(response(b"first"))
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-le")
        await writer.drain()
        writer.transport.abort()

    async with RawServer(handler) as srv:
        assert await read_body(await get(pool, srv.port)) == b"first"
        with pytest.raises(UpstreamProtocolError):
            await get(pool, srv.port)
        assert srv.connections == 1


async def test_idle_connections_expire() -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        while True:
            await read_head(reader)
            writer.write(response(b"ok"))

    pool = UpstreamPool(idle_keepalive_s=0.0)
    try:
        async with RawServer(handler) as srv:
            for _ in range(2):
                assert await read_body(await get(pool, srv.port)) == b"ok"
            assert srv.connections == 2
    finally:
        await pool.aclose()


async def test_max_idle_per_origin_and_pool_aclose() -> None:
    both_in = asyncio.Event()
    arrived = 0
    eofs: list[asyncio.Event] = [asyncio.Event(), asyncio.Event()]

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        nonlocal arrived
        await read_head(reader)
        arrived += 1
        if arrived == 2:
            both_in.set()
        await asyncio.wait_for(both_in.wait(), DEADLINE)
        writer.write(response(b"ok"))
        while True:
            try:
                await read_head(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                eofs[index].set()
                return
            writer.write(response(b"again"))

    pool = UpstreamPool(max_idle_per_origin=1)
    try:
        async with RawServer(handler) as srv:
            r1, r2 = await asyncio.gather(get(pool, srv.port), get(pool, srv.port))
            assert await read_body(r1) == b"ok"
            assert await read_body(r2) == b"ok"
            # Only one of the two fits in the idle pool: the other one is closed.
            done, _ = await asyncio.wait(
                [asyncio.ensure_future(e.wait()) for e in eofs],
                timeout=DEADLINE,
                return_when=asyncio.FIRST_COMPLETED,
            )
            assert len(done) == 1
            assert await read_body(await get(pool, srv.port)) == b"again"
            assert srv.connections == 2
            await pool.aclose()
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in eofs)), DEADLINE)
    finally:
        await pool.aclose()


# ---------------------------------------------------------------- request bodies


async def test_small_bodies_exact_framing(pool: UpstreamPool) -> None:
    raw_seen: list[bytes] = []

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        while True:
            _line, headers, raw = await read_head(reader)
            if b"content-length" in headers:
                raw += await reader.readexactly(int(headers[b"content-length"]))
            else:
                raw += await reader.readuntil(b"0\r\n\r\n")
            raw_seen.append(raw)
            writer.write(response(b"ok"))

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"ab", b"", b"cde"):
            yield piece

    async def nothing() -> AsyncIterator[bytes]:
        empty: tuple[bytes, ...] = ()
        for piece in empty:
            yield piece

    async with RawServer(handler) as srv:
        h = [(b"host", b"x")]
        for hdrs, body in (
            (h, pieces()),
            ([*h, (b"Content-Length", b"5")], pieces()),
            (h, nothing()),
        ):
            resp = await asyncio.wait_for(
                pool.request(HOST, srv.port, b"POST", b"/u", hdrs, body), DEADLINE
            )
            assert await read_body(resp) == b"ok"
        assert srv.connections == 1
    assert raw_seen == [
        b"POST /u HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n",
        b"POST /u HTTP/1.1\r\nhost: x\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST /u HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ]


UPLOAD_PIECE = 64 * 1024
UPLOAD_PIECES = 3200  # 200 MiB


async def count_upload(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> int:
    total = 0
    if b"content-length" in headers:
        remaining = int(headers[b"content-length"])
        while remaining:
            data = await reader.read(min(remaining, 1 << 20))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            total += len(data)
        return total
    assert headers[b"transfer-encoding"] == b"chunked"
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return total
        while size:
            data = await reader.read(min(size, 1 << 20))
            if not data:
                raise asyncio.IncompleteReadError(b"", size)
            size -= len(data)
            total += len(data)
        assert await reader.readexactly(2) == b"\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_streamed_upload_uses_bounded_memory(pool: UpstreamPool, framing: str) -> None:
    total_size = UPLOAD_PIECE * UPLOAD_PIECES
    framing_seen: list[dict[bytes, bytes]] = []

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        _line, headers, _raw = await read_head(reader)
        framing_seen.append(headers)
        total = await count_upload(reader, headers)
        writer.write(response(b"%d" % total))
        await wait_eof(reader)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(UPLOAD_PIECES):
            yield bytes(UPLOAD_PIECE)  # a fresh object each time: keeping them would show

    headers = [(b"host", b"x")]
    if framing == "content-length":
        headers.append((b"content-length", b"%d" % total_size))
    async with RawServer(handler) as srv:
        tracemalloc.start()
        try:
            resp = await asyncio.wait_for(
                pool.request(HOST, srv.port, b"PUT", b"/blob", headers, body()), 120
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert await read_body(resp) == b"%d" % total_size
    assert (b"transfer-encoding" in framing_seen[0]) == (framing == "chunked")
    assert peak < 16 * 1024 * 1024, f"peak traced memory {peak} bytes"


async def test_upload_shorter_than_content_length_fails(pool: UpstreamPool) -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        await wait_eof(reader)

    async def short() -> AsyncIterator[bytes]:
        yield b"abc"

    async with RawServer(handler) as srv:
        hdrs = [(b"host", b"x"), (b"content-length", b"10")]
        with pytest.raises(UpstreamProtocolError):
            await asyncio.wait_for(
                pool.request(HOST, srv.port, b"POST", b"/", hdrs, short()), DEADLINE
            )


async def test_upload_longer_than_content_length_fails(pool: UpstreamPool) -> None:
    received = bytearray()
    done = asyncio.Event()

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        try:
            while data := await reader.read(65536):
                received.extend(data)
        except ConnectionError:
            pass
        done.set()

    async def smuggler() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"GET /admin HTTP/1.1\r\nhost: x\r\n\r\n"

    async with RawServer(handler) as srv:
        hdrs = [(b"host", b"x"), (b"content-length", b"3")]
        with pytest.raises(UpstreamProtocolError):
            await asyncio.wait_for(
                pool.request(HOST, srv.port, b"POST", b"/", hdrs, smuggler()), DEADLINE
            )
        await asyncio.wait_for(done.wait(), DEADLINE)
    assert bytes(received) == b"abc"


async def test_early_response_stops_blocked_upload(pool: UpstreamPool) -> None:
    """An upstream that answers (413) and stops reading must not hang the upload."""
    release = asyncio.Event()
    produced = 0

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(response(b"too big", status=b"413 Payload Too Large"))
        await writer.drain()
        await asyncio.wait_for(release.wait(), DEADLINE)

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(16 * 1024):  # up to 1 GiB: far more than socket buffers hold
            produced += 1
            yield bytes(UPLOAD_PIECE)

    async with RawServer(handler) as srv:
        resp = await asyncio.wait_for(
            pool.request(HOST, srv.port, b"POST", b"/", [(b"host", b"x")], body()), DEADLINE
        )
        assert resp.status == 413
        assert await read_body(resp) == b"too big"
        assert produced < 16 * 1024
        release.set()


# ---------------------------------------------------------------- failures


async def test_connection_refused() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, 0))  # bound, never listening: connecting is refused
        port = sock.getsockname()[1]
        pool = UpstreamPool(connect_timeout=DEADLINE)
        with pytest.raises(UpstreamConnectError) as info:
            await get(pool, port)
        assert str(port) in info.value.reason
        await pool.aclose()
    finally:
        sock.close()


@pytest.mark.parametrize("how", ["reset", "close", "chunked-close"])
async def test_server_dies_mid_body(pool: UpstreamPool, how: str) -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        if how == "chunked-close":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\npart\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.05)
        if how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port)
        assert resp.status == 200
        with pytest.raises(UpstreamProtocolError):
            await read_body(resp)


async def test_read_timeout_when_configured() -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        await wait_eof(reader)

    pool = UpstreamPool(read_timeout=0.2)
    try:
        async with RawServer(handler) as srv:
            with pytest.raises(UpstreamTimeoutError):
                await get(pool, srv.port)
            assert srv.connections == 1
    finally:
        await pool.aclose()


async def test_aclose_mid_stream_closes_upstream_socket(pool: UpstreamPool) -> None:
    upstream_saw_close = asyncio.Event()

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\ntoken1\r\n")
        await writer.drain()
        await wait_eof(reader)  # a model would keep generating until here
        upstream_saw_close.set()

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port)
        it = resp.read_chunks().__aiter__()
        assert await asyncio.wait_for(anext(it), DEADLINE) == b"token1"
        await resp.aclose()
        await asyncio.wait_for(upstream_saw_close.wait(), DEADLINE)
        # The pool must not hand that connection out again.
        assert srv.connections == 1


async def test_connect_timeout() -> None:
    # listen(0) and never accept: once the accept queue is full, SYNs are dropped
    # (or refused where tcp_abort_on_overflow=1); either way a connect error.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind((HOST, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            try:
                filler.connect((HOST, port))
            except BlockingIOError:
                pass
        pool = UpstreamPool(connect_timeout=0.2)
        with pytest.raises(UpstreamConnectError):
            await get(pool, port)
        await pool.aclose()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_slow_consumer_pauses_reading_and_connection_stays_usable(
    pool: UpstreamPool,
) -> None:
    """The body ends exactly as the read buffer passes its high-water mark (reading
    is paused right then); closing without reading must still leave a usable,
    reading connection in the pool."""
    big = b"y" * (_READ_HIGH_WATER + 1)

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(response(big))
        await read_head(reader)
        writer.write(response(b"small"))
        await wait_eof(reader)

    async def until_fully_received(resp: UpstreamResponse) -> None:
        for _ in itertools.count():
            conn = resp._conn
            if conn is not None and conn._msg_done:
                return
            await asyncio.sleep(0.005)

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port)
        await asyncio.wait_for(until_fully_received(resp), DEADLINE)
        await resp.aclose()
        assert await read_body(await get(pool, srv.port)) == b"small"
        assert srv.connections == 1


async def test_large_body_streams_through_with_back_pressure(pool: UpstreamPool) -> None:
    size = 32 * 1024 * 1024

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        piece = b"z" * 65536
        for _ in range(size // len(piece)):
            writer.write(piece)
            await writer.drain()
        await wait_eof(reader)

    async def until_reading_paused(resp: UpstreamResponse) -> None:
        for _ in itertools.count():
            conn = resp._conn
            assert conn is not None
            if conn._read_paused:
                return
            await asyncio.sleep(0.005)

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port)
        it = resp.read_chunks().__aiter__()
        total = len(await asyncio.wait_for(anext(it), DEADLINE))
        # The consumer stalls: the client stops reading instead of buffering 32 MiB.
        await asyncio.wait_for(until_reading_paused(resp), DEADLINE)
        conn = resp._conn
        assert conn is not None
        assert conn._buffered <= 2 * _READ_HIGH_WATER

        async def consume_rest() -> None:
            nonlocal total
            async for chunk in it:
                total += len(chunk)

        await asyncio.wait_for(consume_rest(), 60)
        await resp.aclose()
    assert total == size


def test_pool_can_be_used_from_a_new_event_loop() -> None:
    pool = UpstreamPool()

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        while True:
            await read_head(reader)
            writer.write(response(b"ok"))

    async def once() -> int:
        async with RawServer(handler) as srv:
            for _ in range(2):
                assert await read_body(await get(pool, srv.port)) == b"ok"
            await pool.aclose()
            return srv.connections

    assert asyncio.run(once()) == 1
    assert asyncio.run(once()) == 1


async def test_dropped_response_closes_upstream_socket(pool: UpstreamPool) -> None:
    """Safety net: a response garbage-collected without aclose() closes its socket."""
    upstream_saw_close = asyncio.Event()

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\ntoken1\r\n")
        await writer.drain()
        await wait_eof(reader)
        upstream_saw_close.set()

    async with RawServer(handler) as srv:
        resp: UpstreamResponse | None = await get(pool, srv.port)
        assert resp is not None and resp.status == 200
        resp = None
        gc.collect()
        await asyncio.wait_for(upstream_saw_close.wait(), DEADLINE)


async def test_cancel_while_waiting_for_head_closes_upstream_socket(pool: UpstreamPool) -> None:
    got_request = asyncio.Event()
    upstream_saw_close = asyncio.Event()

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        got_request.set()
        await wait_eof(reader)  # e.g. a model still loading
        upstream_saw_close.set()

    async with RawServer(handler) as srv:
        task = asyncio.ensure_future(pool.request(HOST, srv.port, b"GET", b"/", [(b"host", b"x")]))
        await asyncio.wait_for(got_request.wait(), DEADLINE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(upstream_saw_close.wait(), DEADLINE)


# ---------------------------------------------------------------- the same under uvloop

Scenario = Callable[[UpstreamPool], Awaitable[None]]


def _no_pool(test: Callable[[], Awaitable[None]]) -> Scenario:
    def scenario(_pool: UpstreamPool) -> Awaitable[None]:
        return test()

    return scenario


UVLOOP_SCENARIOS: dict[str, Scenario] = {
    "content_length": test_content_length_body_and_request_bytes,
    "chunk_by_chunk": test_chunked_body_is_delivered_chunk_by_chunk,
    "chunked_split": test_chunked_split_sizes_and_trailers_then_reuse,
    "until_close": functools.partial(test_body_until_close, framing=b""),
    "head": test_head_with_content_length_has_no_body_and_reuses,
    "204_304": test_204_and_304_have_no_body_and_reuse,
    "interim": test_interim_1xx_responses_are_skipped,
    "trickled": test_response_trickled_byte_by_byte,
    "malformed": test_malformed_response,
    "reuse": test_sequential_requests_share_one_connection,
    "conn_close": functools.partial(
        test_keep_alive_rules,
        status_line=b"HTTP/1.1 200 OK",
        extra=b"Connection: close\r\n",
        reused=False,
    ),
    "idle_closed": _no_pool(test_idle_connection_closed_by_server_is_not_reused),
    "stale_retry": test_stale_keepalive_is_retried_once_on_a_fresh_connection,
    "stale_body": test_stale_keepalive_not_retried_with_body,
    "no_retry_after_bytes": test_no_retry_once_response_bytes_arrived,
    "max_idle": _no_pool(test_max_idle_per_origin_and_pool_aclose),
    "small_bodies": test_small_bodies_exact_framing,
    "upload_cl": functools.partial(
        test_large_streamed_upload_uses_bounded_memory, framing="content-length"
    ),
    "upload_chunked": functools.partial(
        test_large_streamed_upload_uses_bounded_memory, framing="chunked"
    ),
    "early_response": test_early_response_stops_blocked_upload,
    "refused": _no_pool(test_connection_refused),
    "reset_mid_body": functools.partial(test_server_dies_mid_body, how="reset"),
    "read_timeout": _no_pool(test_read_timeout_when_configured),
    "aclose_mid_stream": test_aclose_mid_stream_closes_upstream_socket,
    "slow_consumer": test_slow_consumer_pauses_reading_and_connection_stays_usable,
    "back_pressure": test_large_body_streams_through_with_back_pressure,
    "cancel": test_cancel_while_waiting_for_head_closes_upstream_socket,
    "dropped": test_dropped_response_closes_upstream_socket,
}


@pytest.mark.parametrize("name", list(UVLOOP_SCENARIOS))
def test_under_uvloop(name: str) -> None:
    """The proxy runs under uvloop, whose transports behave differently in details."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        pool = UpstreamPool()
        try:
            await UVLOOP_SCENARIOS[name](pool)
        finally:
            await pool.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
