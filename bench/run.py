#!/usr/bin/env python3
"""Hestia benchmarks: proxy overhead, streaming, cold start, bursts and footprint, side by side
with a direct connection and with nginx, Caddy and Go's httputil as reverse proxies, in the
same run.

    python bench/run.py            # full run (~5 min), writes docs/benchmarks.md
    python bench/run.py --quick    # one short round of everything (~1-2 min), prints only

Installs what it lacks (apt-get: wrk, nginx-light, busybox-static, caddy, golang-go; pip: the
project), starts its own nginx (temp prefix and config, 127.0.0.1 only), Caddy and a Go stdlib
reverse proxy (bench/goproxy, built with `go build`) as peers, its own upstreams
(bench/upstreams.py) and Hestia as subprocesses (`python -m hestia serve --config <tmp>
--port <p>`), builds a busybox image locally for the Docker parts, and removes every
container and image it created (label hestia.bench=1) at the end, also on failure. Every
figure is the median of the rounds; ratios are taken between targets measured in the same
round, interleaved, then their median.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
RUN_ID = uuid.uuid4().hex[:8]
LABEL = "hestia.bench"
SCOPE = f"bench-{RUN_ID}"
GIB = 1 << 30
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# ------------------------------------------------------------------------------ setup
def ensure_tools() -> None:
    need = []
    if not shutil.which("wrk"):
        need.append("wrk")
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        need.append("nginx-light")
    if not (shutil.which("busybox") or Path("/bin/busybox").exists()):
        need.append("busybox-static")
    if not shutil.which("caddy"):
        need.append("caddy")
    if not shutil.which("go"):
        need.append("golang-go")
    if need:
        log(f"apt-get install -y {' '.join(need)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", *need], check=True, env=env)
    try:
        import docker  # noqa: F401
        import httptools  # noqa: F401
        import uvicorn  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError:
        log("pip install the project (its dependencies are missing)")
        subprocess.run([sys.executable, "-m", "pip", "install", str(REPO)], check=True)


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def version_of(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    nginx_v = subprocess.run([nginx_bin(), "-v"], capture_output=True, text=True).stderr.strip()
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    caddy_v = go_v = "not installed"
    with contextlib.suppress(OSError):
        caddy_v = subprocess.run(["caddy", "version"], capture_output=True, text=True).stdout
        caddy_v = caddy_v.split()[0] if caddy_v.split() else "unknown"
    with contextlib.suppress(OSError):
        go_v = subprocess.run(["go", "version"], capture_output=True, text=True).stdout
        go_v = go_v.split()[2] if len(go_v.split()) > 2 else "unknown"
    docker_v = "unknown"
    with contextlib.suppress(Exception):
        docker_v = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "uvicorn": version_of("uvicorn"),
        "uvloop": version_of("uvloop"),
        "httptools": version_of("httptools"),
        "nginx": nginx_v.replace("nginx version: ", ""),
        "wrk": wrk_v.split(" [")[0],
        "caddy": caddy_v,
        "go": go_v,
        "docker": docker_v,
    }


# ------------------------------------------------------------------------------ processes
class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, args: list[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(args, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)


NGINX_CONF = """
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    upstream origin {{
        server 127.0.0.1:{origin};
        keepalive 64;
    }}
    server {{  # the origin: static files
        listen 127.0.0.1:{origin} backlog=4096;
        root {prefix}/www;
    }}
    server {{  # nginx as a reverse proxy to the origin, upstream keep-alive
        listen 127.0.0.1:{proxy} backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


def start_nginx(procs: Procs, tmp: Path) -> tuple[int, int]:
    prefix = tmp / "nginx"
    (prefix / "www").mkdir(parents=True)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True)
    # nginx's workers run as nobody: they must reach the files and write their temp dirs
    for p in (tmp, prefix, prefix / "www"):
        p.chmod(0o755)
    for p in (prefix / "tmp", *(prefix / "tmp").iterdir()):
        p.chmod(0o777)
    (prefix / "www" / "1k.bin").write_bytes(b"x" * 1024)
    with open(prefix / "www" / "1g.bin", "wb") as f:  # sparse: no disk I/O when read
        f.truncate(GIB)
    for www in (prefix / "www").iterdir():
        www.chmod(0o644)
    origin, proxy = free_port(), free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, origin=origin, proxy=proxy, workers="auto"))
    proc = procs.start(
        [nginx_bin(), "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=open(prefix / "stderr.log", "wb"),
    )
    wait_port(origin, proc=proc)
    wait_port(proxy, proc=proc)
    return origin, proxy


CADDYFILE = """
{{
    admin off
    auto_https off
}}
http://127.0.0.1:{port} {{
    reverse_proxy 127.0.0.1:{origin}
}}
"""


def start_caddy(procs: Procs, tmp: Path, origin: int) -> int:
    """Caddy's reverse_proxy to the origin, as configured in a two-line Caddyfile (no access
    log: Caddy logs none unless told to)."""
    prefix = tmp / "caddy"
    prefix.mkdir()
    port = free_port()
    (prefix / "Caddyfile").write_text(CADDYFILE.format(port=port, origin=origin))
    env = {**os.environ, "XDG_DATA_HOME": str(prefix), "XDG_CONFIG_HOME": str(prefix)}
    cmd = ["caddy", "run", "--config", str(prefix / "Caddyfile"), "--adapter", "caddyfile"]
    proc = procs.start(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(prefix / "log", "wb"))
    wait_port(port, proc=proc)
    return port


def start_goproxy(procs: Procs, tmp: Path, origin: int) -> int:
    """bench/goproxy/main.go (httputil.ReverseProxy), built here with the local Go toolchain
    (standard library only: nothing is downloaded)."""
    prefix = tmp / "goproxy"
    prefix.mkdir()
    env = {
        **os.environ,
        "GOCACHE": str(prefix / "cache"),
        "GOPATH": str(prefix / "gopath"),
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }
    binary = prefix / "goproxy"
    subprocess.run(
        ["go", "build", "-o", str(binary), str(BENCH / "goproxy" / "main.go")],
        check=True,
        env=env,
        capture_output=True,
    )
    port = free_port()
    proc = procs.start(
        [str(binary), f"127.0.0.1:{port}", f"http://127.0.0.1:{origin}"],
        stdout=subprocess.DEVNULL,
        stderr=open(prefix / "log", "wb"),
    )
    wait_port(port, proc=proc)
    return port


def start_upstreams(procs: Procs, tmp: Path) -> int:
    port = free_port()
    proc = procs.start(
        [sys.executable, str(BENCH / "upstreams.py"), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "upstreams.log", "wb"),
    )
    wait_port(port, proc=proc)
    return port


class Hestia:
    def __init__(
        self, procs: Procs, tmp: Path, name: str, config: dict[str, Any], root: Path = REPO
    ) -> None:
        """`root`: the directory holding the `hestia` package to run (a baseline checkout)."""
        self.name = name
        self.port = free_port()
        config = {
            "database": {"url": f"sqlite:///{tmp}/{name}.db"},
            **config,
            "server": {"host": "127.0.0.1", "port": self.port, **config.get("server", {})},
        }
        cfg_path = tmp / f"{name}.yml"
        cfg_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log_path = tmp / f"{name}.log"
        port = str(self.port)
        env = {**os.environ, "PYTHONPATH": str(root)}
        env.pop("HESTIA_CONFIG", None)
        env.pop("HESTIA_DATABASE_URL", None)
        self.proc = procs.start(
            [sys.executable, "-m", "hestia", "serve", "--config", str(cfg_path), "--port", port],
            cwd=root,
            env=env,
            stdout=open(self.log_path, "wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hestia {name} exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if self.get("/v1/health")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"hestia {name} did not come up")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """The process and its children (data-plane workers)."""
        found = [self.proc.pid]
        for pid in found:
            with contextlib.suppress(OSError):
                found += [
                    int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                ]
        return found

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with _HTTP.open(self.url(path), timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def post(self, path: str) -> tuple[int, Any]:
        req = urllib.request.Request(self.url(path), method="POST", data=b"")
        try:
            with _HTTP.open(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


# ------------------------------------------------------------------------------ measuring
def _auto_workers() -> int:
    """What `server.workers: auto` (the default) gives on this machine."""
    from hestia.workers import worker_count

    return worker_count("auto")


# access log on/off pairs of short runs (see Bench.small)
PAIRS = 10
PAIR_SECS = 2


def _auto_busy_poll_us() -> float:
    """What `server.busy_poll: auto` (the default) gives on this machine, in µs."""
    from hestia.server import busy_poll_seconds

    return busy_poll_seconds("auto") * 1e6


def rss_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def tree_rss_kb(pids: list[int]) -> int:
    """VmRSS summed over a process and its data-plane workers (`Hestia.pids`)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += rss_kb(pid)["VmRSS"]
    return total


class RssSampler:
    """VmRSS of a process (with its workers: the sum) every `every` seconds while in the
    with-block: before, peak, after."""

    def __init__(self, target: int | Hestia, every: float = 0.02) -> None:
        self.target = target
        self.every = every
        self.before = self.peak = self.after = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        if isinstance(self.target, int):
            return rss_kb(self.target)["VmRSS"]
        return tree_rss_kb(self.target.pids())

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, self._rss())

    def __enter__(self) -> RssSampler:
        self.before = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self._rss()
        self.peak = max(self.peak, self.after)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, conns: int, secs: float) -> dict[str, float]:
    threads = 1 if conns == 1 else 2
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{secs:g}s", "--latency", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        lat[pct] = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"(\d+) requests in", out)
    requests = float(m.group(1)) if m else float("nan")
    return {
        "rps": rps,
        "p50_ms": lat["50"],
        "p99_ms": lat["99"],
        "errors": errors,
        "requests": requests,
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _read_head(sock: socket.socket) -> tuple[int, dict[bytes, bytes], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError(f"connection closed before the response head: {buf[:200]!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def download(port: int, path: str) -> dict[str, float]:
    """GET with a raw socket into a 1 MB buffer; seconds to the last byte."""
    buf = memoryview(bytearray(1 << 20))
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        status, headers, rest = _read_head(s)
        got = len(rest)
        while True:
            n = s.recv_into(buf)
            if n == 0:
                break
            got += n
    secs = time.perf_counter() - t0
    want = int(headers.get(b"content-length", b"-1"))
    if status != 200 or (want >= 0 and got != want):
        raise RuntimeError(f"download {path}: status {status}, {got} of {want} bytes")
    return {"secs": secs, "bytes": got, "mb_s": got / secs / 1e6}


def upload(port: int, path: str, size: int) -> dict[str, float]:
    """POST `size` bytes with Content-Length from a 1 MB buffer; seconds to the response."""
    chunk = memoryview(bytes(1 << 20))
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\n"
            "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n".encode()
        )
        left = size
        while left:
            n = min(left, len(chunk))
            s.sendall(chunk[:n])
            left -= n
        status, headers, rest = _read_head(s)
        want = int(headers.get(b"content-length", b"-1"))
        while want < 0 or len(rest) < want:
            data = s.recv(65536)
            if not data:
                break
            rest += data
    secs = time.perf_counter() - t0
    if status != 200 or rest.strip() != str(size).encode():
        raise RuntimeError(f"upload {path}: status {status}, sink said {rest[:100]!r}")
    return {"secs": secs, "bytes": size, "mb_s": size / secs / 1e6}


def ndjson_gaps(port: int, path: str, n: int) -> list[float]:
    """Arrival time of each NDJSON line at the client; the gaps between them in ms."""
    times: list[float] = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        while len(times) < n:
            data = s.recv(65536)
            if not data:
                break
            t = time.perf_counter()
            times.extend([t] * data.count(b"}"))  # one '}' per line; framing has none
    if len(times) < n:
        raise RuntimeError(f"NDJSON stream {path}: {len(times)} of {n} lines")
    return [(b - a) * 1000 for a, b in itertools.pairwise(times)]


def first_byte(port: int, path: str) -> tuple[int, int, int]:
    """(status, wall ns when the request was sent, wall ns of the first response byte)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = time.time_ns()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = s.recv(1)
        first = time.time_ns()
        if not data:
            raise RuntimeError(f"GET {path}: closed without an answer")
        rest = data
        while chunk := s.recv(65536):
            rest += chunk
    return int(rest.split(b" ", 2)[1]), sent, first


async def _burst(port: int, path: str, n: int, deadline_s: float) -> list[tuple[int, float]]:
    req = f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()

    async def one() -> tuple[int, float]:
        writer = None
        try:
            async with asyncio.timeout(deadline_s):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(req)
                data = await reader.read()
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        except TimeoutError:
            status = -1  # no answer within the deadline
        except (OSError, ValueError, IndexError):
            status = 0
        finally:
            if writer is not None:
                writer.close()
        return status, time.perf_counter()

    return await asyncio.gather(*(one() for _ in range(n)))


def burst(port: int, path: str, n: int, deadline_s: float) -> tuple[list[tuple[int, float]], float]:
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    t0 = time.perf_counter()
    return runner(_burst(port, path, n, deadline_s)), t0


# ------------------------------------------------------------------------------ docker
_ENTRY = """#!/bin/sh
# DELAY: seconds before the web server listens, plus 0 to JITTER_MS ms at random (so that
# the moment it listens falls anywhere between two of Hestia's probes, not always at one phase)
sleep "${DELAY:-0}"
if [ -n "$JITTER_MS" ]; then usleep $(( $(od -An -N2 -tu2 /dev/urandom) % JITTER_MS * 1000 )); fi
echo listening
exec httpd -f -p 80 -h /www
"""


class Docker:
    """Containers and the image of this run, all labelled hestia.bench=1; Docker's own events
    for them collected by a background thread (type, action, container id, timeNano)."""

    def __init__(self, tmp: Path) -> None:
        import docker

        self.client = docker.from_env(timeout=120)
        self.client.ping()
        self._events_client = docker.from_env(timeout=None)
        self.events: list[dict[str, Any]] = []
        self.containers: list[Any] = []
        self.image = self._build(tmp)
        self._stream = self._events_client.events(
            decode=True, filters={"type": "container", "label": f"{LABEL}.run={RUN_ID}"}
        )
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        with contextlib.suppress(Exception):
            for ev in self._stream:
                self.events.append(ev)

    def _build(self, tmp: Path) -> str:
        ctx = tmp / "image"
        (ctx / "www").mkdir(parents=True)
        shutil.copy(shutil.which("busybox") or "/bin/busybox", ctx / "busybox")
        (ctx / "www" / "index.html").write_text("hello from busybox\n")
        (ctx / "entry.sh").write_text(_ENTRY)
        (ctx / "entry.sh").chmod(0o755)
        (ctx / "Dockerfile").write_text(
            "FROM scratch\n"
            "COPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
            'RUN ["/bin/mkdir", "-p", "/tmp"]\n'
            "COPY www /www\n"
            "COPY entry.sh /entry.sh\n"
            f'LABEL {LABEL}="1"\n'
            "EXPOSE 80\n"
            "STOPSIGNAL SIGKILL\n"
            'CMD ["/entry.sh"]\n'
        )
        digest = hashlib.sha256(
            b"".join(p.read_bytes() for p in sorted(ctx.rglob("*")) if p.is_file())
        ).hexdigest()[:12]
        tag = f"hestia-bench-busybox:{digest}"
        self.client.images.build(path=str(ctx), tag=tag, rm=True, labels={LABEL: "1"})
        return tag

    def create(
        self, service: str, health: str, delay: float, max_concurrency: int | None = None
    ) -> Any:
        labels = {
            LABEL: "1",
            f"{LABEL}.run": RUN_ID,
            "hestia.enable": "true",
            "hestia.scope": SCOPE,
            "hestia.service": service,
            "hestia.port": "80",
            "hestia.idle_timeout": "0",
            "hestia.startup_timeout": "60s",
            "hestia.health.type": health,
            # the burst holds 1,000 requests for one start: above queue.max_waiting's default
            "hestia.queue.max_waiting": "5000",
        }
        if max_concurrency is not None:
            labels["hestia.max_concurrency"] = str(max_concurrency)
        healthcheck = None
        if health == "docker":
            healthcheck = {
                "test": ["CMD-SHELL", "wget -q -O /dev/null http://127.0.0.1/ || exit 1"],
                "interval": 100_000_000,  # ns: 100 ms
                "timeout": 2_000_000_000,
                "retries": 3,
                "start_period": 60_000_000_000,
            }
        c = self.client.containers.create(
            self.image,
            name=f"hestia-bench-{RUN_ID}-{service}",
            labels=labels,
            environment={"DELAY": str(delay), "JITTER_MS": "100"},
            healthcheck=healthcheck,
        )
        self.containers.append(c)
        return c

    def events_for(self, cid: str, since_ns: int, action: str) -> list[int]:
        return [
            int(e["timeNano"])
            for e in list(self.events)
            if e.get("id") == cid
            and e.get("status", e.get("Action")) == action
            and int(e["timeNano"]) >= since_ns
        ]

    def wait_event(self, cid: str, since_ns: int, action: str, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events_for(cid, since_ns, action)
            if found:
                return found[0]
            time.sleep(0.02)
        raise RuntimeError(f"no Docker event {action!r} for {cid[:12]}")

    def listen_ns(self, container: Any, since_ns: int) -> int | None:
        """Docker's timestamp of the entry script's `listening` line after `since_ns`."""
        raw = container.logs(timestamps=True, stdout=True, stderr=False).decode()
        found = None
        for line in raw.splitlines():
            stamp, _, text = line.partition(" ")
            if text.strip() != "listening":
                continue
            ns = _rfc3339_ns(stamp)
            if ns >= since_ns:
                found = ns
        return found

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.close()
        for c in self.client.containers.list(all=True, filters={"label": f"{LABEL}.run={RUN_ID}"}):
            with contextlib.suppress(Exception):
                c.remove(force=True)
        with contextlib.suppress(Exception):
            self.client.images.remove(self.image, force=True)
        with contextlib.suppress(Exception):
            self.client.close()
            self._events_client.close()


def _rfc3339_ns(stamp: str) -> int:
    """'2024-05-01T10:00:00.123456789Z' -> ns since the epoch (UTC)."""
    import calendar

    main, _, frac = stamp.rstrip("Z").partition(".")
    secs = calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S"))
    return secs * 1_000_000_000 + int((frac + "000000000")[:9])


# ------------------------------------------------------------------------------ sections
class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.quick = args.quick
        self.rounds = args.rounds or (1 if args.quick else 3)
        self.secs = args.duration or (2.0 if args.quick else 5.0)
        self.procs = Procs()
        self.results: dict[str, Any] = {
            "run_id": RUN_ID,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "command": " ".join(["python bench/run.py", *sys.argv[1:]]),
            "rounds": self.rounds,
            "wrk_seconds": self.secs,
        }
        self.docker: Docker | None = None

    def close(self) -> None:
        self.procs.stop_all()
        if self.docker is not None:
            self.docker.cleanup()

    def want(self, section: str) -> bool:
        return not self.args.only or section in self.args.only.split(",")

    def run(self) -> dict[str, Any]:
        t_start = time.monotonic()
        log(f"run {RUN_ID}: {self.rounds} round(s), wrk {self.secs:g}s each")
        self.origin, self.nginx_proxy = start_nginx(self.procs, self.tmp)
        self.upstreams = start_upstreams(self.procs, self.tmp)
        services: dict[str, Any] = {
            "nginx": {"url": f"http://127.0.0.1:{self.origin}"},
            "up": {"url": f"http://127.0.0.1:{self.upstreams}"},
        }
        for i in range(len(services), 20):  # 20 configured services in all
            services[f"svc{i:02d}"] = {"url": f"http://127.0.0.1:{9000 + i}"}
        base = {"docker": {"enabled": False}, "services": services}
        self.hestia = Hestia(
            self.procs, self.tmp, "hestia-log", {**base, "logging": {"access": True}}
        )
        self.hestia_nolog = Hestia(
            self.procs, self.tmp, "hestia-nolog", {**base, "logging": {"access": False}}
        )
        # the same, with two data-plane workers (server.workers, hestia/workers.py)
        self.hestia_w2 = Hestia(
            self.procs,
            self.tmp,
            "hestia-w2",
            {**base, "logging": {"access": True}, "server": {"workers": 2}},
        )
        # the default with busy polling off (server.busy_poll, hestia/server.py BusyPoll)
        self.hestia_nopoll = Hestia(
            self.procs,
            self.tmp,
            "hestia-nopoll",
            {**base, "logging": {"access": True}, "server": {"busy_poll": "off"}},
        )
        self.baseline: dict[str, Hestia] = {}
        if self.args.baseline:
            root = self._baseline_tree(self.args.baseline)
            self.results["baseline"] = self.args.baseline
            for key, access in (("base", True), ("base_nolog", False)):
                self.baseline[key] = Hestia(
                    self.procs, self.tmp, key, {**base, "logging": {"access": access}}, root=root
                )
        time.sleep(1.0)
        self.results["footprint"] = {
            "idle_rss_mb": tree_rss_kb(self.hestia_nolog.pids()) / 1024,
            "idle_rss_log_mb": tree_rss_kb(self.hestia.pids()) / 1024,
            "idle_rss_w2_mb": tree_rss_kb(self.hestia_w2.pids()) / 1024,
            "default_workers": _auto_workers(),
            "default_busy_poll_us": _auto_busy_poll_us(),
            "services": len(services),
        }
        if self.want("small"):
            self.small()
        if self.want("stream"):
            self.stream()
        if self.want("ndjson"):
            self.ndjson()
        if self.want("cold") or self.want("burst"):
            self.docker = Docker(self.tmp)
            self.hestia_docker = Hestia(
                self.procs,
                self.tmp,
                "hestia-docker",
                {
                    "docker": {"enabled": True, "scope": SCOPE},
                    "logging": {"access": False},
                    # the burst's 1,000 connections come from one address: lift the
                    # per-client cap (server.limits) it would otherwise hit at 256
                    "server": {"limits": {"max_connections_per_client": 4096}},
                },
            )
            if self.want("cold"):
                self.cold()
            if self.want("burst"):
                self.burst()
        self.results["elapsed_s"] = time.monotonic() - t_start
        return self.results

    # -------------------------------------------------------------- 1. small requests
    def _baseline_tree(self, ref: str) -> Path:
        """The `hestia` package as of git `ref`, extracted into the temp dir."""
        root = self.tmp / "baseline"
        root.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", ref, "hestia"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        return root

    def small(self) -> None:
        caddy = start_caddy(self.procs, self.tmp, self.origin)
        goproxy = start_goproxy(self.procs, self.tmp, self.origin)
        targets = {
            "direct": f"http://127.0.0.1:{self.origin}/1k.bin",
            "nginx": f"http://127.0.0.1:{self.nginx_proxy}/1k.bin",
            "caddy": f"http://127.0.0.1:{caddy}/1k.bin",
            "goproxy": f"http://127.0.0.1:{goproxy}/1k.bin",
            "hestia": self.hestia.url("/services/nginx/1k.bin"),
            "hestia_nolog": self.hestia_nolog.url("/services/nginx/1k.bin"),
            "hestia_w2": self.hestia_w2.url("/services/nginx/1k.bin"),
            "hestia_nopoll": self.hestia_nopoll.url("/services/nginx/1k.bin"),
        }
        gateways = {
            "hestia": self.hestia,
            "hestia_nolog": self.hestia_nolog,
            "hestia_w2": self.hestia_w2,
            "hestia_nopoll": self.hestia_nopoll,
            **self.baseline,
        }
        for key, h in self.baseline.items():
            targets[key] = h.url("/services/nginx/1k.bin")
        log("small requests: warm-up")
        for url in targets.values():
            wrk(url, 50, 1)
        runs: dict[str, dict[int, list[dict[str, float]]]] = {t: {1: [], 50: []} for t in targets}
        load_peak = {"hestia": 0, "hestia_nolog": 0}
        for r in range(self.rounds):
            for conns in (1, 50):
                for name, url in targets.items():
                    if name in gateways:
                        h = gateways[name]
                        pids = h.pids()
                        cpu0 = cpu_seconds(pids)
                        with RssSampler(h, 0.05) as rss:
                            res = wrk(url, conns, self.secs)
                        res["cpu_us"] = (cpu_seconds(pids) - cpu0) / res["requests"] * 1e6
                        if conns == 50 and name in load_peak:
                            load_peak[name] = max(load_peak[name], rss.peak)
                    else:
                        res = wrk(url, conns, self.secs)
                    runs[name][conns].append(res)
                    log(
                        f"  round {r + 1} {name:13s} c={conns:<3d} {res['rps']:9.0f} req/s  "
                        f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms"
                        + (f"  CPU {res['cpu_us']:.0f} µs/req" if "cpu_us" in res else "")
                        + (f"  ERRORS {res['errors']:.0f}" if res["errors"] else "")
                    )
        out: dict[str, Any] = {}
        for name, by_conns in runs.items():
            out[name] = {
                str(c): {k: median([x[k] for x in lst]) for k in ("rps", "p50_ms", "p99_ms")}
                | {"errors": sum(x["errors"] for x in lst)}
                for c, lst in by_conns.items()
            }
        for name in gateways:
            for c, lst in runs[name].items():
                out[name][str(c)]["cpu_us"] = median([x["cpu_us"] for x in lst])
        for name in targets:
            if name in ("direct", "nginx"):
                continue
            out[name]["ratio_vs_nginx_50"] = median(
                [
                    h["rps"] / n["rps"]
                    for h, n in zip(runs[name][50], runs["nginx"][50], strict=True)
                ]
            )
            out[name]["added_p50_ms_1"] = median(
                [
                    h["p50_ms"] - d["p50_ms"]
                    for h, d in zip(runs[name][1], runs["direct"][1], strict=True)
                ]
            )
        out["nginx"]["ratio_vs_nginx_50"] = 1.0
        out["nginx"]["added_p50_ms_1"] = median(
            [
                n["p50_ms"] - d["p50_ms"]
                for n, d in zip(runs["nginx"][1], runs["direct"][1], strict=True)
            ]
        )
        out["workers2_vs_1_50"] = median(
            [
                w["rps"] / one["rps"]
                for w, one in zip(runs["hestia_w2"][50], runs["hestia"][50], strict=True)
            ]
        )
        out["log_on_vs_off_50"] = median(
            [
                on["rps"] / off["rps"]
                for on, off in zip(runs["hestia"][50], runs["hestia_nolog"][50], strict=True)
            ]
        )
        # The access line costs a few µs of a request's 55-75: less than this machine's speed
        # drifts between two 5 s runs. So the log on/off ratio is also taken over short runs
        # in pairs, in alternating order (on-off, off-on, ...), so that a trend cancels out.
        log("small requests: access log on/off in pairs")
        pairs = []
        for i in range(PAIRS):
            order = ("hestia", "hestia_nolog") if i % 2 == 0 else ("hestia_nolog", "hestia")
            got = {name: wrk(targets[name], 50, PAIR_SECS)["rps"] for name in order}
            pairs.append(got["hestia"] / got["hestia_nolog"])
        out["log_on_vs_off_50_paired"] = median(pairs)
        out["log_on_vs_off_50_pairs"] = pairs
        self.results["small"] = out
        self.results["footprint"]["load_rss_mb"] = load_peak["hestia_nolog"] / 1024
        self.results["footprint"]["load_rss_log_mb"] = load_peak["hestia"] / 1024

    # -------------------------------------------------------------- 2. streaming
    def stream(self) -> None:
        h = self.hestia
        res: dict[str, list[dict[str, float]]] = {
            "down_direct": [],
            "down_hestia": [],
            "up_direct": [],
            "up_hestia": [],
        }
        peaks: list[float] = []
        growth: list[float] = []
        log("streaming: 1 GiB down and up, direct and through Hestia")
        download(h.port, "/services/nginx/1k.bin")  # warm the pool
        download(self.origin, "/1g.bin")  # and the page cache (the first read of a sparse
        # file allocates its pages: several times slower than any later read)
        for r in range(self.rounds):
            res["down_direct"].append(download(self.origin, "/1g.bin"))
            with RssSampler(h) as rss:
                res["down_hestia"].append(download(h.port, "/services/nginx/1g.bin"))
            peaks.append(rss.peak / 1024)
            growth.append((rss.peak - rss.before) / 1024)
            res["up_direct"].append(upload(self.upstreams, "/sink", GIB))
            with RssSampler(h) as rss:
                res["up_hestia"].append(upload(h.port, "/services/up/sink", GIB))
            peaks.append(rss.peak / 1024)
            growth.append((rss.peak - rss.before) / 1024)
            log(
                f"  round {r + 1} down direct {res['down_direct'][-1]['mb_s']:.0f} MB/s, "
                f"hestia {res['down_hestia'][-1]['mb_s']:.0f} MB/s; up direct "
                f"{res['up_direct'][-1]['mb_s']:.0f} MB/s, hestia "
                f"{res['up_hestia'][-1]['mb_s']:.0f} MB/s; RSS peak {peaks[-1]:.0f} MB"
            )
        out: dict[str, Any] = {k: median([x["mb_s"] for x in v]) for k, v in res.items()}
        out["down_ratio"] = median(
            [
                h["mb_s"] / d["mb_s"]
                for h, d in zip(res["down_hestia"], res["down_direct"], strict=True)
            ]
        )
        out["up_ratio"] = median(
            [h["mb_s"] / d["mb_s"] for h, d in zip(res["up_hestia"], res["up_direct"], strict=True)]
        )
        out["rss_peak_mb"] = max(peaks)
        out["rss_growth_mb"] = max(growth)
        out["vmhwm_mb"] = rss_kb(h.pid)["VmHWM"] / 1024
        self.results["stream"] = out

    def ndjson(self) -> None:
        n = 300 if self.quick else 1000
        path = f"/ndjson?n={n}&ms=10"
        log(f"NDJSON: {n} chunks 10 ms apart, direct and through Hestia")
        gaps: dict[str, list[list[float]]] = {"direct": [], "hestia": []}
        for r in range(self.rounds):
            gaps["direct"].append(ndjson_gaps(self.upstreams, path, n))
            gaps["hestia"].append(ndjson_gaps(self.hestia.port, "/services/up" + path, n))
            log(
                f"  round {r + 1} p99 gap direct {percentile(gaps['direct'][-1], 0.99):.2f} ms, "
                f"hestia {percentile(gaps['hestia'][-1], 0.99):.2f} ms"
            )
        out: dict[str, Any] = {}
        for k, runs in gaps.items():
            out[k] = {
                "p50_ms": median([percentile(g, 0.5) for g in runs]),
                "p99_ms": median([percentile(g, 0.99) for g in runs]),
                "max_ms": median([max(g) for g in runs]),
            }
        out["chunks"] = n
        self.results["ndjson"] = out

    # -------------------------------------------------------------- 3. cold start
    def _wait_state(self, svc: str, state: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, body = self.hestia_docker.get(f"/v1/services/{svc}/status")
            if code == 200 and body["state"] == state:
                return
            time.sleep(0.05)
        raise RuntimeError(f"service {svc} not {state} after {timeout}s")

    def cold(self) -> None:
        assert self.docker is not None
        delay = 0.5
        cdock = self.docker.create("cold-docker", "docker", delay)
        chttp = self.docker.create("cold-http", "http", delay)
        self._wait_state("cold-docker", "stopped")
        self._wait_state("cold-http", "stopped")
        runs = 2 if self.quick else max(self.rounds, 7)
        log(f"cold start: {runs} starts each with a Docker HEALTHCHECK and with the HTTP probe")
        rows: dict[str, list[dict[str, float]]] = {"docker": [], "http": []}
        for r in range(runs):
            for mode, c, svc in (("docker", cdock, "cold-docker"), ("http", chttp, "cold-http")):
                status, sent, first = first_byte(self.hestia_docker.port, f"/services/{svc}/")
                if status != 200:
                    raise RuntimeError(f"cold start of {svc}: status {status}")
                start = self.docker.wait_event(c.id, sent, "start")
                row = {
                    "request_to_first_byte_ms": (first - sent) / 1e6,
                    "start_event_ms": (start - sent) / 1e6,
                }
                if mode == "docker":
                    healthy = self.docker.wait_event(c.id, sent, "health_status: healthy")
                    row["start_to_ready_ms"] = (healthy - start) / 1e6
                    row["overhead_ms"] = (first - healthy) / 1e6
                else:
                    listen = self.docker.listen_ns(c, sent)
                    if listen is None:
                        raise RuntimeError("no 'listening' line in the container log")
                    row["start_to_ready_ms"] = (listen - start) / 1e6
                    row["overhead_ms"] = (first - listen) / 1e6
                rows[mode].append(row)
                log(
                    f"  {r + 1} {mode:6s}: request -> first byte "
                    f"{row['request_to_first_byte_ms']:.0f} ms, start -> ready "
                    f"{row['start_to_ready_ms']:.0f} ms, ready -> first byte "
                    f"{row['overhead_ms']:.1f} ms"
                )
                code, _ = self.hestia_docker.post(f"/v1/services/{svc}/stop?wait=true")
                if code != 200:
                    raise RuntimeError(f"stop {svc}: {code}")
                self._wait_state(svc, "stopped")
        out: dict[str, Any] = {"runs": runs, "delay_ms": delay * 1000}
        for mode, lst in rows.items():
            out[mode] = {k: median([x[k] for x in lst]) for k in lst[0]}
            out[mode]["overhead_max_ms"] = max(x["overhead_ms"] for x in lst)
        self.results["cold"] = out

    # -------------------------------------------------------------- 4. burst
    def burst(self) -> None:
        """1,000 concurrent requests to a stopped service, twice over: with the service's
        max_concurrency at 8 (busybox httpd listens with a backlog of 9), then without a limit,
        where every held request is sent on at once when the service is ready."""
        assert self.docker is not None
        n = 1000
        runs = 1 if self.quick else self.rounds
        out: dict[str, Any] = {"requests": n}
        for variant, limit, times, deadline in (
            ("limited", 8, runs, 60.0),
            ("unlimited", None, 1, 20.0),
        ):
            svc = f"burst-{variant}"
            c = self.docker.create(svc, "docker", 0.5, max_concurrency=limit)
            self._wait_state(svc, "stopped")
            log(
                f"burst: {n} concurrent requests to a stopped service, max_concurrency "
                f"{limit or 'unset'}, {times} time(s), {deadline:g} s deadline per request"
            )
            rows = []
            for r in range(times):
                since = time.time_ns()
                answers, t0 = burst(self.hestia_docker.port, f"/services/{svc}/", n, deadline)
                ok = sum(1 for s, _ in answers if s == 200)
                t_end = max(t for s, t in answers if s == 200) if ok else float("nan")
                time.sleep(0.5)  # let the events arrive
                starts = self.docker.events_for(c.id, since, "start")
                healthy = self.docker.events_for(c.id, since, "health_status: healthy")
                row = {
                    "ok": ok,
                    "lost": n - ok,
                    "timeouts": sum(1 for s, _ in answers if s == -1),
                    "starts": len(starts),
                    "total_ms": (t_end - t0) * 1000,
                    "start_to_healthy_ms": (healthy[0] - starts[0]) / 1e6
                    if starts and healthy
                    else float("nan"),
                }
                rows.append(row)
                log(
                    f"  {r + 1}: {ok}/{n} answered 200 ({row['timeouts']} not within "
                    f"{deadline:g} s), {len(starts)} start(s), the last 200 after "
                    f"{row['total_ms']:.0f} ms; start -> healthy "
                    f"{row['start_to_healthy_ms']:.0f} ms"
                )
                self.hestia_docker.post(f"/v1/services/{svc}/stop?wait=true")
                self._wait_state(svc, "stopped")
            out[variant] = {
                "max_concurrency": limit,
                "runs": times,
                "deadline_s": deadline,
                "lost_total": sum(r["lost"] for r in rows),
                "timeouts_total": sum(r["timeouts"] for r in rows),
                "starts": [r["starts"] for r in rows],
                "total_ms": median([r["total_ms"] for r in rows]),
                "start_to_healthy_ms": median([r["start_to_healthy_ms"] for r in rows]),
            }
        self.results["burst"] = out


# ------------------------------------------------------------------------------ report
def _f(x: float, nd: int = 0) -> str:
    return "n/a" if math.isnan(x) else f"{x:,.{nd}f}"


def report(res: dict[str, Any]) -> tuple[str, list[str]]:
    lines: list[str] = []
    verdicts: list[tuple[str, str, str, bool]] = []
    add = lines.append
    add(
        f"Run `{res['run_id']}` on {res['date']} (`{res['command']}`): {res['rounds']} round(s), "
        f"wrk {res['wrk_seconds']:g} s per measurement, {res['elapsed_s']:.0f} s in all. "
        "Every figure is the median over the rounds; ratios are taken between targets measured "
        "in the same round (interleaved) and their median is shown."
    )
    add("")
    small = res.get("small")
    if small:
        add("### 1. Small requests (1 KB static file from nginx)")
        add("")
        add(
            "| target | conns | req/s | p50 ms | p99 ms | vs nginx proxy (req/s) "
            "| added p50 vs direct | CPU µs/req |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---:|")
        names = {
            "direct": "direct to nginx",
            "nginx": "nginx as proxy (keep-alive upstream)",
            "caddy": "Caddy reverse_proxy",
            "goproxy": "Go stdlib httputil.ReverseProxy",
            "hestia": "Hestia, default config (access log on, to a file)",
            "hestia_nolog": "Hestia, access log off",
            "hestia_w2": "Hestia, access log on, `server.workers: 2`",
            "hestia_nopoll": "Hestia, access log on, `server.busy_poll: off`",
        }
        if "base" in small:
            ref = res.get("baseline", "baseline")
            names["base"] = f"Hestia at `{ref}`, access log on"
            names["base_nolog"] = f"Hestia at `{ref}`, access log off"
        names = {k: v for k, v in names.items() if k in small}  # older results lack peers
        for conns in ("1", "50"):
            for key, label in names.items():
                s = small[key][conns]
                ratio = ""
                added = ""
                if conns == "50" and key != "direct":
                    ratio = f"{small[key]['ratio_vs_nginx_50']:.2f}"
                if conns == "1" and key != "direct":
                    added = f"{small[key]['added_p50_ms_1'] * 1000:+.0f} µs"
                cpu = f"{s['cpu_us']:.0f}" if "cpu_us" in s else ""
                err = f" ({s['errors']} errors)" if s["errors"] else ""
                add(
                    f"| {label}{err} | {conns} | {_f(s['rps'])} | {s['p50_ms']:.3f} | "
                    f"{s['p99_ms']:.3f} | {ratio} | {added} | {cpu} |"
                )
        add("")
        for key, label in (("hestia", "access log on"), ("hestia_nolog", "access log off")):
            r = small[key]["ratio_vs_nginx_50"]
            verdicts.append(
                (
                    f"throughput at 50 conns ≥ 1/3 of nginx ({label})",
                    "≥ 0.33",
                    f"{r:.2f}",
                    r >= 1 / 3,
                )
            )
            a = small[key]["added_p50_ms_1"]
            verdicts.append(
                (f"added p50 at 1 conn ({label})", "≤ 0.30 ms", f"{a:.3f} ms", a <= 0.3)
            )
        if "workers2_vs_1_50" in small:
            add(
                f"Two data-plane workers against one process (access log on, 50 connections, "
                f"same rounds): {small['workers2_vs_1_50']:.2f}x the req/s."
            )
            add("")
        if "log_on_vs_off_50_paired" in small:
            r = small["log_on_vs_off_50_paired"]
            pairs = small["log_on_vs_off_50_pairs"]
            add(
                f"Access log on against off at 50 connections: {small['log_on_vs_off_50']:.2f} "
                f"in the rounds above; {r:.2f} (median) over {len(pairs)} pairs of "
                f"{PAIR_SECS:g} s runs in alternating order ("
                + ", ".join(f"{x:.2f}" for x in pairs)
                + ")."
            )
            add("")
            verdicts.append(
                (
                    "access log on vs off, req/s at 50 conns (paired runs)",
                    "≥ 0.90",
                    f"{r:.2f}",
                    r >= 0.9,
                )
            )
        elif "log_on_vs_off_50" in small:
            r = small["log_on_vs_off_50"]
            verdicts.append(
                ("access log on vs off, req/s at 50 conns", "≥ 0.90", f"{r:.2f}", r >= 0.9)
            )
        for peer, label in (("caddy", "Caddy"), ("goproxy", "Go stdlib proxy")):
            if peer not in small:
                continue
            ours, theirs = small["hestia"]["ratio_vs_nginx_50"], small[peer]["ratio_vs_nginx_50"]
            verdicts.append(
                (
                    f"Hestia (default config) ahead of {label} at 50 conns",
                    f"> {theirs:.2f} of nginx",
                    f"{ours:.2f}",
                    ours > theirs,
                )
            )
        if "goproxy" in small:
            ours, theirs = small["hestia"]["added_p50_ms_1"], small["goproxy"]["added_p50_ms_1"]
            verdicts.append(
                (
                    "added p50 at 1 conn no worse than the Go stdlib proxy",
                    f"≤ {theirs * 1000:.0f} µs",
                    f"{ours * 1000:.0f} µs",
                    ours <= theirs,
                )
            )
    st = res.get("stream")
    if st:
        add("### 2. Streaming (1 GiB, raw-socket client, 1 MB reads/writes)")
        add("")
        add("| transfer | direct MB/s | Hestia MB/s | Hestia / direct |")
        add("|---|---:|---:|---:|")
        add(
            f"| download (nginx sendfile) | {_f(st['down_direct'])} | {_f(st['down_hestia'])} | "
            f"{st['down_ratio']:.2f} |"
        )
        add(
            f"| upload (to a sink) | {_f(st['up_direct'])} | {_f(st['up_hestia'])} | "
            f"{st['up_ratio']:.2f} |"
        )
        add("")
        add(
            f"Hestia's RSS during the transfers: peak {st['rss_peak_mb']:.0f} MB, at most "
            f"{st['rss_growth_mb']:+.1f} MB over its RSS before the transfer (VmHWM "
            f"{st['vmhwm_mb']:.0f} MB after everything so far)."
        )
        add("")
        worst = min(st["down_hestia"], st["up_hestia"])
        verdicts.append(
            (
                "streaming through Hestia",
                "≥ 1,000 MB/s",
                f"{worst:,.0f} MB/s (slower direction)",
                worst >= 1000,
            )
        )
        verdicts.append(
            (
                "memory flat while streaming",
                "growth < 20 MB",
                f"{st['rss_growth_mb']:+.1f} MB",
                st["rss_growth_mb"] < 20,
            )
        )
    nd = res.get("ndjson")
    if nd:
        add(f"NDJSON, {nd['chunks']} chunks sent 10 ms apart; gaps between lines at the client:")
        add("")
        add("| path | p50 gap ms | p99 gap ms | max gap ms |")
        add("|---|---:|---:|---:|")
        for key, label in (("direct", "direct"), ("hestia", "through Hestia")):
            g = nd[key]
            add(f"| {label} | {g['p50_ms']:.2f} | {g['p99_ms']:.2f} | {g['max_ms']:.2f} |")
        add("")
        p99 = nd["hestia"]["p99_ms"]
        verdicts.append(("NDJSON p99 gap", "≤ 12 ms (10 ms + 2)", f"{p99:.2f} ms", p99 <= 12))
    cold = res.get("cold")
    if cold:
        add(
            f"### 3. Cold start (busybox httpd listening {cold['delay_ms']:.0f}-"
            f"{cold['delay_ms'] + 100:.0f} ms after the container starts; {cold['runs']} starts "
            "each)"
        )
        add("")
        add(
            "| readiness signal | request → first byte ms | container start → ready ms | "
            "ready → first byte ms (Hestia's overhead) | worst |"
        )
        add("|---|---:|---:|---:|---:|")
        for key, label in (
            (
                "docker",
                "Docker HEALTHCHECK (100 ms interval); ready = `health_status: healthy` "
                "event's timeNano",
            ),
            (
                "http",
                "no HEALTHCHECK: Hestia's HTTP probe (50 ms interval); ready = the "
                "entry script's `listening` log line",
            ),
        ):
            c = cold[key]
            add(
                f"| {label} | {c['request_to_first_byte_ms']:.0f} | {c['start_to_ready_ms']:.0f} "
                f"| {c['overhead_ms']:.1f} | {c['overhead_max_ms']:.1f} |"
            )
        add("")
        o = cold["docker"]["overhead_ms"]
        verdicts.append(("cold start: healthy → first byte", "≤ 50 ms", f"{o:.1f} ms", o <= 50))
        o2 = cold["http"]["overhead_ms"]
        verdicts.append(
            ("cold start: listening → first byte (HTTP probe)", "≤ 50 ms", f"{o2:.1f} ms", o2 <= 50)
        )
    b = res.get("burst")
    if b:
        n = b["requests"]
        add(f"### 4. Burst ({n} concurrent requests to a stopped service)")
        add("")
        add(
            "| service setting | runs | answered 200 | lost | container starts (Docker "
            "events) | last 200 after ms | container start → healthy ms |"
        )
        add("|---|---:|---:|---:|---|---:|---:|")
        for key in ("limited", "unlimited"):
            v = b.get(key)
            if not v:
                continue
            label = (
                f"`max_concurrency: {v['max_concurrency']}`"
                if v["max_concurrency"]
                else "no max_concurrency (all sent on at once)"
            )
            total = n * v["runs"]
            add(
                f"| {label} | {v['runs']} | {total - v['lost_total']} of {total} | "
                f"{v['lost_total']} | {', '.join(map(str, v['starts']))} | "
                f"{_f(v['total_ms'])} | {_f(v['start_to_healthy_ms'])} |"
            )
        add("")
        lim = b["limited"]
        one = all(s == 1 for s in lim["starts"])
        verdicts.append(
            (
                "burst (max_concurrency 8)",
                "0 lost, 1 start",
                f"{lim['lost_total']} lost, starts {lim['starts']}",
                lim["lost_total"] == 0 and one,
            )
        )
        un = b["unlimited"]
        verdicts.append(
            (
                "burst (no max_concurrency)",
                "0 lost, 1 start",
                f"{un['lost_total']} lost ({un['timeouts_total']} unanswered after "
                f"{un['deadline_s']:g} s), starts {un['starts']}",
                un["lost_total"] == 0 and all(s == 1 for s in un["starts"]),
            )
        )
    fp = res.get("footprint")
    if fp:
        add("### 5. Footprint")
        add("")
        add("| Hestia | RSS MB |")
        add("|---|---:|")
        add(
            f"| idle, {fp['services']} services configured (access log off / on) | "
            f"{fp['idle_rss_mb']:.0f} / {fp['idle_rss_log_mb']:.0f} |"
        )
        if "load_rss_mb" in fp:
            add(
                f"| peak under the 50-connection load (access log off / on) | "
                f"{fp['load_rss_mb']:.0f} / {fp['load_rss_log_mb']:.0f} |"
            )
        if "idle_rss_w2_mb" in fp:
            add(
                f"| idle, `server.workers: 2` (the controller and two workers) | "
                f"{fp['idle_rss_w2_mb']:.0f} |"
            )
        add("")
        if "default_workers" in fp:
            n = fp["default_workers"]
            add(
                f"The default `server.workers: auto` is {n} here "
                f"({'one process' if n == 1 else f'{n} workers and the controller'}); "
                "RSS figures are summed over the controller and its workers."
                + (
                    f" The default `server.busy_poll: auto` is {fp['default_busy_poll_us']:.0f} "
                    "µs here."
                    if "default_busy_poll_us" in fp
                    else ""
                )
            )
            add("")
        verdicts.append(
            (
                "RSS idle, 20 services (default config, access log on)",
                "< 100 MB",
                f"{fp['idle_rss_log_mb']:.0f} MB",
                fp["idle_rss_log_mb"] < 100,
            )
        )
    add("### Targets")
    add("")
    add("| target | wanted | measured | |")
    add("|---|---|---|---|")
    for what, want, got, ok in verdicts:
        add(f"| {what} | {want} | {got} | {'met' if ok else '**missed**'} |")
    add("")
    missed = [v[0] for v in verdicts if not v[3]]
    return "\n".join(lines), missed


def document(body: str, mach: dict[str, str], cmd: str) -> str:
    notes = (BENCH / "NOTES.md").read_text() if (BENCH / "NOTES.md").exists() else ""
    m = mach
    head = [
        "# Benchmarks",
        "",
        "Hestia side by side with a direct connection and with nginx, Caddy and Go's "
        "standard library as reverse proxies, measured in the same run by one command (it "
        "installs wrk, nginx-light, busybox-static, caddy and golang-go with apt-get when "
        "they are missing):",
        "",
        "```bash",
        cmd,
        "```",
        "",
        "This file is written by that command (the tables) plus `bench/NOTES.md` (the notes "
        "below the tables).",
        "",
        "## Machine",
        "",
        f"- {m['nproc']} CPUs: {m['cpu']}; memory {m['memory']}; {m['kernel']}",
        f"- Python {m['python']}, uvicorn {m['uvicorn']}, uvloop {m['uvloop']}, "
        f"httptools {m['httptools']}",
        f"- nginx {m['nginx']}, Caddy {m.get('caddy', 'n/a')}, Go {m.get('go', 'n/a')}, "
        f"{m['wrk']}, Docker engine {m['docker']}",
        "- the load generator (wrk, 1 thread at 1 connection, 2 at 50), nginx (one worker per "
        "CPU), Caddy and the Go proxy (GOMAXPROCS = CPUs), Hestia and the upstreams all "
        "share these CPUs; other work may run "
        "on the machine too, so single figures move between runs by about ±10 %",
        "",
        "## Results",
        "",
    ]
    return "\n".join(head) + "\n" + body + "\n" + (("\n" + notes) if notes else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short round (~1-2 min), no doc")
    ap.add_argument("--rounds", type=int, help="rounds per measurement (default 3, quick 1)")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (default 5, quick 2)")
    ap.add_argument("--only", help="comma list of: small,stream,ndjson,cold,burst")
    ap.add_argument(
        "--output",
        help="Markdown file to write (default docs/benchmarks.md for a full run, none for --quick)",
    )
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument(
        "--render",
        metavar="JSON",
        help="measure nothing: write the Markdown again from results saved with --json",
    )
    ap.add_argument(
        "--baseline",
        metavar="GIT_REF",
        help="also measure the hestia package as of this git ref (small requests), "
        "e.g. HEAD to compare uncommitted changes in the same run",
    )
    args = ap.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        body, _ = report(saved["results"])
        output = args.output or str(REPO / "docs" / "benchmarks.md")
        Path(output).write_text(document(body, saved["machine"], "python bench/run.py"))
        log(f"wrote {output}")
        return 0
    ensure_tools()
    with contextlib.suppress(ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    mach = machine()
    tmp = Path(tempfile.mkdtemp(prefix="hestia-bench-"))
    bench = Bench(args, tmp)

    def on_signal(sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {sig}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        res = bench.run()
    finally:
        bench.close()
        shutil.rmtree(tmp, ignore_errors=True)
    body, missed = report(res)
    print(body)
    output = args.output or (None if args.quick else str(REPO / "docs" / "benchmarks.md"))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(document(body, mach, "python bench/run.py"))
        log(f"wrote {output}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": mach, "results": res}, indent=2))
    if missed:
        log(f"targets missed: {'; '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
