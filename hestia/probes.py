"""Readiness probes: one HTTP GET or one TCP connect, with a short timeout.

Kept apart from the proxy's pooled client on purpose: a probe must use a fresh connection
(a pooled one says nothing about whether the service accepts connections now).
"""

from __future__ import annotations

import asyncio
import contextlib


async def tcp_probe(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def http_probe(
    host: str, port: int, path: str, host_header: str, timeout: float = 2.0
) -> int | None:
    """Status code of `GET path`, or None when no HTTP answer came (refused, reset, timeout)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: hestia-probe\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            await writer.drain()
            line = await reader.readline()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 0.5)
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return None
    try:
        return int(parts[1])
    except ValueError:
        return None
