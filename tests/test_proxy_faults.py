"""Misbehaving upstreams through the real gateway (uvicorn on 127.0.0.1): each answered with the
gateway's own JSON error while nothing was sent yet, or a cut connection once it was; one
WARNING line each, no traceback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from loguru import logger

from tests.rawserver import RawServer, Reader, Writer, read_head, reset, response, wait_eof


async def _raw_request(port: int, request: bytes, timeout: float = 10) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def _get(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"


@pytest.fixture
def log_lines() -> Any:
    lines: list[Any] = []
    sink = logger.add(lambda m: lines.append(m.record), level="WARNING")
    yield lines
    logger.remove(sink)


async def _through(
    gateway_factory: Any,
    handler: Callable[[Reader, Writer, int], Awaitable[None]],
    path: bytes = b"/services/up/",
    **service: Any,
) -> bytes:
    async with RawServer(handler) as srv:
        gw = await gateway_factory(
            {"services": {"up": {"url": f"http://127.0.0.1:{srv.port}", **service}}}
        )
        return await _raw_request(gw.port, _get(path))


async def test_upstream_that_never_answers_is_504_after_response_headers_timeout(
    gateway_factory: Any, log_lines: list[Any]
) -> None:
    async def silent(reader: Reader, writer: Writer, index: int) -> None:
        await read_head(reader)
        await wait_eof(reader)

    data = await _through(gateway_factory, silent, timeouts={"response_headers": "0.3s"})
    assert data.startswith(b"HTTP/1.1 504")
    assert b'"code": "upstream_timeout"' in data and b"timeouts.response_headers" in data
    assert [r["level"].name for r in log_lines] == ["WARNING"]
    assert log_lines[0]["exception"] is None


async def test_hung_requests_do_not_hold_max_concurrency_slots_for_ever(
    gateway_factory: Any,
) -> None:
    async def silent(reader: Reader, writer: Writer, index: int) -> None:
        await read_head(reader)
        await wait_eof(reader)

    async with RawServer(silent) as srv:
        gw = await gateway_factory(
            {
                "services": {
                    "up": {
                        "url": f"http://127.0.0.1:{srv.port}",
                        "max_concurrency": 1,
                        "timeouts": {"response_headers": "0.3s"},
                    }
                }
            }
        )
        answers = await asyncio.gather(
            *(_raw_request(gw.port, _get(b"/services/up/")) for _ in range(3))
        )
    assert [a[:12] for a in answers] == [b"HTTP/1.1 504"] * 3  # each waited its turn, none 503


async def test_idle_body_timeout_cuts_a_stalled_body(gateway_factory: Any) -> None:
    async def stalls(reader: Reader, writer: Writer, index: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await wait_eof(reader)

    data = await _through(gateway_factory, stalls, timeouts={"idle_body": "0.3s"})
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"only part")
    assert b"\r\n\r\n" in data  # the client sees fewer bytes than content-length: cut


async def test_connect_timeout_is_504_not_502(gateway_factory: Any) -> None:
    # a listener that never accepts, its backlog full: further SYNs go unanswered
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    try:
        gw = await gateway_factory(
            {
                "services": {
                    "far": {"url": f"http://127.0.0.1:{port}", "timeouts": {"connect": "0.3s"}}
                }
            }
        )
        data = await _raw_request(gw.port, _get(b"/services/far/"))
    finally:
        for s in fillers:
            s.close()
        listener.close()
    assert data.startswith(b"HTTP/1.1 504"), data[:200]
    assert b"upstream_timeout" in data and b"timeouts.connect" in data


async def test_reset_mid_body_is_an_aborted_response_not_a_clean_end(
    gateway_factory: Any, log_lines: list[Any]
) -> None:
    async def resets(reader: Reader, writer: Writer, index: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 1000)  # close-delimited
        await writer.drain()
        await asyncio.sleep(0.05)
        reset(writer)

    data = await _through(gateway_factory, resets)
    assert data.startswith(b"HTTP/1.1 200")
    assert not data.endswith(b"0\r\n\r\n")  # no clean end of the chunked body
    warnings = [r for r in log_lines if r["level"].name == "WARNING"]
    assert len(warnings) == 1 and warnings[0]["exception"] is None
    assert "mid-response" in warnings[0]["message"]
    assert all(r["level"].name != "ERROR" for r in log_lines)


@pytest.mark.parametrize("status", [b"000 Zero", b"999 Nine", b"101 Switching Protocols"])
async def test_odd_statuses_are_502(gateway_factory: Any, status: bytes) -> None:
    async def odd(reader: Reader, writer: Writer, index: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n\r\nhi")
        await wait_eof(reader)

    data = await _through(gateway_factory, odd)
    assert data.startswith(b"HTTP/1.1 502"), data[:80]
    assert b"upstream_bad_response" in data and b"invalid status" in data


async def test_huge_response_head_is_502(gateway_factory: Any) -> None:
    async def huge(reader: Reader, writer: Writer, index: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        await wait_eof(reader)

    data = await _through(gateway_factory, huge)
    assert data.startswith(b"HTTP/1.1 502") and b"upstream_bad_response" in data


async def test_one_date_header_on_proxied_responses(gateway_factory: Any) -> None:
    async def dated(reader: Reader, writer: Writer, index: int) -> None:
        await read_head(reader)
        writer.write(response(b"ok", b"date: Tue, 01 Jan 2030 00:00:00 GMT"))
        await wait_eof(reader)

    data = await _through(gateway_factory, dated)
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    assert head.count(b"\r\ndate:") == 1 and b"2030" in head
