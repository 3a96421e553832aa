"""A scriptable raw-socket HTTP upstream for tests: each test writes the bytes it wants, byte by
byte if it likes, on real sockets on 127.0.0.1.

    async def handler(reader, writer, index):  # index: 0 for the first connection, ...
        await read_head(reader)
        writer.write(response(b"hello"))
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        ... srv.port, srv.connections ...

Leaving the block aborts every connection still open and waits (bounded) for the handlers.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

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
    """A whole HTTP/1.1 response with a content-length; ``extra`` are raw header lines."""
    head = b"HTTP/1.1 " + status + b"\r\ncontent-length: %d\r\n" % len(body)
    return head + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + body


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST) instead of a FIN, as a crashed or killed peer would."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
