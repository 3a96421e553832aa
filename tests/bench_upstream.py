"""Micro-benchmark of hestia.upstream's per-request path (not collected by pytest).

A minimal raw uvloop server in a child process answers every request head with a small fixed
response; this process drives UpstreamPool under uvloop and reports its own CPU time per
request (the server's CPU is not counted), for sequential and 50-way concurrent GETs::

    python3 tests/bench_upstream.py [--module old/upstream.py ...] [--runs 7] [-n 20000]

Each ``--module`` loads another copy of the module (e.g. ``git show
HEAD~1:hestia/upstream.py > /tmp/old.py``) to compare with this checkout's; their runs are
interleaved so that noise from other processes hits them alike.  ``--few-headers`` sends one
request header and gets one back instead of what the proxy typically sends and gets.

On a shared machine CPU time is noisy; instructions are not.  ``--once N`` runs N requests
once, for counting them (give valgrind the interpreter itself, not a pyenv shim)::

    PY=$(python3 -c 'import sys; print(sys.executable)')
    valgrind --tool=cachegrind --cache-sim=no $PY tests/bench_upstream.py --once 2000
    valgrind --tool=cachegrind --cache-sim=no $PY tests/bench_upstream.py --once 6000

(the difference of the two "I refs" totals / 4000 = instructions per request, start-up
excluded; only this process is counted, the server is a program of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import socket
import statistics
import subprocess
import sys
import time
from types import ModuleType
from typing import Any

# What the proxy sends and a typical small JSON answer (the header counts matter: each one
# costs a callback or a loop turn).
REQUEST_HEADERS = [
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
    (b"accept", b"application/json, text/plain, */*"),
    (b"accept-encoding", b"gzip, deflate, br"),
    (b"accept-language", b"en-GB,en;q=0.5"),
    (b"x-forwarded-for", b"192.168.1.23"),
    (b"x-forwarded-proto", b"http"),
    (b"x-forwarded-host", b"gateway.local:8080"),
    (b"x-forwarded-prefix", b"/services/ollama"),
    (b"x-request-id", b"6f1c2a9e0b7d4c3f"),
]
FEW_HEADERS_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\nhello, world!"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json; charset=utf-8\r\n"
    b"date: Sat, 09 May 2026 07:34:55 GMT\r\nserver: uvicorn\r\nvary: Accept-Encoding\r\n"
    b"cache-control: no-store\r\ncontent-length: 27\r\n\r\n"
    b'{"models":[],"status":"ok"}'
)
HEADERS_END = b"\r\n\r\n"


class _Server(asyncio.Protocol):
    response = RESPONSE

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n = buf.count(HEADERS_END)
        if n:
            self.transport.write(self.response * n)
            buf = buf[buf.rfind(HEADERS_END) + 4 :]
        self.buf = buf


def _serve(fd: int, few_headers: bool) -> None:
    import uvloop

    if few_headers:
        _Server.response = FEW_HEADERS_RESPONSE

    async def main() -> None:
        sock = socket.socket(fileno=fd)
        server = await asyncio.get_running_loop().create_server(_Server, sock=sock)
        await server.serve_forever()

    uvloop.run(main())


def _load(path: str | None, index: int) -> ModuleType:
    if path is None:
        import hestia.upstream

        return hestia.upstream
    spec = importlib.util.spec_from_file_location(f"upstream_under_test_{index}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


async def _one(pool: Any, port: int, headers: list[tuple[bytes, bytes]]) -> None:
    resp = await pool.request("127.0.0.1", port, b"GET", b"/bench", headers)
    try:
        async for _chunk in resp.read_chunks():
            pass
    finally:
        await resp.aclose()


async def _run(
    mod: ModuleType, port: int, n: int, concurrency: int, few_headers: bool
) -> tuple[float, float]:
    pool = mod.UpstreamPool()
    headers = [(b"host", b"127.0.0.1:%d" % port)]
    if not few_headers:
        headers += REQUEST_HEADERS
    for _ in range(200):  # warm up: connections, caches
        await _one(pool, port, headers)

    async def worker(count: int) -> None:
        for _ in range(count):
            await _one(pool, port, headers)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    if concurrency == 1:
        await worker(n)
    else:
        await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await pool.aclose()
    return cpu / n * 1e6, wall / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--module", action="append", default=[])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=1, help="for --once")
    parser.add_argument("--once", type=int, default=0, metavar="N")
    parser.add_argument(
        "--few-headers", action="store_true", help="one request and one response header"
    )
    parser.add_argument("--serve-fd", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fd >= 0:
        _serve(args.serve_fd, args.few_headers)
        return
    import uvloop

    paths: list[str | None] = [None, *args.module]
    mods = [_load(path, i) for i, path in enumerate(paths)]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    # A separate program, not a fork: under valgrind only this process is counted.
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve-fd", str(sock.fileno())]
        + (["--few-headers"] if args.few_headers else []),
        pass_fds=[sock.fileno()],
    )
    try:
        if args.once:
            uvloop.run(_run(mods[-1], port, args.once, args.concurrency, args.few_headers))
            return
        for concurrency in (1, 50):
            cpus: list[list[float]] = [[] for _ in mods]
            walls: list[list[float]] = [[] for _ in mods]
            for _ in range(args.runs):
                for i, mod in enumerate(mods):
                    cpu, wall = uvloop.run(_run(mod, port, args.n, concurrency, args.few_headers))
                    cpus[i].append(cpu)
                    walls[i].append(wall)
            for path, cpu_runs, wall_runs in zip(paths, cpus, walls, strict=True):
                print(
                    f"{path or 'hestia/upstream.py':<28} c={concurrency:<3}"
                    f" cpu/req us: min {min(cpu_runs):6.1f} median"
                    f" {statistics.median(cpu_runs):6.1f}   wall/req us: min"
                    f" {min(wall_runs):6.1f} median {statistics.median(wall_runs):6.1f}"
                )
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
