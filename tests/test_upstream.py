"""Tests for hestia.upstream against real raw-HTTP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import socket
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from hestia.upstream import (
    _READ_HIGH_WATER,
    TRANSITIONS,
    ConnState,
    ConnStateError,
    Origin,
    ResponsePhase,
    UpstreamConnectError,
    UpstreamConnection,
    UpstreamHeadTooLarge,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeoutError,
    UpstreamTimeouts,
)
from tests.conftest import wait_for as wait_until
from tests.rawserver import (
    DEADLINE,
    HOST,
    RawServer,
    Reader,
    Writer,
    read_head,
    reset,
    response,
    wait_eof,
)


def _state(conn: Any) -> ConnState:
    """The state now (a call: the type checker must not carry an earlier assert over)."""
    state: ConnState = conn.state
    return state


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
        writer.write(b"HTTP/1.1 102 Processing\r\n\r\n")
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

    upool = UpstreamPool()
    try:
        async with RawServer(handler) as srv:
            assert await read_body(await get(upool, srv.port)) == b"c0"
            conns = upool.connections(HOST, srv.port)
            assert [c.state for c in conns] == [ConnState.IDLE]
            first_read.set()
            await asyncio.wait_for(closed.wait(), DEADLINE)
            await wait_until(lambda: conns[0].state is ConnState.CLOSED, DEADLINE, "close seen")
            assert upool.connections(HOST, srv.port) == []
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
        pool = UpstreamPool(timeouts=UpstreamTimeouts(connect=DEADLINE))
        with pytest.raises(UpstreamConnectError) as info:
            await get(pool, port)
        assert str(port) in info.value.reason
        assert not isinstance(info.value, UpstreamTimeoutError)  # the proxy answers 502
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
            reset(writer)
        else:
            writer.close()

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port)
        assert resp.status == 200
        with pytest.raises(UpstreamProtocolError):
            await read_body(resp)


async def test_response_headers_timeout_from_the_pool_default() -> None:
    upstream_saw_close = asyncio.Event()

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        await wait_eof(reader)  # a model still loading, for ever
        upstream_saw_close.set()

    pool = UpstreamPool(timeouts=UpstreamTimeouts(response_headers=0.2))
    try:
        async with RawServer(handler) as srv:
            with pytest.raises(UpstreamTimeoutError) as info:
                await get(pool, srv.port)
            assert info.value.phase == "response_headers"
            assert info.value.limit == 0.2
            assert info.value.reason == ("no response head within 0.2s (timeouts.response_headers)")
            await asyncio.wait_for(upstream_saw_close.wait(), DEADLINE)
            assert srv.connections == 1  # a timeout is not retried
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


def kernel_refuses_over_backlog() -> bool:
    with open("/proc/sys/net/ipv4/tcp_abort_on_overflow") as f:
        return f.read().strip() != "0"


async def test_connect_timeout_is_not_a_refusal() -> None:
    # listen(0) and never accept: once the accept queue is full, the kernel drops SYNs
    # and the connect hangs (where tcp_abort_on_overflow=1 it refuses them instead).
    if kernel_refuses_over_backlog():
        pytest.skip("this kernel refuses connections over the backlog instead")
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
        pool = UpstreamPool(timeouts=UpstreamTimeouts(connect=0.2))
        with pytest.raises(UpstreamTimeoutError) as info:
            await get(pool, port)
        assert info.value.phase == "connect"
        assert not isinstance(info.value, UpstreamConnectError)  # the proxy answers 504
        assert info.value.reason == (
            f"no connection to {HOST}:{port} within 0.2s (timeouts.connect)"
        )
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
        conn = resp.connection
        assert conn is not None
        await wait_until(lambda: conn.phase is ResponsePhase.DONE, DEADLINE, "whole body")
        assert conn.reading_paused

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
            conn = resp.connection
            assert conn is not None
            if conn.reading_paused:
                return
            await asyncio.sleep(0.005)

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port)
        it = resp.read_chunks().__aiter__()
        total = len(await asyncio.wait_for(anext(it), DEADLINE))
        # The consumer stalls: the client stops reading instead of buffering 32 MiB.
        await asyncio.wait_for(until_reading_paused(resp), DEADLINE)
        conn = resp.connection
        assert conn is not None
        assert conn.buffered <= 2 * _READ_HIGH_WATER

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


# ---------------------------------------------------------------- connection states


async def test_connection_states_through_exchanges(pool: UpstreamPool) -> None:
    """ACTIVE while a response is out, IDLE back in the pool, CLOSED when cut short."""

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(response(b"whole"))
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port)
        conn = resp.connection
        assert conn is not None
        assert conn.state is ConnState.ACTIVE
        assert (conn.status, conn.reason, conn.headers) == (200, b"OK", resp.headers)
        assert await read_body(resp) == b"whole"
        assert _state(conn) is ConnState.IDLE
        assert pool.connections(HOST, srv.port) == [conn]

        resp = await get(pool, srv.port)
        assert resp.connection is conn
        assert (conn.state, conn.phase) == (ConnState.ACTIVE, ResponsePhase.BODY)
        await resp.aclose()  # before the end of the body
        assert _state(conn) is ConnState.CLOSED
        assert pool.connections(HOST, srv.port) == []


STATES = [ConnState.NEW, ConnState.ACTIVE, ConnState.IDLE]
MOVES = [ConnState.ACTIVE, ConnState.IDLE]  # start_exchange(), release()


@pytest.mark.parametrize("move", MOVES, ids=lambda s: f"to_{s.name}")
@pytest.mark.parametrize("state", STATES, ids=lambda s: f"from_{s.name}")
async def test_moves_outside_the_table_raise(
    pool: UpstreamPool, state: ConnState, move: ConnState
) -> None:
    """Each public move works exactly from the states TRANSITIONS allows; from any other
    state it raises ConnStateError (a bug, not an upstream failure)."""

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        while True:
            line = (await read_head(reader))[0]
            if b"/partial" in line:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
            else:
                writer.write(response(b"ok"))

    async with RawServer(handler) as srv:
        held: list[UpstreamResponse] = []  # kept referenced: a dropped response aborts
        if state is ConnState.NEW:
            loop = asyncio.get_running_loop()
            conn = UpstreamConnection(loop, Origin(HOST, srv.port), 65536, 256)
            await asyncio.wait_for(loop.create_connection(lambda: conn, HOST, srv.port), DEADLINE)
        elif state is ConnState.ACTIVE:
            held.append(await get(pool, srv.port, b"/partial"))
            active = held[0].connection
            assert active is not None
            conn = active
        else:
            assert await read_body(await get(pool, srv.port)) == b"ok"
            [conn] = pool.connections(HOST, srv.port)
        assert conn.state is state
        try:
            if move in TRANSITIONS[state]:
                if move is ConnState.ACTIVE:
                    conn.start_exchange(False, UpstreamTimeouts())  # nothing sent: no I/O
                    assert conn.state is ConnState.ACTIVE
                else:
                    conn.release()  # mid-body: not reusable, so CLOSED rather than IDLE
                    assert conn.state in TRANSITIONS[state]
            else:
                with pytest.raises(ConnStateError):
                    if move is ConnState.ACTIVE:
                        conn.start_exchange(False, UpstreamTimeouts())
                    else:
                        conn.release()
                assert conn.state is state
        finally:
            conn.abort()
        assert conn.state is ConnState.CLOSED
        # CLOSED is final: starting an exchange is an upstream failure to report (the peer
        # may have hung up meanwhile), releasing again a no-op.
        with pytest.raises(UpstreamProtocolError):
            conn.start_exchange(False, UpstreamTimeouts())
        assert conn.release() is False
        assert conn.state is ConnState.CLOSED


# ---------------------------------------------------------------- limits and timeouts


def test_upstream_timeouts_are_checked() -> None:
    assert UpstreamTimeouts() == UpstreamTimeouts(10.0, None, None)
    with pytest.raises(ValueError, match=r"timeouts\.idle_body must be a positive number"):
        UpstreamTimeouts(idle_body=0)
    with pytest.raises(ValueError, match=r"timeouts\.connect"):
        UpstreamTimeouts(connect=-1.0)


async def test_per_request_timeouts_replace_the_pool_default(pool: UpstreamPool) -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        while True:
            line = (await read_head(reader))[0]
            if b"/slow" in line:
                await asyncio.sleep(0.6)  # longer than the default of `strict` below
                writer.write(response(b"slow but fine"))
            # /never: no answer at all

    strict = UpstreamPool(timeouts=UpstreamTimeouts(response_headers=0.2))
    hdrs = [(b"host", b"x")]
    try:
        async with RawServer(handler) as srv:
            no_limit = UpstreamTimeouts()
            resp = await asyncio.wait_for(
                strict.request(HOST, srv.port, b"GET", b"/slow", hdrs, timeouts=no_limit),
                DEADLINE,
            )
            assert await read_body(resp) == b"slow but fine"
            # And the other way round: a limit for one request of a pool without one.
            with pytest.raises(UpstreamTimeoutError) as info:
                short = UpstreamTimeouts(response_headers=0.1)
                await asyncio.wait_for(
                    pool.request(HOST, srv.port, b"GET", b"/never", hdrs, timeouts=short),
                    DEADLINE,
                )
            assert (info.value.phase, info.value.limit) == ("response_headers", 0.1)
    finally:
        await strict.aclose()


async def test_idle_body_timeout(pool: UpstreamPool) -> None:
    upstream_saw_close = asyncio.Event()

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await wait_eof(reader)  # and then nothing: a wedged upstream
        upstream_saw_close.set()

    async with RawServer(handler) as srv:
        resp = await asyncio.wait_for(
            pool.request(
                HOST,
                srv.port,
                b"GET",
                b"/",
                [(b"host", b"x")],
                timeouts=UpstreamTimeouts(idle_body=0.2),
            ),
            DEADLINE,
        )
        received: list[bytes] = []
        with pytest.raises(UpstreamTimeoutError) as info:
            async with asyncio.timeout(DEADLINE):
                async for chunk in resp.read_chunks():
                    received.append(chunk)
        await resp.aclose()
        assert received == [b"first"]
        assert info.value.phase == "idle_body"
        assert info.value.reason == "no body data for 0.2s (timeouts.idle_body)"
        await asyncio.wait_for(upstream_saw_close.wait(), DEADLINE)


async def test_upload_the_upstream_does_not_read_times_out(pool: UpstreamPool) -> None:
    """An upstream that takes the head and then neither reads the body nor answers."""
    release = asyncio.Event()
    produced = 0

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        await asyncio.wait_for(release.wait(), DEADLINE)

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(16 * 1024):  # up to 1 GiB: far more than socket buffers hold
            produced += 1
            yield bytes(UPLOAD_PIECE)

    async with RawServer(handler) as srv:
        with pytest.raises(UpstreamTimeoutError) as info:
            await asyncio.wait_for(
                pool.request(
                    HOST,
                    srv.port,
                    b"PUT",
                    b"/",
                    [(b"host", b"x")],
                    body(),
                    timeouts=UpstreamTimeouts(response_headers=0.2),
                ),
                DEADLINE,
            )
        release.set()
    assert info.value.phase == "response_headers"
    assert "neither read the request body nor answered for 0.2s" in info.value.reason
    assert produced < 16 * 1024


async def test_huge_response_head_is_refused_without_buffering_it(pool: UpstreamPool) -> None:
    """A 64 MiB header line: refused once past max_response_head, and never held in memory."""
    sent = 0
    gave_up = asyncio.Event()

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        nonlocal sent
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-big: ")
        piece = b"a" * 65536
        try:
            for _ in range(1024):  # 64 MiB
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
        except ConnectionError:
            pass
        gave_up.set()

    async with RawServer(handler) as srv:
        tracemalloc.start()
        try:
            with pytest.raises(UpstreamHeadTooLarge) as info:
                await get(pool, srv.port)
            await asyncio.wait_for(gave_up.wait(), DEADLINE)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert info.value.limit == 65536
    assert info.value.reason == (
        "upstream response head is larger than 65536 bytes (max_response_head)"
    )
    assert isinstance(info.value, UpstreamProtocolError)
    # The client stopped reading (the connection is gone) long before 64 MiB...
    assert sent < 16 * 1024 * 1024, sent
    # ...and held no more than a few socket reads at a time (this counts the server too).
    assert peak < 4 * 1024 * 1024, peak


def head_of(size: int) -> bytes:
    """A response head of exactly ``size`` bytes, announcing a 4-byte body."""
    start = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nx-pad: "
    end = b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize("delivery", ["one write", "trickled"])
async def test_response_head_limit_is_exact(delivery: str) -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        while True:
            line = (await read_head(reader))[0]
            raw = head_of(int(line.split(b"/")[1].split(b" ")[0])) + b"body"
            if delivery == "one write":
                writer.write(raw)
            else:
                for i in range(0, len(raw), 100):
                    writer.write(raw[i : i + 100])
                    await writer.drain()
                    await asyncio.sleep(0.001)

    pool = UpstreamPool(max_response_head=1024)
    try:
        async with RawServer(handler) as srv:
            assert await read_body(await get(pool, srv.port, b"/1024")) == b"body"
            with pytest.raises(UpstreamHeadTooLarge) as info:
                await get(pool, srv.port, b"/1025")
            assert info.value.limit == 1024
            assert await read_body(await get(pool, srv.port, b"/1000")) == b"body"
    finally:
        await pool.aclose()


async def test_header_count_limit(pool: UpstreamPool) -> None:
    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        while True:
            line = (await read_head(reader))[0]
            count = int(line.split(b"/")[1].split(b" ")[0])
            extra = [b"x-h%d: %d" % (i, i) for i in range(count - 1)]  # + content-length
            writer.write(response(b"ok", *extra))

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port, b"/256")
        assert len(resp.headers) == 256
        assert await read_body(resp) == b"ok"
        with pytest.raises(UpstreamHeadTooLarge) as info:
            await get(pool, srv.port, b"/257")
        assert info.value.limit == 256
        assert "more than 256 header lines (max_response_headers)" in info.value.reason
        assert await read_body(await get(pool, srv.port, b"/1")) == b"ok"
        assert srv.connections == 2  # the connection of the refused response was not kept


# ---------------------------------------------------------------- odd upstreams


async def test_close_delimited_body_cut_by_a_reset_is_an_error(pool: UpstreamPool) -> None:
    """Without framing a clean FIN ends the body (test_body_until_close); a reset is no end."""
    client_got_first = asyncio.Event()

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nfirst part")
        await writer.drain()
        await asyncio.wait_for(client_got_first.wait(), DEADLINE)
        reset(writer)

    async with RawServer(handler) as srv:
        resp = await get(pool, srv.port)
        it = resp.read_chunks().__aiter__()
        assert await asyncio.wait_for(anext(it), DEADLINE) == b"first part"
        client_got_first.set()
        with pytest.raises(UpstreamProtocolError) as info:
            await asyncio.wait_for(anext(it), DEADLINE)
        await resp.aclose()
        assert info.value.reason.startswith("upstream connection reset mid-body")


REPLAYABLE = [b"GET", b"HEAD", b"OPTIONS", b"TRACE"]
NOT_REPLAYABLE = [b"POST", b"PUT", b"DELETE", b"PATCH"]


@pytest.mark.parametrize("method", REPLAYABLE + NOT_REPLAYABLE, ids=bytes.decode)
async def test_stale_connection_replays_only_safe_bodiless_requests(
    pool: UpstreamPool, method: bytes
) -> None:
    """RFC 9110 9.2.2: a request the server may have acted on is never sent twice, even
    without a body.  Here connection 0 takes the second request and dies unanswered."""
    seen: list[bytes] = []

    async def handler(reader: Reader, writer: Writer, index: int) -> None:
        while True:
            line = (await read_head(reader))[0]
            seen.append(line.split(b" ")[0])
            if index == 0 and len(seen) == 2:
                writer.transport.abort()
                return
            writer.write(response(b"conn%d" % index))

    async with RawServer(handler) as srv:
        assert await read_body(await get(pool, srv.port)) == b"conn0"
        hdrs = [(b"host", b"x"), (b"content-length", b"0")]
        request = pool.request(HOST, srv.port, method, b"/thing", hdrs)
        if method in REPLAYABLE:
            resp = await asyncio.wait_for(request, DEADLINE)
            assert await read_body(resp) == (b"" if method == b"HEAD" else b"conn1")
            assert seen == [b"GET", method, method]
            assert srv.connections == 2
        else:
            with pytest.raises(UpstreamProtocolError):
                await asyncio.wait_for(request, DEADLINE)
            assert seen == [b"GET", method]
            assert srv.connections == 1


@pytest.mark.parametrize(
    ("status_line", "code"),
    [
        (b"HTTP/1.1 000 Zero", b"000"),
        (b"HTTP/1.1 099 Low", b"099"),
        (b"HTTP/1.1 600 High", b"600"),
        (b"HTTP/1.1 999 Nine", b"999"),
        (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade", b"101"),
    ],
)
async def test_invalid_statuses_are_protocol_errors(
    pool: UpstreamPool, status_line: bytes, code: bytes
) -> None:
    """A valid response follows each odd head: none of them may be skipped as interim."""
    upstream_saw_close = asyncio.Event()

    async def handler(reader: Reader, writer: Writer, _: int) -> None:
        await read_head(reader)
        writer.write(status_line + b"\r\n\r\n" + response(b"hidden"))
        await wait_eof(reader)
        upstream_saw_close.set()

    async with RawServer(handler) as srv:
        with pytest.raises(UpstreamProtocolError) as info:
            await get(pool, srv.port)
        assert info.value.reason == f"upstream answered with an invalid status {code.decode()}"
        await asyncio.wait_for(upstream_saw_close.wait(), DEADLINE)


@pytest.mark.parametrize("method", [b"GET", b"HEAD"], ids=bytes.decode)
async def test_extra_bytes_after_a_response_are_never_taken_for_the_next(
    pool: UpstreamPool, method: bytes
) -> None:
    async def handler(reader: Reader, writer: Writer, index: int) -> None:
        while True:
            await read_head(reader)
            if index == 0:  # one response too many, in the same write
                writer.write(response(b"one") + response(b"smuggled"))
            else:
                writer.write(response(b"fresh"))

    async with RawServer(handler) as srv:
        first = await get(pool, srv.port, method=method)
        assert await read_body(first) == (b"" if method == b"HEAD" else b"one")
        assert await read_body(await get(pool, srv.port)) == b"fresh"
        assert srv.connections == 2


# ---------------------------------------------------------------- aborting an origin


async def test_abort_origin_fails_in_flight_exchanges_and_closes_idle_ones(
    pool: UpstreamPool,
) -> None:
    """A container died: its connections go, whatever they were doing; others stay."""
    idle_closed = asyncio.Event()
    waiting_for_head = asyncio.Event()

    async def dying(reader: Reader, writer: Writer, index: int) -> None:
        await read_head(reader)
        if index == 0:  # a download, wedged halfway (no FIN, no RST: the host is gone)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npart")
            await wait_eof(reader)
        elif index == 1:  # a request still waiting for its head
            waiting_for_head.set()
            await wait_eof(reader)
        else:  # an idle keep-alive connection
            writer.write(response(b"done"))
            await wait_eof(reader)
            idle_closed.set()

    async def healthy(reader: Reader, writer: Writer, _: int) -> None:
        while True:
            await read_head(reader)
            writer.write(response(b"alive"))

    reason = "container of service 'x' exited (code 137) mid-request"
    async with RawServer(dying) as dead, RawServer(healthy) as other:
        download = await get(pool, dead.port)
        it = download.read_chunks().__aiter__()
        assert await asyncio.wait_for(anext(it), DEADLINE) == b"part"
        body_read = asyncio.ensure_future(anext(it))
        head_wait = asyncio.ensure_future(get(pool, dead.port))
        await asyncio.wait_for(waiting_for_head.wait(), DEADLINE)
        assert await read_body(await get(pool, dead.port)) == b"done"
        assert await read_body(await get(pool, other.port)) == b"alive"
        assert len(pool.connections(HOST, dead.port)) == 3

        assert pool.abort_origin(HOST, dead.port, reason) == 3

        for task in (body_read, head_wait):
            with pytest.raises(UpstreamProtocolError) as info:
                await asyncio.wait_for(task, DEADLINE)
            assert info.value.reason == reason
        await download.aclose()
        await asyncio.wait_for(idle_closed.wait(), DEADLINE)
        assert pool.connections(HOST, dead.port) == []
        assert pool.abort_origin(HOST, dead.port, reason) == 0
        # The other origin's idle connection is untouched and reused.
        assert await read_body(await get(pool, other.port)) == b"alive"
        assert other.connections == 1


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
    "read_timeout": _no_pool(test_response_headers_timeout_from_the_pool_default),
    "aclose_mid_stream": test_aclose_mid_stream_closes_upstream_socket,
    "slow_consumer": test_slow_consumer_pauses_reading_and_connection_stays_usable,
    "back_pressure": test_large_body_streams_through_with_back_pressure,
    "cancel": test_cancel_while_waiting_for_head_closes_upstream_socket,
    "dropped": test_dropped_response_closes_upstream_socket,
    "states": test_connection_states_through_exchanges,
    "per_request_timeouts": test_per_request_timeouts_replace_the_pool_default,
    "idle_body": test_idle_body_timeout,
    "upload_not_read": test_upload_the_upstream_does_not_read_times_out,
    "huge_head": test_huge_response_head_is_refused_without_buffering_it,
    "head_limit": _no_pool(
        functools.partial(test_response_head_limit_is_exact, delivery="trickled")
    ),
    "header_count": test_header_count_limit,
    "reset_close_delimited": test_close_delimited_body_cut_by_a_reset_is_an_error,
    "replay_get": functools.partial(
        test_stale_connection_replays_only_safe_bodiless_requests, method=b"GET"
    ),
    "no_replay_post": functools.partial(
        test_stale_connection_replays_only_safe_bodiless_requests, method=b"POST"
    ),
    "status_000": functools.partial(
        test_invalid_statuses_are_protocol_errors, status_line=b"HTTP/1.1 000 Zero", code=b"000"
    ),
    "extra_bytes_head": functools.partial(
        test_extra_bytes_after_a_response_are_never_taken_for_the_next, method=b"HEAD"
    ),
    "abort_origin": test_abort_origin_fails_in_flight_exchanges_and_closes_idle_ones,
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
